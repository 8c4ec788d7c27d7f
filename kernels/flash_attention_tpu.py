"""Flash attention for TPU (Pallas Mosaic): GQA, packed segments, padding, causal; fwd + bwd.

Layout inside the kernels is head-major, `[B, H, S, D]` for queries and
`[B, KV, T, D]` for keys and values (the wrapper transposes and pads), so every
block's last two dimensions are `(rows, D)` and obey the TPU (8, 128) tiling rule.

Grids (the last axes are reductions, "arbitrary"; the others "parallel"):
  forward  (B, H, nq, nk)      online softmax over kv blocks; outputs o and the
                               per-row logsumexp (the only residual besides o);
  dq       (B, H, nq, nk)      recomputes p = exp(s - lse), accumulates ds @ k;
  dk, dv   (B, KV, nk, G, nq)  kv-major: for one kv head, loops over the G query heads
                               of its group and the q blocks, so GQA gradients are
                               summed in VMEM and K/V are never repeated in memory.

Skipping masked blocks: the wrapper computes, per q block, the range of kv blocks
that can hold a visible pair (`attention_common.block_visibility`: causality and
per-block segment-id ranges) and prefetches it to SMEM. Blocks outside the range do
no compute, and their index maps are clamped into the range, so the pipeline fetches
nothing new for them. The dk/dv pass uses the transposed ranges.

Block rules: a block is either a multiple of 128 or covers the whole (padded to a
multiple of 8) sequence; sequences are padded to whole blocks with segment id 0,
which the mask removes. Padding rows output zeros and receive no gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm5v_jax.kernels.attention_common import (
    MASK_VALUE,
    BlockSizes,
    block_visibility,
    check_inputs,
    in_block_mask,
    padded_segments,
    visible_ranges,
)
from glm5v_jax.kernels.shapes import pad_axis

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)
_LANES = 128


def plan_axis(name: str, length: int, blocks: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Padded length and legal block sizes for one sequence axis.

    A requested block at least as long as the row (rounded up to 8) becomes one block
    covering the padded row; every other block must be a positive multiple of 128,
    and the row is padded to a common multiple of those.
    """
    base = -(-length // 8) * 8
    small = [b for b in blocks if b < base]
    for b in blocks:
        if b <= 0 or (b < base and b % _LANES):
            raise ValueError(
                f"block_sizes.{name}={b} is illegal on TPU: a block must be a multiple of {_LANES} "
                f"or cover the whole sequence (length {length})")
    padded = base if not small else -(-length // math.lcm(*small)) * math.lcm(*small)
    return padded, tuple(b if b < base else padded for b in blocks)


def _iotas(bq: int, bk: int, i, j, transposed: bool = False):
    """Query and key positions of tile (i, j), both `[bq, bk]` (or `[bk, bq]` transposed)."""
    if transposed:
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
        q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    else:
        q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return q_pos, k_pos


def _dot(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _clamp(j, lo, hi):
    """Clamp block index j into [lo, max(lo, hi)] (an empty range maps to lo)."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(lo, hi))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *rest, causal, has_seg, scale, bq, bk, nk):
    if has_seg:
        qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= hi_ref[b, i]))
    def _compute():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, 1, 1) * scale  # [bq, bk]
        q_pos, k_pos = _iotas(bq, bk, i, j)
        mask = in_block_mask(q_pos, k_pos, qs_ref[...] if has_seg else None,
                             ks_ref[...] if has_seg else None, causal=causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, 1, 0)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_sc[...]
        seen = denom > 0.0
        safe_l = jnp.where(seen, denom, 1.0)
        o_ref[...] = jnp.where(seen, acc_sc[...] / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe_l), 0.0)


def _forward(qt, kt, vt, qs, ks, kv_lo, kv_hi, *, causal, scale, bq, bk, interpret):
    """qt `[B,H,Sp,D]`, kt/vt `[B,KV,Tp,D]` -> (o `[B,H,Sp,D]`, lse `[B,H,Sp,1]` f32)."""
    b, h, sp, d = qt.shape
    kvh, tp = kt.shape[1], kt.shape[2]
    g, nq, nk = h // kvh, sp // bq, tp // bk
    has_seg = qs is not None

    def kv_map(bi, hi, i, j, lo, up):
        return (bi, jax.lax.div(hi, g), _clamp(j, lo[bi, i], up[bi, i]), 0)

    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, lo, up: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    args = [qt, kt, vt]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, lo, up: (bi, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, lo, up: (bi, 0, _clamp(j, lo[bi, i], up[bi, i]))),
        ]
        args += [qs[:, :, None], ks[:, None, :]]
    out_map = lambda bi, hi, i, j, lo, up: (bi, hi, i, 0)  # noqa: E731
    kernel = functools.partial(_fwd_kernel, causal=causal, has_seg=has_seg, scale=scale, bq=bq, bk=bk, nk=nk)
    itemsize = qt.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * b * h * sp * tp * d, transcendentals=b * h * sp * tp,
                           bytes_accessed=itemsize * (2 * b * h * sp * d + 2 * b * kvh * tp * d))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bq, d), out_map), pl.BlockSpec((None, None, bq, 1), out_map)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype), jax.ShapeDtypeStruct((b, h, sp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_fwd",
    )(kv_lo, kv_hi, *args)


# ----------------------------------------------------------------------------- backward: dq


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               causal, has_seg, scale, bq, bk, nk):
    if has_seg:
        qs_ref, ks_ref, dq_ref, acc_sc = rest
    else:
        dq_ref, acc_sc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= hi_ref[b, i]))
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, 1, 1) * scale  # [bq, bk]
        q_pos, k_pos = _iotas(bq, bk, i, j)
        mask = in_block_mask(q_pos, k_pos, qs_ref[...] if has_seg else None,
                             ks_ref[...] if has_seg else None, causal=causal)
        p = jnp.exp(s - lse_ref[...])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, 1, 1)  # [bq, bk]
        ds = p * (dp - delta_ref[...])
        acc_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def _backward_dq(qt, kt, vt, do, lse, delta, qs, ks, kv_lo, kv_hi, *, causal, scale, bq, bk, interpret):
    b, h, sp, d = qt.shape
    kvh, tp = kt.shape[1], kt.shape[2]
    g, nq, nk = h // kvh, sp // bq, tp // bk
    has_seg = qs is not None
    row = lambda bi, hi, i, j, lo, up: (bi, hi, i, 0)  # noqa: E731

    def kv_map(bi, hi, i, j, lo, up):
        return (bi, jax.lax.div(hi, g), _clamp(j, lo[bi, i], up[bi, i]), 0)

    in_specs = [pl.BlockSpec((None, None, bq, d), row), pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), row),
                pl.BlockSpec((None, None, bq, 1), row), pl.BlockSpec((None, None, bq, 1), row)]
    args = [qt, kt, vt, do, lse, delta]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, lo, up: (bi, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, lo, up: (bi, 0, _clamp(j, lo[bi, i], up[bi, i]))),
        ]
        args += [qs[:, :, None], ks[:, None, :]]
    kernel = functools.partial(_dq_kernel, causal=causal, has_seg=has_seg, scale=scale, bq=bq, bk=bk, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, nq, nk), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), row),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_attention_dq",
    )(kv_lo, kv_hi, *args)


# ----------------------------------------------------------------------------- backward: dk, dv


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                causal, has_seg, scale, bq, bk, g, nq):
    if has_seg:
        qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= lo_ref[b, j]) & (i <= hi_ref[b, j]))
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = _dot(k, q, 1, 1) * scale  # [bk, bq]
        q_pos, k_pos = _iotas(bq, bk, i, j, transposed=True)
        mask = in_block_mask(q_pos, k_pos, qs_ref[...] if has_seg else None,
                             ks_ref[...] if has_seg else None, causal=causal)
        p_t = jnp.exp(s_t - lse_ref[...])  # lse as a row [1, bq]
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += _dot(p_t.astype(do.dtype), do, 1, 0)  # [bk, D]
        dp_t = _dot(v, do, 1, 1)  # [bk, bq]
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q, 1, 0)

    @pl.when((gi == g - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_dkv(qt, kt, vt, do, lse_row, delta_row, qs, ks, q_lo, q_hi, *, causal, scale, bq, bk, interpret):
    b, h, sp, d = qt.shape
    kvh, tp = kt.shape[1], kt.shape[2]
    g, nq, nk = h // kvh, sp // bq, tp // bk
    has_seg = qs is not None

    def q_map(bi, ki, j, gi, i, lo, up):
        return (bi, ki * g + gi, _clamp(i, lo[bi, j], up[bi, j]), 0)

    def q_row_map(bi, ki, j, gi, i, lo, up):
        return (bi, ki * g + gi, 0, _clamp(i, lo[bi, j], up[bi, j]))

    kv_map = lambda bi, ki, j, gi, i, lo, up: (bi, ki, j, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), q_row_map), pl.BlockSpec((None, None, 1, bq), q_row_map)]
    args = [qt, kt, vt, do, lse_row, delta_row]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, 1, bq), lambda bi, ki, j, gi, i, lo, up: (bi, 0, _clamp(i, lo[bi, j], up[bi, j]))),
            pl.BlockSpec((None, bk, 1), lambda bi, ki, j, gi, i, lo, up: (bi, j, 0)),
        ]
        args += [qs[:, None, :], ks[:, :, None]]
    kernel = functools.partial(_dkv_kernel, causal=causal, has_seg=has_seg, scale=scale, bq=bq, bk=bk, g=g, nq=nq)
    out_spec = pl.BlockSpec((None, None, bk, d), kv_map)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kvh, nk, g, nq), in_specs=in_specs,
            out_specs=[out_spec, out_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="flash_attention_dkv",
    )(q_lo, q_hi, *args)


# ----------------------------------------------------------------------------- custom VJP


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-array arguments of the custom VJP (hashable)."""

    causal: bool
    scale: float
    blocks: tuple[int, int]  # forward (bq, bk)
    blocks_bwd: tuple[int, int]  # dq and dk/dv passes
    interpret: Any
    batch: int
    q_pad: int
    kv_pad: int

    def ranges(self, qs, ks, bq: int, bk: int):
        """(kv_lo, kv_hi) `[B, nq]` and (q_lo, q_hi) `[B, nk]` of the visible blocks for tiles (bq, bk)."""
        vis = block_visibility(qs, ks, batch=self.batch, q_pad=self.q_pad, kv_pad=self.kv_pad,
                               block_q=bq, block_k=bk, causal=self.causal)
        return visible_ranges(vis), visible_ranges(jnp.swapaxes(vis, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(qt, kt, vt, qs, ks, static: _Static):
    return _flash_fwd(qt, kt, vt, qs, ks, static)[0]


def _flash_fwd(qt, kt, vt, qs, ks, static: _Static):
    bq, bk = static.blocks
    (kv_lo, kv_hi), _ = static.ranges(qs, ks, bq, bk)
    o, lse = _forward(qt, kt, vt, qs, ks, kv_lo, kv_hi, causal=static.causal, scale=static.scale, bq=bq, bk=bk,
                      interpret=static.interpret)
    return o, (qt, kt, vt, qs, ks, o, lse)


def _flash_bwd(static: _Static, res, do):
    qt, kt, vt, qs, ks, o, lse = res
    bq, bk = static.blocks_bwd
    # Ranges for the backward tiles (recomputed: block-level and cheap, and the tiles may differ).
    (kv_lo, kv_hi), (q_lo, q_hi) = static.ranges(qs, ks, bq, bk)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B,H,Sp,1]
    common = dict(causal=static.causal, scale=static.scale, bq=bq, bk=bk, interpret=static.interpret)
    dq = _backward_dq(qt, kt, vt, do, lse, delta, qs, ks, kv_lo, kv_hi, **common)
    b, h, sp, _ = qt.shape
    dk, dv = _backward_dkv(qt, kt, vt, do, lse.reshape(b, h, 1, sp), delta.reshape(b, h, 1, sp),
                           qs, ks, q_lo, q_hi, **common)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret=False,
) -> jax.Array:
    """Flash attention on TPU: q `[B, S, H, D]`, k/v `[B, T, KV, D]` -> `[B, S, H, D]`.

    `interpret`: False (Mosaic), True (HLO interpreter, CPU tests) or a
    `pltpu.InterpretParams` (TPU-semantics interpreter, e.g. race detection).
    Illegal block sizes raise ValueError before anything is traced into a kernel.
    """
    dims = check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    bs = block_sizes or DEFAULT_BLOCK_SIZES
    bq_b, bk_b = bs.backward
    s_pad, (bq, bq_b) = plan_axis("block_q", dims.q_len, (bs.block_q, bq_b))
    t_pad, (bk, bk_b) = plan_axis("block_k", dims.kv_len, (bs.block_k, bk_b))
    scale = float(dims.head_dim**-0.5 if scale is None else scale)
    qs, ks = padded_segments(q_segment_ids, kv_segment_ids, dims, s_pad, t_pad)
    qt = pad_axis(jnp.swapaxes(q, 1, 2), 2, s_pad)  # [B, H, Sp, D]
    kt = pad_axis(jnp.swapaxes(k, 1, 2), 2, t_pad)  # [B, KV, Tp, D]
    vt = pad_axis(jnp.swapaxes(v, 1, 2), 2, t_pad)
    static = _Static(bool(causal), scale, (bq, bk), (bq_b, bk_b), interpret, dims.batch, s_pad, t_pad)
    out = _flash(qt, kt, vt, qs, ks, static)
    return jnp.swapaxes(out[:, :, : dims.q_len], 1, 2)
