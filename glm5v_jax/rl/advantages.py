"""Sequence advantages from group rewards, and DAPO's overlong reward shaping; pure JAX, jittable.

Every estimator maps rewards `[N]` and group ids `[N]` (ints in [0, num_groups)) to advantages `[N]`
in float32. Groups may have any size and need not be contiguous; a group of one gets advantage 0.
Group statistics are `jax.ops.segment_sum` reductions with a static `num_groups`, so a batch sharded
over devices needs no gather and no Python loop over groups.

    grpo      A_i = (R_i - mean_g) / (std_g + eps),  std_g = sqrt(sum_g (R - mean_g)^2 / (n_g - ddof))
    dr_grpo   A_i = R_i - mean_g                      (Dr.GRPO: no division by the std)
    rloo      A_i = R_i - (sum_g - R_i) / (n_g - 1)   (leave-one-out baseline) = n_g / (n_g - 1) (R_i - mean_g)

`ddof` defaults to 1, the sample std (torch.std in DeepSeekMath/TRL/verl, tunix's ddof=1); ddof=0 is
the population std. The divisor n_g - ddof is clamped at 1. A group whose rewards are all equal gets
advantage 0 under every estimator (no learning signal).

    overlong_penalty(L, L_max, L_cache, factor) = factor * clip(((L_max - L_cache) - L) / L_cache, -1, 0)

is DAPO's soft overlong punishment: 0 up to L_max - L_cache, a linear ramp to -factor inside the cache
window, -factor beyond L_max (tunix DAPOConfig: window 4096, factor 1.0). It is added to the reward
before the advantage estimator.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from glm5v_jax.errors import ConfigError

GRPO_EPS = 1e-6  # tunix and TRL use 1e-6 (verl 1e-6 too): std + eps


def _group_stats(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None):
    """(rewards f32 [N], group ids [N], num_groups, per-sample group size n [N], per-sample group sum S [N])."""
    r = jnp.asarray(rewards).astype(jnp.float32)
    g = jnp.asarray(group_ids).astype(jnp.int32)
    if r.ndim != 1 or g.shape != r.shape:
        raise ValueError(f"advantages: rewards and group_ids must both be [N]; got {r.shape} and {g.shape}")
    num_groups = r.shape[0] if num_groups is None else int(num_groups)
    n = jax.ops.segment_sum(jnp.ones_like(r), g, num_segments=num_groups)  # [G]
    s = jax.ops.segment_sum(r, g, num_segments=num_groups)  # [G]
    return r, g, num_groups, n[g], s[g]


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None = None, *,
                    ddof: int = 1, eps: float = GRPO_EPS) -> jax.Array:
    """GRPO: (R_i - mean_g) / (std_g + eps), the std with `ddof` (1: sample std, as tunix/TRL/verl)."""
    r, g, num_groups, n, s = _group_stats(rewards, group_ids, num_groups)
    centred = r - s / n
    sq = jax.ops.segment_sum(centred * centred, g, num_segments=num_groups)[g]  # [N]
    std = jnp.sqrt(sq / jnp.maximum(n - ddof, 1.0))
    return jnp.where(n > 1, centred / (std + eps), 0.0)


def dr_grpo_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None = None) -> jax.Array:
    """Dr.GRPO: R_i - mean_g (no std division, which biases towards too easy / too hard prompts)."""
    r, _, _, n, s = _group_stats(rewards, group_ids, num_groups)
    return jnp.where(n > 1, r - s / n, 0.0)


def rloo_advantages(rewards: jax.Array, group_ids: jax.Array, num_groups: int | None = None) -> jax.Array:
    """RLOO: R_i minus the mean of the other samples of its group, (S_g - R_i) / (n_g - 1)."""
    r, _, _, n, s = _group_stats(rewards, group_ids, num_groups)
    return jnp.where(n > 1, r - (s - r) / jnp.maximum(n - 1.0, 1.0), 0.0)


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def advantage_fn(name: str) -> Callable[..., jax.Array]:
    """The estimator registered as `name` in ADVANTAGES; a ConfigError (a ValueError) names the known keys."""
    if name not in ADVANTAGES:
        raise ConfigError("advantage", f"{name!r} is not in ADVANTAGES; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def compute_advantages(name: str, rewards: jax.Array, group_ids: jax.Array, num_groups: int | None = None,
                       **kwargs) -> jax.Array:
    """advantages `[N]` f32 by the registered estimator `name` (kwargs: grpo's ddof, eps)."""
    return advantage_fn(name)(rewards, group_ids, num_groups, **kwargs)


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int = 4096, factor: float = 1.0) -> jax.Array:
    """DAPO soft overlong punishment `[N]` f32 for response lengths `[N]`:
    0 for L <= L_max - L_cache, ((L_max - L_cache) - L) / L_cache * factor in the window, -factor beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    length = jnp.asarray(lengths).astype(jnp.float32)
    ramp = ((max_len - cache_len) - length) / cache_len
    return factor * jnp.clip(ramp, -1.0, 0.0)
