"""Patch masks for masked-image distillation (CogViT stage 1), exact in count.

Each image of a NaFlex batch (`valid [B, N]`, `patch_yx [B, N, 2]`) gets exactly
`round(ratio * n_valid)` of its valid patches masked, and never a padding patch, whatever the
mix of image sizes in the batch; the loss then counts exactly those positions. Two layouts:

* `random`: a uniformly random subset (MAE / SimMIM style).
* `block`: contiguous blobs (BEiT / EVA style block-wise masking). A few block centres are
  drawn among the image's valid patches, each with a random size and aspect ratio; every patch
  is scored by its closeness to the nearest centre in grid units, and the top-k patches by
  score are masked, so the blobs grow from their centres until the count is exactly k.

Both are a top-k over per-patch scores with padding scored -inf: static shapes, jit-friendly,
reproducible from a PRNG key.
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from glm5v_jax.errors import ConfigError


class MaskLayout(str, enum.Enum):
    RANDOM = "random"
    BLOCK = "block"


def masked_count(valid: jax.Array, ratio: float) -> jax.Array:
    """`[B]` int32: round(ratio * number of valid patches) per image (half rounds to even)."""
    return jnp.round(ratio * jnp.sum(valid.astype(jnp.float32), axis=-1)).astype(jnp.int32)


def _top_k_mask(scores: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
    """True at the `count[b]` highest-scoring valid patches of each row."""
    scores = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-scores, axis=-1)  # best first; padding (-inf) last
    rank = jnp.argsort(order, axis=-1)  # rank of each patch
    return (rank < count[:, None]) & valid


def _block_scores(key: jax.Array, valid: jax.Array, patch_yx: jax.Array, num_blocks: int) -> jax.Array:
    """Closeness of every patch to its nearest block centre (higher = masked first)."""
    b, n = valid.shape
    k_centre, k_size, k_aspect, k_jitter = jax.random.split(key, 4)
    # Centres: random valid patches of each image (Gumbel top-k without replacement).
    gumbel = jnp.where(valid, jax.random.gumbel(k_centre, (b, n)), -jnp.inf)
    centre_idx = jax.lax.top_k(gumbel, num_blocks)[1]  # [B, M]
    yx = patch_yx.astype(jnp.float32)
    centres = jnp.take_along_axis(yx, centre_idx[..., None], axis=1)  # [B, M, 2]
    # Block radius in patches, relative to the image's own grid; aspect ratio in [1/3, 3] (log-uniform).
    extent = jnp.max(jnp.where(valid[..., None], yx, 0.0), axis=1) + 1.0  # [B, 2] grid (rows, cols)
    radius = jax.random.uniform(k_size, (b, num_blocks), minval=0.15, maxval=0.45) * jnp.sqrt(
        extent[:, 0] * extent[:, 1])[:, None]
    log_aspect = jax.random.uniform(k_aspect, (b, num_blocks), minval=-jnp.log(3.0), maxval=jnp.log(3.0))
    ry, rx = radius * jnp.exp(log_aspect / 2), radius * jnp.exp(-log_aspect / 2)  # [B, M]
    d = yx[:, :, None, :] - centres[:, None, :, :]  # [B, N, M, 2]
    dist2 = (d[..., 0] / ry[:, None, :]) ** 2 + (d[..., 1] / rx[:, None, :]) ** 2
    closeness = -jnp.min(dist2, axis=-1)  # [B, N]
    return closeness + 1e-4 * jax.random.uniform(k_jitter, (b, n))  # random tie-breaks


def mim_mask(key: jax.Array, valid: jax.Array, patch_yx: jax.Array | None = None, *, ratio: float = 0.35,
             layout: MaskLayout | str = MaskLayout.RANDOM, num_blocks: int = 4) -> jax.Array:
    """`[B, N]` bool, True = masked: exactly `masked_count(valid, ratio)` valid patches per image.

    valid `[B, N]`; patch_yx `[B, N, 2]` (grid row, col; needed for `block`); ratio in [0, 1].
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError("ratio", f"the masked fraction must be in [0, 1], got {ratio}")
    try:
        layout = MaskLayout(layout)
    except ValueError:
        raise ConfigError("layout", f"unknown mask layout {layout!r}; expected one of "
                                    f"{[m.value for m in MaskLayout]}") from None
    valid = valid.astype(bool)
    count = masked_count(valid, ratio)
    if layout == MaskLayout.RANDOM:
        scores = jax.random.uniform(key, valid.shape)
    else:
        if patch_yx is None:
            raise ValueError("patch_yx: block masking needs each patch's grid position")
        if num_blocks < 1:
            raise ConfigError("num_blocks", f"need at least one block, got {num_blocks}")
        scores = _block_scores(key, valid, patch_yx, min(num_blocks, valid.shape[1]))
    return _top_k_mask(scores, valid, count)
