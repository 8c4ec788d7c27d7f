"""Grouped matmul (MoE expert FFN) on GPU as Pallas Triton kernels.

`gmm_gpu(lhs [m, k], rhs [G, k, n], group_sizes [G])` multiplies the rows of
group g (`[offsets[g], offsets[g+1])`, offsets = exclusive cumsum of the sizes)
by `rhs[g]`; `tgmm_gpu(lhs [m, k], rhs [m, n], group_sizes)` gives the per-group
`lhs[rows_g].T @ rhs[rows_g]` `[G, k, n]` (the weight gradient).

Design. The Triton backend has no scalar prefetch, so the grid cannot follow the
group sizes (as TPU megablox does); the group metadata is computed in the wrapper
and passed as small int32 arrays mapped whole, read as scalars inside the kernel:

* gmm: grid (m tiles, n tiles). Each program loops (fori_loop, dynamic bounds)
  over the groups that intersect its row tile, and within a group over k tiles,
  accumulating `where(row in group, x, 0) @ rhs[g][k tile, n tile]` in float32.
  Rows in no group (past `sum(group_sizes)`) stay zero. Empty groups run no k tile.
* tgmm: grid (G, k tiles, n tiles). Each program loops over the tm-aligned row
  tiles that overlap its group, zeroing rows outside the group in both operands,
  and accumulates `x.T @ y`. Aligned tiles keep loads coalesced; boundary tiles
  are read by both neighbouring groups.

Triton needs power-of-two arrays inside the kernel: tiles are powers of two
(>= 16, the minimum for `tl.dot`), clamped to the next power of two of small
dimensions, and the wrapper zero-pads m, k, n to tile multiples (a no-op when
aligned) and slices the result back, so any shape works.

Backward (custom_vjp): dlhs = gmm(dout, rhs) with `transpose_rhs` flipped,
drhs = tgmm(lhs, dout) (or tgmm(dout, lhs) for a transposed rhs); group_sizes
gets a float0 (no) cotangent.

jax 0.11 warns (DeprecationWarning "The Pallas Triton backend is deprecated") when
these kernels are lowered for GPU; that happens when the enclosing jit compiles,
so filter it at that call site if needed.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from glm5v_jax.kernels.shapes import pad_axis, round_up

# (tm, tk, tn): rows, contraction, output columns for gmm. For tgmm, tm is the
# contraction (rows) tile and the output tile is (tk, tn).
DEFAULT_TILING: tuple[int, int, int] = (128, 64, 128)
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory for pipelined operand tiles (H100 has 227 KiB)


def check_tiling(tiling: Sequence[int]) -> tuple[int, int, int]:
    """Validate `tiling = (tm, tk, tn)`: three powers of two >= 16 (Triton shapes, tl.dot minimum)."""
    try:
        tiles = tuple(tiling)
    except TypeError:
        raise ValueError(f"tiling must be a sequence (tm, tk, tn), got {tiling!r}") from None
    ok = len(tiles) == 3 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 16 and t & (t - 1) == 0
        for t in tiles)
    if not ok:
        raise ValueError(f"tiling must be three powers of two >= 16 (tm, tk, tn), got {tiling!r}")
    return tuple(int(t) for t in tiles)


def _fit(tile: int, dim: int) -> int:
    """Shrink a tile to the next power of two >= dim (and >= 16) so tiny dims are not over-padded."""
    return min(tile, max(16, pl.next_power_of_2(dim)))


def _pad_pow2(x: jax.Array, fill: jax.Array | int) -> jax.Array:
    """Pad a 1-D int32 table to a power-of-two length (Triton array shapes) with `fill`."""
    size = pl.next_power_of_2(x.shape[0])
    return jnp.concatenate([x, jnp.full((size - x.shape[0],), fill, jnp.int32)])


def _compiler_params(acc_elems: int, in_tile_bytes: int) -> pltriton.CompilerParams:
    """Triton launch parameters: 8 warps from 128x128 accumulators on, 3 stages if shared memory allows."""
    num_warps = 8 if acc_elems >= 128 * 128 else 4
    num_stages = min(3, max(1, _SMEM_BUDGET // in_tile_bytes))
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _offsets(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group boundaries `[G + 1]` int32: group g owns rows [offsets[g], offsets[g + 1]).

    Clipped to m, so sizes summing past m never make a kernel read beyond the rows.
    """
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def _common_dtype(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cast two tiles to their promoted dtype: Triton's dot needs equal operand types (e.g. an f32 dout
    against bf16 weights in the backward pass)."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def _gmm_kernel(offs_ref, tiles_ref, lhs_ref, rhs_ref, out_ref, *, tk: int, nk: int, transpose_rhs: bool):
    """One (tm, tn) output tile; lhs_ref [tm, kp], rhs_ref [G, kp, tn] (or [G, tn, kp]), out_ref [tm, tn]."""
    i = pl.program_id(0)
    tm, tn = out_ref.shape
    rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)  # [tm, 1]

    def group_body(g, acc):
        start, end = offs_ref[g], offs_ref[g + 1]
        in_group = (rows >= start) & (rows < end)  # [tm, 1]

        def k_body(kk, acc):
            ks = pl.ds(pl.multiple_of(kk * tk, tk), tk)
            x = jnp.where(in_group, lhs_ref[:, ks], 0)  # [tm, tk]
            w = rhs_ref[g, :, ks] if transpose_rhs else rhs_ref[g, ks, :]  # [tn, tk] or [tk, tn]
            x, w = _common_dtype(x, w)
            dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
            return acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

        return lax.fori_loop(0, jnp.where(end > start, nk, 0), k_body, acc)  # empty group: no work

    acc = lax.fori_loop(tiles_ref[2 * i], tiles_ref[2 * i + 1], group_body, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret) -> jax.Array:
    """Pad to tiles, build the group tables, run the gmm kernel, slice back to [m, n]."""
    (m, k), num_groups = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _fit(tiling[0], m), _fit(tiling[1], k), _fit(tiling[2], n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs = pad_axis(pad_axis(lhs, 0, mp), 1, kp)  # [mp, kp]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    rhs = pad_axis(pad_axis(rhs, k_axis, kp), n_axis, np_)  # [G, kp, np] or [G, np, kp]

    offsets = _offsets(group_sizes, m)  # [G + 1]
    row0 = jnp.arange(mp // tm, dtype=jnp.int32) * tm
    first = jnp.searchsorted(offsets[1:], row0, side="right")  # first group ending after the tile start
    last = jnp.searchsorted(offsets[:-1], row0 + tm, side="left")  # groups starting before the tile end
    tiles = jnp.stack([first, last], axis=1).reshape(-1).astype(jnp.int32)  # [2 * m tiles]: (first, end) pairs
    offsets, tiles = _pad_pow2(offsets, offsets[-1]), _pad_pow2(tiles, 0)

    rhs_block = (num_groups, tn, kp) if transpose_rhs else (num_groups, kp, tn)
    rhs_index = (lambda i, j: (0, j, 0)) if transpose_rhs else (lambda i, j: (0, 0, j))
    tile_bytes = (tm * tk * lhs.dtype.itemsize + tk * tn * rhs.dtype.itemsize)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tk=tk, nk=kp // tk, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn),
        in_specs=[
            pl.BlockSpec(offsets.shape, lambda i, j: (0,)),
            pl.BlockSpec(tiles.shape, lambda i, j: (0,)),
            pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec(rhs_block, rhs_index),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        compiler_params=_compiler_params(tm * tn, tile_bytes),
        interpret=interpret,
        name="gmm_gpu",
    )(offsets, tiles, lhs, rhs)
    return out[:m, :n]


def _tgmm_kernel(offs_ref, lhs_ref, rhs_ref, out_ref, *, tm: int):
    """One (tk, tn) tile of group g's lhs.T @ rhs; lhs_ref [mp, tk], rhs_ref [mp, tn], out_ref [tk, tn]."""
    g = pl.program_id(0)
    start, end = offs_ref[g], offs_ref[g + 1]
    first = lax.div(start, tm)
    stop = jnp.where(end > start, lax.div(end + tm - 1, tm), first)  # ceil(end / tm); empty group: none

    def body(t, acc):
        rs = pl.ds(pl.multiple_of(t * tm, tm), tm)
        rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)  # [tm, 1]
        in_group = (rows >= start) & (rows < end)
        x = jnp.where(in_group, lhs_ref[rs, :], 0)  # [tm, tk]
        y = jnp.where(in_group, rhs_ref[rs, :], 0)  # [tm, tn]; masked too, in case of inf/nan outside
        x, y = _common_dtype(x, y)
        return acc + lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(first, stop, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm_gpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    tiling: Sequence[int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-group `lhs[rows_g].T @ rhs[rows_g]`: lhs [m, k], rhs [m, n] -> [num_groups, k, n].

    `num_groups` defaults to `len(group_sizes)`; groups past `len(group_sizes)` are
    empty (zeros), extra sizes are ignored. Empty groups give zeros. float32
    accumulation; output dtype `preferred_element_type` or lhs's. Not differentiable.
    """
    tiling = check_tiling(DEFAULT_TILING if tiling is None else tiling)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0] or group_sizes.ndim != 1:
        raise ValueError(f"tgmm_gpu expects lhs [m, k], rhs [m, n], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    num_groups = group_sizes.shape[0] if num_groups is None else int(num_groups)
    sizes = group_sizes[:num_groups]
    sizes = jnp.pad(sizes, (0, num_groups - sizes.shape[0]))  # [num_groups]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)

    (m, k), n = lhs.shape, rhs.shape[1]
    tm, tk, tn = _fit(tiling[0], m), _fit(tiling[1], k), _fit(tiling[2], n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs = pad_axis(pad_axis(lhs, 0, mp), 1, kp)  # [mp, kp]
    rhs = pad_axis(pad_axis(rhs, 0, mp), 1, np_)  # [mp, np]
    offsets = _offsets(sizes, m)
    offsets = _pad_pow2(offsets, offsets[-1])  # [pow2 >= G + 1]

    tile_bytes = tm * (tk * lhs.dtype.itemsize + tn * rhs.dtype.itemsize)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[
            pl.BlockSpec(offsets.shape, lambda g, a, b: (0,)),
            pl.BlockSpec((mp, tk), lambda g, a, b: (0, a)),
            pl.BlockSpec((mp, tn), lambda g, a, b: (0, b)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
        compiler_params=_compiler_params(tk * tn, tile_bytes),
        interpret=interpret,
        name="tgmm_gpu",
    )(offsets, lhs, rhs)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_vjp(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret):
    return _gmm(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret):
    out = _gmm(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, transpose_rhs, interpret, res, dout):
    """dlhs [m, k] = dout @ rhs[g].T per group; drhs [G, k, n] (or [G, n, k]) via tgmm."""
    lhs, rhs, group_sizes = res
    dlhs = _gmm_vjp(dout, rhs, group_sizes, lhs.dtype, tiling, not transpose_rhs, interpret)
    a, b = (dout, lhs) if transpose_rhs else (lhs, dout)
    drhs = tgmm_gpu(a, b, group_sizes, num_groups=rhs.shape[0], preferred_element_type=rhs.dtype,
                    tiling=tiling, interpret=interpret)
    return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_gpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling: Sequence[int] | None = None,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul: lhs [m, k], rhs [G, k, n] (or [G, n, k] if transpose_rhs) -> [m, n].

    Group g owns rows `[sum(sizes[:g]), sum(sizes[:g+1]))` and multiplies them by
    rhs[g]; rows past `sum(group_sizes)` are zero (and get zero gradient).
    group_sizes `[G]` int32 may be traced. float32 accumulation; output dtype
    `preferred_element_type` or lhs's. Differentiable in lhs and rhs.
    """
    tiling = check_tiling(DEFAULT_TILING if tiling is None else tiling)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    k_axis = 2 if transpose_rhs else 1
    if (lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1 or rhs.shape[k_axis] != lhs.shape[1]
            or group_sizes.shape[0] != rhs.shape[0]):
        raise ValueError(f"gmm_gpu expects lhs [m, k], rhs [G, {'n, k' if transpose_rhs else 'k, n'}], "
                         f"group_sizes [G]; got {lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    return _gmm_vjp(lhs, rhs, group_sizes, out_dtype, tiling, bool(transpose_rhs), bool(interpret))
