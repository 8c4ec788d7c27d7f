"""Flash attention for NVIDIA GPUs as Pallas Triton kernels (FlashAttention-2), with GQA and segments.

Design:
  * Three kernels, batch and heads in the grid (no vmap around pallas_call); grid axis 0
    (CUDA x, scheduled fastest) is the sequence block, so neighbouring programs share K/V
    (or Q/dO) in L2:
      forward, grid (q block, q head, batch): loops over the visible kv blocks, writes the
        output and the per-row log-sum-exp, the only residual besides inputs and output;
      dq, grid (q block, q head, batch): loops over the visible kv blocks;
      dk/dv, grid (kv block, kv head, batch): loops over the G = H // KV query heads of
        its group and, for each, over the visible q blocks, so GQA needs neither repeated
        K/V nor a `[B, T, H, D]` intermediate. delta = rowsum(dO * O) is jnp (f32).
  * Triton BlockSpecs are pointer offsets: the side a program loops over is mapped
    whole (e.g. all of K/V for one (batch, kv head)) and sliced with `pl.ds` in the loop.
  * Block skipping: `attention_common.block_visibility` says which (q block, kv block)
    tiles hold a visible pair; `visible_ranges` turns it into per-program loop bounds
    (lo, hi), passed as int32 inputs, so fully masked blocks are never visited.
  * Every in-kernel shape must be a power of two: S and T are padded to whole blocks
    (the padded tail gets segment id 0, i.e. masked) and D to a power of two (>= 16),
    with zeros, which change no score; the results are sliced back.
  * Scores are kept in base 2 (`s * scale * log2(e)`, `exp2`), so the residual is the
    base-2 log-sum-exp; rows that see no key get out = 0 and lse = +inf, which makes
    their recomputed probabilities exactly 0 (no gradient).
  * Matmuls take the input dtype with float32 accumulation (f32 inputs: IEEE, not TF32);
    softmax statistics are f32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from glm5v_jax.kernels.attention_common import (
    MASK_VALUE,
    AttentionDims,
    BlockSizes,
    block_visibility,
    check_inputs,
    in_block_mask,
    padded_segments,
    visible_ranges,
)
from glm5v_jax.kernels.shapes import pad_axis, round_up

# Forward 128 x 64 and backward 64 x 64 tiles: the usual FlashAttention-2 Triton choice on H100
# (head_dim <= 128). Wider heads get half-size tiles to bound registers and shared memory (untuned).
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
WIDE_HEAD_BLOCK_SIZES = BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
_LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of x @ y.T
_TN = (((0,), (0,)), ((), ()))  # dot_general dims of x.T @ y
# jax >= 0.11 warns when a pallas_call is lowered for the Triton backend.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def silence_triton_deprecation():
    """Ignore only jax 0.11's Triton-backend DeprecationWarning inside the block.

    It is raised when the pallas_call is *lowered*: at the call for an eager call,
    but at the enclosing jit's lowering otherwise, so callers that lower a jitted
    step for GPU may want this around their `.lower()` / first call too.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
        yield


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) settings of one call, after block clamping."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool


def _check_block_sizes(bs: BlockSizes) -> None:
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        b = getattr(bs, name)
        if b is None and name.endswith("_bwd"):
            continue
        if not isinstance(b, int) or b < MIN_BLOCK or b & (b - 1):
            raise ValueError(f"block_sizes.{name} must be a power of two >= {MIN_BLOCK} for the Triton "
                             f"flash attention; got {b!r} in block_sizes={bs}")


def _fit(block: int, length: int) -> int:
    """Shrink a block to the smallest power of two >= 16 covering `length` (no waste on short rows)."""
    return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


def _params(head_dim: int, stages: int) -> pltriton.CompilerParams:
    # Explicit Triton params: compiler_params=None would select Mosaic GPU.
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8,
                                   num_stages=stages if head_dim <= 128 else 2)


