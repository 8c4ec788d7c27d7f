"""Pieces shared by the flash-attention kernels of every backend (TPU Mosaic, GPU Triton).

Pure jnp, no Pallas: input checks, padding to whole blocks, segment handling, the
per-block visibility ranges that let the kernels skip blocks fully masked by
causality or segments, and the in-block mask. The backend files own the grid,
BlockSpecs, loops and compiler parameters.

Conventions (the same as `glm5v_jax.kernels.reference.attention_reference`):
  q `[B, S, H, D]`, k and v `[B, T, KV, D]`, H a multiple of KV (query head h reads
  K/V head h // (H // KV)); segment ids `[B, S]` / `[B, T]` int32, 0 = padding; a
  query sees a key when both carry the same non-zero id (and, when causal, the key's
  index in the row is not after the query's). Rows that see no key give zeros.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glm5v_jax.kernels.shapes import pad_axis

# Finite "minus infinity" for masked scores: exp(_MASK_VALUE - m) underflows to 0 and
# `_MASK_VALUE - _MASK_VALUE` stays finite (no inf - inf = nan in the online softmax).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query (`block_q`) and key (`block_k`) sequence axes.

    `block_q_bwd` / `block_k_bwd` are used by the backward passes (dq and dk/dv);
    None means the forward sizes. Each backend has its own default and legality rules
    (TPU: multiples of 128 unless one block covers the whole padded sequence; Triton:
    powers of two); an illegal choice raises ValueError before anything is lowered.
    """

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None

    @property
    def backward(self) -> tuple[int, int]:
        return (self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k)


@dataclasses.dataclass(frozen=True)
class AttentionDims:
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def check_inputs(q, k, v, q_segment_ids, kv_segment_ids) -> AttentionDims:
    """Validate shapes and dtypes; errors name the argument and what was expected."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D] / [B, T, KV, D]; got ndim {q.ndim}, {k.ndim}, {v.ndim}")
    b, s, h, d = q.shape
    bk, t, kv, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if bk != b or dk != d:
        raise ValueError(f"k {k.shape} must match q {q.shape} in batch and head_dim")
    if kv == 0 or h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kv}) (GQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q dtype must be float32, bfloat16 or float16; got {q.dtype}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (b, s):
            raise ValueError(f"q_segment_ids must be [B, S] = {(b, s)}; got {q_segment_ids.shape}")
        if kv_segment_ids.shape != (b, t):
            raise ValueError(f"kv_segment_ids must be [B, T] = {(b, t)}; got {kv_segment_ids.shape}")
        for name, seg in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
            if not jnp.issubdtype(seg.dtype, jnp.integer):
                raise ValueError(f"{name} must be an integer array; got {seg.dtype}")
    return AttentionDims(b, s, t, h, kv, d)


def padded_segments(q_segment_ids, kv_segment_ids, dims: AttentionDims, q_pad: int, kv_pad: int):
    """int32 segment ids `[B, q_pad]`, `[B, kv_pad]` with 0 on the padded tail.

    Returns (None, None) when no segments were given and nothing is padded, so the
    kernels can drop the segment test entirely.
    """
    if q_segment_ids is None and q_pad == dims.q_len and kv_pad == dims.kv_len:
        return None, None
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((dims.batch, dims.q_len), jnp.int32)
        kv_segment_ids = jnp.ones((dims.batch, dims.kv_len), jnp.int32)
    qs = pad_axis(q_segment_ids.astype(jnp.int32), 1, q_pad)
    ks = pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_pad)
    return qs, ks


def _segment_bounds(seg: jax.Array, block: int):
    """Per block, the min and max non-zero segment id: `[B, n]` each (min > max if none)."""
    b, n = seg.shape[0], seg.shape[1] // block
    blocks = seg.reshape(b, n, block)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(blocks != 0, blocks, big), axis=-1)
    hi = jnp.max(jnp.where(blocks != 0, blocks, 0), axis=-1)
    return lo, hi


def block_visibility(
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    batch: int,
    q_pad: int,
    kv_pad: int,
    block_q: int,
    block_k: int,
    causal: bool,
) -> jax.Array:
    """Bool `[B, nq, nk]`: False only where block (i, j) has no visible pair.

    Conservative: segment ids are compared through each block's [min, max] range of
    non-zero ids, exact for packed rows (non-decreasing ids) and never hiding a
    visible pair otherwise.
    """
    nq, nk = q_pad // block_q, kv_pad // block_k
    vis = jnp.ones((batch, nq, nk), bool)
    if causal:
        q_last = jnp.arange(nq) * block_q + block_q - 1
        k_first = jnp.arange(nk) * block_k
        vis = vis & (k_first[None, :] <= q_last[:, None])[None]
    if q_seg is not None:
        qlo, qhi = _segment_bounds(q_seg, block_q)
        klo, khi = _segment_bounds(kv_seg, block_k)
        overlap = (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
        vis = vis & overlap
    return vis


def visible_ranges(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last True index along the last axis of `vis [..., n]`: int32 (lo, hi).

    A row with no True gets lo = 0, hi = -1 (an empty range). Kernels visit the blocks
    lo..hi (clamping their block index maps into that range so skipped blocks cost no
    copies) and compute only where lo <= j <= hi.
    """
    n = vis.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_vis = jnp.any(vis, axis=-1)
    lo = jnp.min(jnp.where(vis, idx, n), axis=-1)
    hi = jnp.max(jnp.where(vis, idx, -1), axis=-1)
    return jnp.where(any_vis, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)


def in_block_mask(q_pos, k_pos, q_seg, k_seg, *, causal: bool):
    """Visibility of a (query block, key block) tile; None when nothing is masked.

    q_pos `[bq, 1]` and k_pos `[1, bk]` int32 positions in the row; q_seg `[bq, 1]`,
    k_seg `[1, bk]` int32 segment ids or None. Pure jnp, used inside kernel bodies.
    """
    mask = None
    if causal:
        mask = q_pos >= k_pos
    if q_seg is not None:
        seg = (q_seg == k_seg) & (q_seg != 0)
        mask = seg if mask is None else mask & seg
    return mask
