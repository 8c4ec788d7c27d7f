"""AdamW with per-module learning rates and schedules (vision, projector, text).

Parameters are grouped by their top-level module: `vision` (CogViT), `projector`,
and `text` (backbone and MTP). Each group has its own peak learning rate, warmup
and decay; weight decay applies to matrices only (not norms, biases or vectors).
Gradients are clipped by global norm first. The Muon optimizer replaces this in
its own issue, keeping the same groups.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax
from flax import nnx

from glm5v_jax.optim.muon import matrices_only

GROUPS = {"vision": "vision", "projector": "projector", "backbone": "text", "mtp": "text"}


def schedule(peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
             final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine (or constant) decay to final_fraction * peak."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if decay == "constant":
        main = optax.constant_schedule(peak)
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup_steps), alpha=final_fraction)
    else:
        raise ValueError(f"unknown decay {decay!r}; expected 'cosine' or 'constant'")
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), main], [warmup_steps])


def param_groups(params: nnx.State) -> Any:
    """A pytree like `params` with each leaf's group name."""
    def label(path, _):
        top = str(path[0].key if hasattr(path[0], "key") else path[0])
        if top not in GROUPS:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} belongs to no optimizer group; "
                             f"known top-level modules: {sorted(GROUPS)}")
        return GROUPS[top]
    return jax.tree_util.tree_map_with_path(label, params)


def make_tx(params: nnx.State, *, total_steps: int, groups: Mapping[str, Mapping[str, Any]],
            clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8):
    """(optax transform, {group: schedule}) for AdamW with per-group schedules.

    groups: {name: {lr, warmup_steps, decay, final_fraction, weight_decay}} for
    `vision`, `projector` and `text`.
    """
    schedules, transforms = {}, {}
    for name in ("vision", "projector", "text"):
        if name not in groups:
            raise ValueError(f"optimizer group {name!r} has no settings (config.optim.{name})")
        g = groups[name]
        schedules[name] = schedule(g["lr"], total_steps, g.get("warmup_steps", 0), g.get("decay", "cosine"),
                                   g.get("final_fraction", 0.1))
        transforms[name] = optax.adamw(schedules[name], b1=b1, b2=b2, eps=eps,
                                       weight_decay=g.get("weight_decay", 0.1),
                                       mask=matrices_only)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.multi_transform(transforms, param_groups))
    return tx, schedules