def _load_bounds(lo_ref, hi_ref):
    """Loop bounds [lo, hi + 1) of the visible blocks for this program."""
    return lo_ref[...], hi_ref[...] + 1


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, *, causal: bool, scale: float):
    """Base-2 scores `[bq, bk]` float32, masked entries set to MASK_VALUE."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
    s = s * (scale * _LOG2E)
    mask = in_block_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _iota(n: int, start, axis: int):
    shape = (n, 1) if axis == 0 else (1, n)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _seg(ref, sl, axis: int):
    """Segment ids of a slice as a column (axis 0) or row (axis 1), or None."""
    if ref is None:
        return None
    x = ref[...] if sl is None else ref[sl]
    return x[:, None] if axis == 0 else x[None, :]


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, qs_ref, ks_ref, o_ref, lse_ref, *,
                causal: bool, scale: float, block_k: int):
    """Online-softmax forward of one (q block, q head, batch) over its visible kv blocks."""
    # q_ref [bq, Dp]; k_ref, v_ref [Tp, Dp]; qs_ref [bq]; ks_ref [Tp]; o_ref [bq, Dp]; lse_ref [bq]
    bq, dp = q_ref.shape
    q = q_ref[...]
    q_pos = _iota(bq, pl.program_id(0) * bq, 0)
    q_seg = _seg(qs_ref, None, 0)

    def body(j, carry):
        acc, m, denom = carry
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = _scores(q, k, q_pos, _iota(block_k, j * block_k, 1), q_seg, _seg(ks_ref, sl, 1),
                    causal=causal, scale=scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])  # masked: 0 once the row has seen a key
        alpha = jnp.exp2(m - m_new)
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, denom

    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, denom = lax.fori_loop(*_load_bounds(lo_ref, hi_ref), body, init)
    # m stays MASK_VALUE only in rows that saw no key (their denom and acc are junk).
    empty = m <= 0.5 * MASK_VALUE
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(denom))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qs_ref, ks_ref, dq_ref, *,
               causal: bool, scale: float, block_k: int):
    """dq of one (q block, q head, batch): P recomputed from lse, dq = scale * (P * (dP - delta)) @ K."""
    # q_ref, do_ref, dq_ref [bq, Dp]; k_ref, v_ref [Tp, Dp]; lse_ref, delta_ref, qs_ref [bq]; ks_ref [Tp]
    bq, dp = q_ref.shape
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = _iota(bq, pl.program_id(0) * bq, 0)
    q_seg = _seg(qs_ref, None, 0)

    def body(j, dq):
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = _scores(q, k, q_pos, _iota(block_k, j * block_k, 1), q_seg, _seg(ks_ref, sl, 1),
                    causal=causal, scale=scale)
        p = jnp.exp2(s - lse)  # [bq, bk]
        dp_ = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = (p * (dp_ - delta)).astype(k.dtype)
        return dq + jnp.dot(ds, k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(*_load_bounds(lo_ref, hi_ref), body, jnp.zeros((bq, dp), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qs_ref, ks_ref,
                dk_ref, dv_ref, *, causal: bool, scale: float, block_q: int):
    """dk, dv of one (kv block, kv head, batch), summed over the G query heads of the group."""
    # q_ref, do_ref [Sp, G, Dp]; k_ref, v_ref, dk_ref, dv_ref [bk, Dp]; lse_ref, delta_ref [G, Sp];
    # qs_ref [Sp]; ks_ref [bk]
    bk, dp = k_ref.shape
    group = q_ref.shape[1]
    k, v = k_ref[...], v_ref[...]
    k_pos = _iota(bk, pl.program_id(0) * bk, 1)
    k_seg = _seg(ks_ref, None, 1)
    lo, hi = _load_bounds(lo_ref, hi_ref)

    def head(g, carry):
        def body(i, carry):
            dk, dv = carry
            sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, do = q_ref[sl, g, :], do_ref[sl, g, :]
            s = _scores(q, k, _iota(block_q, i * block_q, 0), k_pos, _seg(qs_ref, sl, 0), k_seg,
                        causal=causal, scale=scale)
            p = jnp.exp2(s - lse_ref[g, sl][:, None])  # [bq, bk]
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
            dp_ = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = (p * (dp_ - delta_ref[g, sl][:, None])).astype(q.dtype)
            dk = dk + lax.dot_general(ds, q, _TN, preferred_element_type=jnp.float32)
            return dk, dv
        return lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros((bk, dp), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, cfg: _Config, head_dim: int, stages: int, name: str):
    """pallas_call with Triton compiler params; returns the callable."""
    fn = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=_params(head_dim, stages), interpret=cfg.interpret, name=name)

    def run(*args):
        # jax >= 0.11 deprecates the Triton backend; this kernel opts into it on purpose.
        with silence_triton_deprecation():
            return fn(*args)
    return run


def _padded_shapes(q, k, cfg: _Config) -> tuple[int, int, int]:
    """Padded (S, T, D): whole blocks of both passes (powers of two, so the max is a multiple)."""
    sp = round_up(q.shape[1], max(cfg.block_q, cfg.block_q_bwd))
    tp = round_up(k.shape[1], max(cfg.block_k, cfg.block_k_bwd))
    return sp, tp, max(MIN_BLOCK, pl.next_power_of_2(q.shape[3]))


def _segments(q, k, q_seg, kv_seg, sp: int, tp: int):
    """int32 segment ids padded with 0: `[B, Sp]`, `[B, Tp]`, or (None, None) if nothing masks rows."""
    (b, s, h, d), (t, kvh) = q.shape, k.shape[1:3]
    return padded_segments(q_seg, kv_seg, AttentionDims(b, s, t, h, kvh, d), sp, tp)


def _pad(x, length: int, dp: int):
    return pad_axis(pad_axis(x, 1, length), 3, dp)  # [B, L, N, D] -> [B, length, N, dp]


def _q_major_specs(bq: int, tp: int, dp: int, group: int, segmented: bool) -> dict:
    """BlockSpecs for the grid (q block i, q head h, batch b): a q-shaped block, the whole K/V
    of head h's kv head, per-row stats `[B, H, Sp]`, loop bounds `[B, nq]`, segment ids."""
    return dict(
        q=pl.BlockSpec((None, bq, None, dp), lambda i, h, b: (b, i, h, 0)),
        kv=pl.BlockSpec((None, tp, None, dp), lambda i, h, b: (b, 0, h // group, 0)),
        row=pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, i)),
        bound=pl.BlockSpec((None, None), lambda i, h, b: (b, i)),
        qs=pl.BlockSpec((None, bq), lambda i, h, b: (b, i)) if segmented else None,
        ks=pl.BlockSpec((None, tp), lambda i, h, b: (b, 0)) if segmented else None,
    )


