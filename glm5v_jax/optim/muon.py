"""Muon as an optax gradient transformation, built from small transforms.

    muon = multi_transform({
        muon:  momentum (Nesterov, lerp, f32) -> orthogonalise (Newton-Schulz per matrix)
               -> shape scale -> decoupled weight decay -> -learning_rate -> cast to param dtype,
        adamw: AdamW with its own LR, betas, eps and weight decay (no Nesterov),
    })

Which leaves take which branch, and how each is viewed as matrices, comes from a
routing table (`glm5v_jax.optim.routing.route(model)`), keyed by parameter path.
Scale modes: `rms` = 0.2 * sqrt(max(fan_in, fan_out)) (Moonlight: update RMS 0.2 so
AdamW hyper-parameters carry over; the default), `spectral` = sqrt(max(1, fan_out /
fan_in)), `none` = 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glm5v_jax.optim.newton_schulz import newton_schulz
from glm5v_jax.optim.routing import MatrixSpec, path_key, tree_of_specs

SCALE_MODES = {
    "rms": lambda fan_in, fan_out: 0.2 * math.sqrt(max(fan_in, fan_out)),
    "spectral": lambda fan_in, fan_out: math.sqrt(max(1.0, fan_out / fan_in)),
    "none": lambda fan_in, fan_out: 1.0,
}

Table = Mapping[tuple[str, ...], MatrixSpec | None]


def matrices_only(params: Any) -> Any:
    """Weight-decay mask: decay matrices, not norms, biases or other vectors."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


class MomentumState(NamedTuple):
    mu: Any


def muon_momentum(beta: float = 0.95, nesterov: bool = True) -> optax.GradientTransformation:
    """mu <- lerp(mu, g, 1 - beta); update = lerp(g, mu, beta) (Nesterov) or mu. Float32, no bias correction."""
    def init(params):
        return MomentumState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (1 - beta) * (g.astype(jnp.float32) - m), state.mu, updates)
        out = jax.tree.map(lambda g, m: g.astype(jnp.float32) + beta * (m - g.astype(jnp.float32)), updates, mu) \
            if nesterov else mu
        return out, MomentumState(mu)

    return optax.GradientTransformation(init, update)


def _as_matrices(x: jax.Array, spec: MatrixSpec):
    """x -> ([prod(batch), fan_in, fan_out], inverse function)."""
    order = spec.batch + spec.reduction + spec.output
    moved = jnp.transpose(x, order)
    batch_shape = [x.shape[a] for a in spec.batch]
    fan_in, fan_out = spec.fans(x.shape)
    mats = moved.reshape((math.prod(batch_shape), fan_in, fan_out))
    inverse_order = np.argsort(order)

    def back(m):
        return jnp.transpose(m.reshape(moved.shape), inverse_order)
    return mats, back


def orthogonalize(table: Table, ns_fn: Callable[[jax.Array], jax.Array] = newton_schulz,
                  scale_mode: str = "rms") -> optax.GradientTransformation:
    """Replace each routed update by its (Newton-Schulz) orthogonalisation, times the shape scale."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; expected one of {sorted(SCALE_MODES)}")
    scale_fn = SCALE_MODES[scale_mode]

    def one(update, spec):
        if spec is None:
            raise ValueError("a leaf routed to AdamW reached the Muon branch")
        mats, back = _as_matrices(update, spec)
        return back(ns_fn(mats)) * scale_fn(*spec.fans(update.shape))

    def update_fn(updates, state, params=None):
        del params
        specs = tree_of_specs(updates, table)
        return jax.tree.map(one, updates, specs, is_leaf=lambda x: x is None), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def cast_to_param_dtype() -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        if params is None:
            return updates, state
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    table: Table,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_preset: str = "polar_express",
    ns_steps: int = 5,
    ns_dtype=jnp.bfloat16,
    scale_mode: str = "rms",
    weight_decay: float = 0.1,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float | None = None,
) -> optax.GradientTransformation:
    """Muon for routed matrices, AdamW for the rest (LR and decay default to Muon's)."""
    def ns_fn(x):
        return newton_schulz(x, ns_preset, ns_steps, dtype=ns_dtype)

    muon_branch = optax.chain(
        muon_momentum(beta, nesterov),
        orthogonalize(table, ns_fn, scale_mode),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
        cast_to_param_dtype(),
    )
    adam_branch = optax.adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate, b1=adam_b1, b2=adam_b2,
        eps=adam_eps, weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay,
        mask=matrices_only)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if table[path_key(path)] is not None else "adam", params)

    return optax.multi_transform({"muon": muon_branch, "adam": adam_branch}, labels)
