"""Non-finite training: detected in the step, acted on by the run layer, never checkpointed.

`guard_step(fn, mode)` wraps a stage's pure step `(state, *args) -> (state, metrics)`: it adds the
metric `nonfinite` (1.0 when the loss or the gradient norm is NaN or infinite) and, in mode `skip`,
keeps the state as it was for such a step (also when the update made a parameter non-finite). That
select holds the old and the new state at once: `skip` costs one more state of memory, `stop` (the
default) nothing.

`NonFiniteMonitor` (the run loop) reads each step's flag one step late, so the host never waits for
the step it has just dispatched: `stop` raises `NonFiniteError` at the first bad step; `skip` counts
the skipped steps and raises after `max_skips` in a row. Before every checkpoint and after every
restore the run layer asks `nonfinite_leaves(state)`: a state with a non-finite leaf is never saved,
and a restored one is treated as damaged.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.errors import ConfigError, RunError

LOSS_KEYS = ("loss", "loss/total")
FLAG = "nonfinite"


class NonFiniteError(RunError):
    """Training produced a non-finite loss, gradient or state."""


def step_is_finite(metrics: Mapping[str, jax.Array]) -> jax.Array:
    """True when the loss (`loss` or `loss/total`) and `grad_norm`, where present, are finite."""
    keys = [k for k in LOSS_KEYS + ("grad_norm",) if k in metrics]
    if not keys:
        raise ValueError(f"guard_step: the step's metrics have none of {LOSS_KEYS + ('grad_norm',)}: "
                         f"{sorted(metrics)}")
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(metrics[k], jnp.float32))) for k in keys]))


def _leaf_is_finite(x) -> jax.Array:
    """True when a leaf holds no NaN or infinity (integers and keys always do not)."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


def tree_is_finite(tree: Any) -> jax.Array:
    """True when every leaf of `tree` is finite."""
    leaves = [_leaf_is_finite(x) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_step(fn: Callable, mode: str = "stop") -> Callable:
    """`fn(state, *args) -> (state, metrics)` with the `nonfinite` metric; `mode="skip"` also keeps
    the old state for a non-finite step."""
    if mode not in ("stop", "skip"):
        raise ConfigError("config.nonfinite", f"expected 'stop' or 'skip', got {mode!r}")

    def guarded(state, *args):
        # Values in new Variable objects: an nnx step merges `state` and updates its Variables in place.
        old = jax.tree.map(lambda x: x, state) if mode == "skip" else None
        new_state, metrics = fn(state, *args)
        ok = step_is_finite(metrics)
        if mode == "skip":
            ok = ok & tree_is_finite(new_state)
            new_state = jax.tree.map(lambda new, before: jnp.where(ok, new, before), new_state, old)
        return new_state, dict(metrics, **{FLAG: jnp.where(ok, 0.0, 1.0).astype(jnp.float32)})

    return guarded


_finite_leaves = jax.jit(lambda tree: jax.tree.map(_leaf_is_finite, tree))


def nonfinite_leaves(state: Any, limit: int = 5) -> list[str]:
    """Paths of the state's leaves holding a NaN or an infinity (at most `limit`, then a count)."""
    flags = jax.device_get(_finite_leaves(state))
    flat, _ = jax.tree_util.tree_flatten_with_path(flags)
    bad = [jax.tree_util.keystr(path) for path, ok in flat if not bool(np.asarray(ok))]
    return bad[:limit] + ([f"... {len(bad) - limit} more"] if len(bad) > limit else [])


class NonFiniteMonitor:
    """The run loop's side: each step's flag, read one step late; what `mode` says to do about it."""

    def __init__(self, mode: str = "stop", max_skips: int = 20):
        self.mode, self.max_skips = mode, max_skips
        self.skipped = 0  # steps skipped in this run (skip mode)
        self._in_a_row = 0
        self._pending: tuple[int, Mapping[str, Any]] | None = None

    def push(self, step: int, metrics: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
        """Queue this step's metrics; returns the (step, metrics) now known to be good (at most the
        previous step's), to be averaged into the logs."""
        done = self.flush()
        self._pending = (step, metrics)
        return done

    def flush(self) -> list[tuple[int, Mapping[str, Any]]]:
        """Settle the queued step (waits for it): [] when it was skipped, else [(step, metrics)]."""
        if self._pending is None:
            return []
        step, metrics = self._pending
        self._pending = None

        def values():  # host copies of the loss and gradient norm (only when the flag is absent or set)
            return {k: float(np.asarray(metrics[k])) for k in LOSS_KEYS + ("grad_norm",) if k in metrics}

        bad = float(metrics[FLAG]) if FLAG in metrics else not all(np.isfinite(v) for v in values().values())
        if not bad:
            self._in_a_row = 0
            return [(step, {k: v for k, v in metrics.items() if k != FLAG})]
        seen = ", ".join(f"{k} {v}" for k, v in values().items())
        if self.mode == "stop" or FLAG not in metrics:  # no flag: the step was not guarded, cannot be undone
            raise NonFiniteError(f"step {step}: non-finite training ({seen}); stopped without saving it. Lower "
                                 "the learning rates (config.optim.groups.*.lr), or set config.nonfinite=skip to "
                                 "skip such steps; rerunning resumes from the last checkpoint")
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row > self.max_skips:
            raise NonFiniteError(f"step {step}: {self._in_a_row} non-finite steps in a row ({seen}), more than "
                                 f"config.max_nonfinite_skips={self.max_skips}; stopped")
        return []