def _kv_major_specs(bk: int, sp: int, dp: int, group: int, segmented: bool) -> dict:
    """BlockSpecs for the grid (kv block j, kv head kh, batch b): a kv-shaped block, the whole rows
    of the G query heads of the group (q, dO, stats), loop bounds `[B, nk]`, segment ids."""
    return dict(
        q=pl.BlockSpec((None, sp, group, dp), lambda j, kh, b: (b, 0, kh, 0)),
        kv=pl.BlockSpec((None, bk, None, dp), lambda j, kh, b: (b, j, kh, 0)),
        row=pl.BlockSpec((None, group, sp), lambda j, kh, b: (b, kh, 0)),
        bound=pl.BlockSpec((None, None), lambda j, kh, b: (b, j)),
        qs=pl.BlockSpec((None, sp), lambda j, kh, b: (b, 0)) if segmented else None,
        ks=pl.BlockSpec((None, bk), lambda j, kh, b: (b, j)) if segmented else None,
    )


def _forward(q, k, v, q_seg, kv_seg, cfg: _Config):
    """Output `[B, S, H, D]` and base-2 lse `[B, H, Sp]` float32."""
    b, s, h, d = q.shape
    sp, tp, dp = _padded_shapes(q, k, cfg)
    qs, ks = _segments(q, k, q_seg, kv_seg, sp, tp)
    bq, bk = cfg.block_q, cfg.block_k
    vis = block_visibility(qs, ks, batch=b, q_pad=sp, kv_pad=tp, block_q=bq, block_k=bk, causal=cfg.causal)
    lo, hi = visible_ranges(vis)  # [B, Sp // bq]: kv blocks seen by each q block
    specs = _q_major_specs(bq, tp, dp, h // k.shape[2], qs is not None)
    # Grid axis 0 (CUDA x, fastest) walks the q blocks of one head: they share K/V in L2.
    out, lse = _call(
        functools.partial(_fwd_kernel, causal=cfg.causal, scale=cfg.scale, block_k=bk),
        grid=(sp // bq, h, b), cfg=cfg, head_dim=dp, stages=3, name="flash_attention_gpu_fwd",
        in_specs=[specs["q"], specs["kv"], specs["kv"], specs["bound"], specs["bound"], specs["qs"], specs["ks"]],
        out_specs=[specs["q"], specs["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, sp, h, dp), q.dtype), jax.ShapeDtypeStruct((b, h, sp), jnp.float32)],
    )(_pad(q, sp, dp), _pad(k, tp, dp), _pad(v, tp, dp), lo, hi, qs, ks)
    return out[:, :s, :, :d], lse


def _backward(cfg: _Config, res, do):
    """FlashAttention-2 backward: a dq kernel and a GQA-grouped dk/dv kernel, both recomputing scores."""
    q, k, v, q_seg, kv_seg, out, lse = res
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    sp, tp, dp = _padded_shapes(q, k, cfg)
    qs, ks = _segments(q, k, q_seg, kv_seg, sp, tp)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    vis = block_visibility(qs, ks, batch=b, q_pad=sp, kv_pad=tp, block_q=bq, block_k=bk, causal=cfg.causal)
    q_lo, q_hi = visible_ranges(vis)  # [B, Sp // bq]: kv blocks per q block
    k_lo, k_hi = visible_ranges(vis.transpose(0, 2, 1))  # [B, Tp // bk]: q blocks per kv block
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, S, H]
    delta = pad_axis(delta.transpose(0, 2, 1), 2, sp)  # [B, H, Sp]
    args = (_pad(q, sp, dp), _pad(k, tp, dp), _pad(v, tp, dp), _pad(do, sp, dp), lse, delta)
    kw = dict(causal=cfg.causal, scale=cfg.scale)

    # dq: program per (q block, q head, batch), looping over the visible kv blocks.
    sq = _q_major_specs(bq, tp, dp, h // kvh, qs is not None)
    dq = _call(
        functools.partial(_dq_kernel, block_k=bk, **kw), grid=(sp // bq, h, b), cfg=cfg, head_dim=dp, stages=2,
        name="flash_attention_gpu_dq",
        in_specs=[sq["q"], sq["kv"], sq["kv"], sq["q"], sq["row"], sq["row"], sq["bound"], sq["bound"],
                  sq["qs"], sq["ks"]],
        out_specs=sq["q"], out_shape=jax.ShapeDtypeStruct((b, sp, h, dp), q.dtype),
    )(*args, q_lo, q_hi, qs, ks)

    # dk/dv: program per (kv block, kv head, batch), looping over its G query heads and their visible q blocks.
    sk = _kv_major_specs(bk, sp, dp, h // kvh, qs is not None)
    kv_shape = jax.ShapeDtypeStruct((b, tp, kvh, dp), k.dtype)
    dk, dv = _call(
        functools.partial(_dkv_kernel, block_q=bq, **kw), grid=(tp // bk, kvh, b), cfg=cfg, head_dim=dp,
        stages=2, name="flash_attention_gpu_dkv",
        in_specs=[sk["q"], sk["kv"], sk["kv"], sk["q"], sk["row"], sk["row"], sk["bound"], sk["bound"],
                  sk["qs"], sk["ks"]],
        out_specs=[sk["kv"], sk["kv"]], out_shape=[kv_shape, kv_shape],
    )(*args, k_lo, k_hi, qs, ks)
    return dq[:, :s, :, :d], dk[:, :t, :, :d], dv[:, :t, :, :d], None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg: _Config):
    return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg: _Config):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


_flash.defvjp(_flash_fwd, _backward)


def flash_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention `[B, S, H, D]` of q `[B, S, H, D]` over k, v `[B, T, KV, D]` (GQA: H % KV == 0).

    Masking as in `glm5v_jax.kernels.reference.attention_reference` (segment ids `[B, S]` /
    `[B, T]`, 0 = padding; causal by index in the row); rows that see no key give zeros.
    `block_sizes` (default `DEFAULT_BLOCK_SIZES`; `WIDE_HEAD_BLOCK_SIZES` when D > 128) must be
    powers of two >= 16; each block is shrunk to the padded sequence when that is shorter. `interpret=True` runs on CPU.
    Differentiable in q, k, v (custom VJP, FlashAttention-2 backward).
    """
    dims = check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    if block_sizes is None:
        block_sizes = DEFAULT_BLOCK_SIZES if dims.head_dim <= 128 else WIDE_HEAD_BLOCK_SIZES
    bs = block_sizes
    _check_block_sizes(bs)
    bq_bwd, bk_bwd = bs.backward
    cfg = _Config(
        causal=bool(causal),
        scale=float(dims.head_dim**-0.5 if scale is None else scale),
        block_q=_fit(bs.block_q, dims.q_len),
        block_k=_fit(bs.block_k, dims.kv_len),
        block_q_bwd=_fit(bq_bwd, dims.q_len),
        block_k_bwd=_fit(bk_bwd, dims.kv_len),
        interpret=bool(interpret),
    )
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, cfg)
