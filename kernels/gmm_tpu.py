"""Grouped matmul (MoE expert matmul) for TPU in Pallas/Mosaic: `gmm_tpu` and `tgmm_tpu`.

Problem. `lhs [m, k]` holds rows sorted by group: group g owns rows
`[offsets[g], offsets[g+1])` with `offsets = [0, cumsum(group_sizes)]`.
`gmm_tpu` computes `out[rows_g] = lhs[rows_g] @ rhs[g]` (`rhs [G, k, n]`); rows
past `sum(group_sizes)` come out zero. `tgmm_tpu` is the weight gradient:
`out[g] = lhs[rows_g].T @ rhs[rows_g]` (`[G, k, n]`, zero for empty groups).

Visits. The m axis is cut into `tiles_m` tiles of `tm` rows. A group boundary can
fall inside a tile, so the kernel walks a list of *visits*, each a (group,
m-tile) pair with at least one row of the group in the tile, in increasing row
order (hence consecutive visits to one tile are adjacent, and so are the visits
of one group). The list is built in the wrapper with plain jnp (`make_visits`) and
its length depends on the data; it is bounded statically by `tiles_m + G - 1`
(each group boundary adds at most one extra visit). The grid's visit axis has the
data-dependent length, like megablox.

Scalar prefetch. `offsets [G+1]`, `group_ids [V]` and `tile_ids [V]` are passed with
`pltpu.PrefetchScalarGridSpec`: they live in SMEM, and the BlockSpec index maps read
them to pick which lhs tile, which expert's weights and which output tile to DMA
into VMEM for each grid step.

Masking and accumulation (gmm). Grid `(tiles_n, visits, tiles_k)`. A float32 VMEM
accumulator `[tm, tn]` is zeroed on the first visit of a tile and written to the
output (one cast, one store) on the last k step of the tile's last visit. A visit
whose group covers the whole tile does a plain matmul; a visit to a tile shared
with other groups (or with rows past the end) first zeroes, with a select, the lhs
rows that are not in its group, so every row of the tile collects exactly its own
group's product even though several groups accumulate into the same tile. Tiles
that hold no row at all (past `sum(group_sizes)`) get one extra "tail" visit that
computes nothing and stores zeros; its index maps repeat the previous blocks so no
DMA is issued for it.

Masking and accumulation (tgmm). Grid `(tiles_k, tiles_n, visits)`. The accumulator
`[tk, tn]` is zeroed on a group's first visit and stored to `out[g]` on its last;
tile rows outside the group are zeroed (in both operands, so garbage rows cannot
leak NaNs). Empty groups get one visit that only stores zeros.

Shapes. Tiles larger than a dimension are clipped to it (a full-dimension block is
always legal on TPU); otherwise the dimension is zero-padded up to a tile multiple
in the wrapper and the result sliced back. Default tiles are chosen to divide the
problem, so padding happens only for odd shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm5v_jax.kernels.shapes import pad_axis, round_up

Tiling = tuple[int, int, int]

# (tm, tk, tn) upper bounds; clipped / adapted to each problem by `default_tiling`.
DEFAULT_TILING: Tiling = (512, 1024, 1024)

_LANE = 128
_MiB = 1 << 20
# VMEM: v5e/v5p/v6e have 128 MiB per core, v7x 64 MiB. Stay within the smallest.
_VMEM_CAP = 64 * _MiB
_VMEM_MIN_LIMIT = 32 * _MiB


# ----------------------------------------------------------------------------- tiling

def sublane_multiple(dtype) -> int:
    """Row multiple of a TPU block for `dtype`: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _narrowest(*dtypes) -> jnp.dtype:
    """The dtype with the smallest itemsize (it sets the strictest sublane rule)."""
    return min((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)


def check_tiling(tiling, m: int, k: int, n: int, dtype) -> Tiling:
    """Validate a (tm, tk, tn) tiling for an `[m, k] x [k, n]` problem; return it clipped.

    TPU rule: the last two dims of every block are multiples of (sublane, 128) or
    equal to the full array dims. Here tm is a sublane dim (multiple of
    `sublane_multiple(dtype)`, with `dtype` the narrowest dtype involved) and tk, tn
    are lane dims (multiples of 128). A tile at least as large as its dimension is
    clipped to it (a full-dimension block is always legal). Raises ValueError before
    anything is traced into a kernel.
    """
    if (not isinstance(tiling, tuple) or len(tiling) != 3
            or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tiling)):
        raise ValueError(f"tiling must be a tuple of three positive ints (tm, tk, tn), got {tiling!r}")
    sub = sublane_multiple(dtype)
    rules = (("tm", m, sub, f"a multiple of {sub} (sublane rule for {jnp.dtype(dtype).name})"),
             ("tk", k, _LANE, "a multiple of 128 (lane rule)"),
             ("tn", n, _LANE, "a multiple of 128 (lane rule)"))
    for t, (name, dim, quantum, rule) in zip(tiling, rules):
        if t < dim and t % quantum:
            raise ValueError(
                f"tiling={tiling}: {name}={t} must be {rule} or at least the full dimension ({dim}); "
                "TPU blocks need their last two dims divisible by (sublane, 128) or equal to the array dims")
    return (min(tiling[0], m), min(tiling[1], k), min(tiling[2], n))


def _default_tile(dim: int, upper: int, quantum: int) -> int:
    """Full `dim` if it fits in `upper`, else the largest `quantum` multiple <= upper dividing
    `dim` rounded up to `quantum` (so only sub-quantum padding is ever needed)."""
    if dim <= upper:
        return dim
    padded = -(-dim // quantum) * quantum
    return max(t for t in range(quantum, upper + 1, quantum) if padded % t == 0)


def default_tiling(m: int, k: int, n: int, dtype) -> Tiling:
    """DEFAULT_TILING adapted to the problem: clipped to small dims, dividing large ones."""
    tm, tk, tn = DEFAULT_TILING
    return (_default_tile(m, tm, sublane_multiple(dtype)),
            _default_tile(k, tk, _LANE), _default_tile(n, tn, _LANE))


def _compiler_params(semantics: tuple[str, ...], vmem_bytes: int, tiling: Tiling) -> pltpu.CompilerParams:
    """Mosaic params with a scoped-VMEM limit sized for the blocks (raises if they cannot fit)."""
    if vmem_bytes > _VMEM_CAP:
        raise ValueError(f"tiling={tiling} needs about {vmem_bytes / _MiB:.0f} MiB of VMEM "
                         f"(limit {_VMEM_CAP // _MiB} MiB); use smaller tiles")
    limit = min(_VMEM_CAP, max(_VMEM_MIN_LIMIT, int(1.5 * vmem_bytes)))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


# ----------------------------------------------------------------------------- metadata

def group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
    """`[G+1]` int32 row offsets `[0, cumsum(sizes)]`, clipped to m."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)


def make_visits(offsets: jax.Array, tiles_m: int, tm: int, *, visit_empty_groups: bool,
                visit_tail_tiles: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (group, m-tile) visit list, in increasing row order.

    Returns `group_ids [V]`, `tile_ids [V]` (int32, V = tiles_m + G - 1, the static
    bound) and the number of active visits (int32 scalar). Each non-empty group
    visits every tile it has rows in. `visit_empty_groups` gives an empty group one
    visit (tgmm: its output must still be zeroed). `visit_tail_tiles` appends one
    visit per tile past the last row, carrying the last visited group id (gmm: those
    output tiles must be zeroed; repeating the group avoids a weight DMA). Entries
    past the active count are padding and never run.
    """
    num_groups = offsets.shape[0] - 1
    bound = tiles_m + num_groups - 1
    starts, ends = offsets[:-1], offsets[1:]
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)  # [G]
    count = jnp.where(ends > starts, (ends - 1) // tm - starts // tm + 1,
                      1 if visit_empty_groups else 0)  # [G] visits per group
    visit_end = jnp.cumsum(count)  # [G]
    num_live = visit_end[-1]
    i = jnp.arange(bound, dtype=jnp.int32)
    gid = jnp.minimum(jnp.searchsorted(visit_end, i, side="right"), num_groups - 1).astype(jnp.int32)
    tile = first_tile[gid] + i - (visit_end - count)[gid]
    num = num_live
    if visit_tail_tiles:
        used_tiles = -(-offsets[-1] // tm)  # tiles holding any row
        tail = i >= num_live
        last_gid = gid[jnp.maximum(num_live - 1, 0)]
        gid = jnp.where(tail, last_gid, gid)
        tile = jnp.where(tail, used_tiles + i - num_live, tile)
        num = num_live + tiles_m - used_tiles
    tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
    return gid, tile, num.astype(jnp.int32)


def _row_mask(shape: tuple[int, int], row0: jax.Array, start: jax.Array, end: jax.Array) -> jax.Array:
    """Bool `shape` mask: True on tile rows (global row row0 + i) inside [start, end)."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _precision(dtype) -> lax.Precision | None:
    """Full f32 precision for f32 operands (Mosaic's fp32 contract mode); default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------- gmm

def _gmm_call(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype, tiling: Tiling | None,
              transpose_rhs: bool, interpret) -> jax.Array:
    """Forward grouped matmul: pad, build visits, run the Pallas kernel, slice."""
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    narrow = _narrowest(lhs.dtype, rhs.dtype, out_dtype)
    tm, tk, tn = default_tiling(m, k, n, narrow) if tiling is None else check_tiling(tiling, m, k, n, narrow)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    precision = _precision(compute_dtype)

    lhs = pad_axis(pad_axis(lhs, 0, mp), 1, kp)  # [mp, kp]
    if transpose_rhs:
        rhs = pad_axis(pad_axis(rhs, 1, np_), 2, kp)  # [G, np, kp]
    else:
        rhs = pad_axis(pad_axis(rhs, 1, kp), 2, np_)  # [G, kp, np]
    offsets = group_offsets(group_sizes, m)
    group_ids, tile_ids, num_visits = make_visits(offsets, tiles_m, tm, visit_empty_groups=False,
                                                  visit_tail_tiles=True)
    # dot_general dims: lhs [tm, tk] x rhs [tk, tn] (or [tn, tk] when transposed).
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(offs_ref, gid_ref, tile_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        v, k_i = pl.program_id(1), pl.program_id(2)
        last_v = pl.num_programs(1) - 1
        gid, tile = gid_ref[v], tile_ref[v]
        start, end = offs_ref[gid], offs_ref[gid + 1]
        row0 = tile * tm
        first_visit = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile)
        last_visit = (v == last_v) | (tile_ref[jnp.minimum(v + 1, last_v)] != tile)
        has_rows = row0 < offs_ref[num_groups]  # False on tail visits
        full = (start <= row0) & (row0 + tm <= end)

        @pl.when(first_visit & (k_i == 0))
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        def accumulate(x):
            acc_ref[...] += lax.dot_general(x.astype(compute_dtype), rhs_ref[...].astype(compute_dtype), dims,
                                            precision=precision, preferred_element_type=jnp.float32)

        @pl.when(has_rows & full)
        def _whole_tile():
            accumulate(lhs_ref[...])

        @pl.when(has_rows & jnp.logical_not(full))
        def _shared_tile():
            x = lhs_ref[...]
            accumulate(jnp.where(_row_mask(x.shape, row0, start, end), x, jnp.zeros_like(x)))

        @pl.when(last_visit & (k_i == tiles_k - 1))
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def in_block(v, k_i, offs, tids):
        """(m tile, k tile) to load. A tail visit (no rows) repeats the blocks of the step before
        it (the last k tile of the last row's tile), so the pipeline issues no DMA for it."""
        live = tids[v] * tm < offs[num_groups]
        last_tile = lax.div(jnp.maximum(offs[num_groups] - 1, 0), jnp.int32(tm))  # not `//`: no sign op on TPU
        return jnp.where(live, tids[v], last_tile), jnp.where(live, k_i, tiles_k - 1)

    def lhs_map(n_i, v, k_i, offs, gids, tids):
        return in_block(v, k_i, offs, tids)

    def rhs_map(n_i, v, k_i, offs, gids, tids):
        kk = in_block(v, k_i, offs, tids)[1]  # tail visits carry the last live group id
        return (gids[v], n_i, kk) if transpose_rhs else (gids[v], kk, n_i)

    def out_map(n_i, v, k_i, offs, gids, tids):
        return tids[v], n_i

    rhs_block = (pl.Squeezed(), tn, tk) if transpose_rhs else (pl.Squeezed(), tk, tn)
    isz = lambda d: jnp.dtype(d).itemsize  # noqa: E731
    vmem = (2 * tm * tk * isz(lhs.dtype) + 2 * tk * tn * isz(rhs.dtype) + 2 * tm * tn * isz(out_dtype)
            + 3 * tm * tn * 4 + tm * tk * 4)  # double-buffered blocks + acc, dot result, masked lhs
    bound = tiles_m + num_groups - 1
    cost = pl.CostEstimate(
        flops=2 * mp * kp * np_, transcendentals=0,
        bytes_accessed=(tiles_n * lhs.size * isz(lhs.dtype) + bound * kp * np_ * isz(rhs.dtype)
                        + mp * np_ * isz(out_dtype)))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, num_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary"), vmem, (tm, tk, tn)),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_tpu",
    )(offsets, group_ids, tile_ids, lhs, rhs)
    return out[:m, :n]


# ----------------------------------------------------------------------------- tgmm

def _tgmm_call(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype, tiling: Tiling | None,
               interpret) -> jax.Array:
    """Transposed grouped matmul `[G, k, n]`: pad, build visits, run the Pallas kernel, slice."""
    m, k = lhs.shape
    n = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    narrow = _narrowest(lhs.dtype, rhs.dtype, out_dtype)
    tm, tk, tn = default_tiling(m, k, n, narrow) if tiling is None else check_tiling(tiling, m, k, n, narrow)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    precision = _precision(compute_dtype)

    lhs = pad_axis(pad_axis(lhs, 0, mp), 1, kp)  # [mp, kp]
    rhs = pad_axis(pad_axis(rhs, 0, mp), 1, np_)  # [mp, np]
    offsets = group_offsets(group_sizes, m)
    group_ids, tile_ids, num_visits = make_visits(offsets, tiles_m, tm, visit_empty_groups=True,
                                                  visit_tail_tiles=False)
    dims = (((0,), (0,)), ((), ()))  # lhs [tm, tk]^T x rhs [tm, tn] -> [tk, tn]

    def kernel(offs_ref, gid_ref, tile_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        v = pl.program_id(2)
        last_v = pl.num_programs(2) - 1
        gid, tile = gid_ref[v], tile_ref[v]
        start, end = offs_ref[gid], offs_ref[gid + 1]
        row0 = tile * tm
        first_visit = (v == 0) | (gid_ref[jnp.maximum(v - 1, 0)] != gid)
        last_visit = (v == last_v) | (gid_ref[jnp.minimum(v + 1, last_v)] != gid)
        full = (start <= row0) & (row0 + tm <= end)

        @pl.when(first_visit)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        def accumulate(x, y):
            acc_ref[...] += lax.dot_general(x.astype(compute_dtype), y.astype(compute_dtype), dims,
                                            precision=precision, preferred_element_type=jnp.float32)

        @pl.when((end > start) & full)
        def _whole_tile():
            accumulate(lhs_ref[...], rhs_ref[...])

        @pl.when((end > start) & jnp.logical_not(full))
        def _shared_tile():
            x, y = lhs_ref[...], rhs_ref[...]
            x = jnp.where(_row_mask(x.shape, row0, start, end), x, jnp.zeros_like(x))
            y = jnp.where(_row_mask(y.shape, row0, start, end), y, jnp.zeros_like(y))
            accumulate(x, y)

        @pl.when(last_visit)
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(k_i, n_i, v, offs, gids, tids):
        return tids[v], k_i

    def rhs_map(k_i, n_i, v, offs, gids, tids):
        return tids[v], n_i

    def out_map(k_i, n_i, v, offs, gids, tids):
        return gids[v], k_i, n_i

    isz = lambda d: jnp.dtype(d).itemsize  # noqa: E731
    vmem = (2 * tm * tk * isz(lhs.dtype) + 2 * tm * tn * isz(rhs.dtype) + 2 * tk * tn * isz(out_dtype)
            + 2 * tk * tn * 4 + 2 * tm * (tk + tn) * 4)  # blocks + acc, dot result, masked/transposed operands
    cost = pl.CostEstimate(
        flops=2 * mp * kp * np_, transcendentals=0,
        bytes_accessed=(tiles_n * lhs.size * isz(lhs.dtype) + tiles_k * rhs.size * isz(rhs.dtype)
                        + num_groups * kp * np_ * isz(out_dtype)))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_k, tiles_n, num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), rhs_map)],
            out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary"), vmem, (tm, tk, tn)),
        interpret=interpret,
        cost_estimate=cost,
        name="tgmm_tpu",
    )(offsets, group_ids, tile_ids, lhs, rhs)
    return out[:, :k, :n]


# ----------------------------------------------------------------------------- public API

def _check_group_sizes(group_sizes: jax.Array) -> None:
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be a 1-D int32 array, got {group_sizes.dtype}{list(group_sizes.shape)}")


def _swap_tiling(tiling: Tiling | None) -> Tiling | None:
    """(tm, tk, tn) -> (tm, tn, tk): the tiling of a problem whose k and n trade places."""
    return None if tiling is None else (tiling[0], tiling[2], tiling[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret):
    return _gmm_call(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret):
    out = _gmm_call(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, transpose_rhs, interpret, residuals, dout):
    """dlhs = dout @ rhs[g]^T (a gmm with transpose_rhs flipped); drhs = a tgmm."""
    lhs, rhs, group_sizes = residuals
    swapped = _swap_tiling(tiling)  # dlhs contracts over n and produces k columns
    dlhs = _gmm_call(dout, rhs, group_sizes, lhs.dtype, swapped, not transpose_rhs, interpret)
    if transpose_rhs:  # rhs[g] is [n, k]: drhs[g] = dout_g^T @ lhs_g
        drhs = _tgmm_call(dout, lhs, group_sizes, rhs.dtype, swapped, interpret)
    else:  # drhs[g] = lhs_g^T @ dout_g
        drhs = _tgmm_call(lhs, dout, group_sizes, rhs.dtype, tiling, interpret)
    return dlhs, drhs, None  # integer group_sizes: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "tiling", "transpose_rhs", "interpret"))
def gmm_tpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
            tiling: Tiling | None = None, transpose_rhs: bool = False, interpret=False) -> jax.Array:
    """Grouped matmul on TPU: `out[rows_g] = lhs[rows_g] @ rhs[g]`, `[m, n]`.

    lhs `[m, k]`; rhs `[G, k, n]` (`[G, n, k]` with `transpose_rhs`); group_sizes `[G]`
    int32 (may be traced). Rows past `sum(group_sizes)` are zero (and get zero
    gradient). float32 accumulation; output dtype `preferred_element_type` or lhs's.
    `tiling` is (tm, tk, tn) (default: `default_tiling`); `interpret` is passed to
    `pl.pallas_call` (False: Mosaic, True: HLO interpreter, or `pltpu.InterpretParams`).
    Differentiable in lhs and rhs.
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"expected lhs [m, k] and rhs [G, k, n], got {lhs.shape} and {rhs.shape}")
    _check_group_sizes(group_sizes)
    k_axis = 2 if transpose_rhs else 1
    if rhs.shape[k_axis] != lhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"shape mismatch: lhs {lhs.shape}, rhs {rhs.shape} (transpose_rhs={transpose_rhs}), "
                         f"group_sizes {group_sizes.shape}")
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if 0 in (lhs.shape[0], lhs.shape[1], n):
        return jnp.zeros((lhs.shape[0], n), out_dtype)
    return _gmm(lhs, rhs, group_sizes, out_dtype, tiling, transpose_rhs, interpret)


@functools.partial(jax.jit, static_argnames=("num_groups", "preferred_element_type", "tiling", "interpret"))
def tgmm_tpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
             preferred_element_type=None, tiling: Tiling | None = None, interpret=False) -> jax.Array:
    """Transposed grouped matmul on TPU: `out[g] = lhs[rows_g].T @ rhs[rows_g]`, `[G, k, n]`.

    lhs `[m, k]`, rhs `[m, n]`, group_sizes `[G]` int32. Empty groups give zeros;
    rows past `sum(group_sizes)` are ignored. `num_groups` (default G, at most G)
    keeps only the first groups. Other arguments as in `gmm_tpu`. Not differentiable
    (it is the backward of `gmm_tpu`).
    """
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"expected lhs [m, k] and rhs [m, n], got {lhs.shape} and {rhs.shape}")
    _check_group_sizes(group_sizes)
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    if not 0 < num_groups <= group_sizes.shape[0]:
        raise ValueError(f"num_groups={num_groups} must be in [1, {group_sizes.shape[0]}]")
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    m, k = lhs.shape
    n = rhs.shape[1]
    if 0 in (m, k, n):
        return jnp.zeros((num_groups, k, n), out_dtype)
    return _tgmm_call(lhs, rhs, group_sizes[:num_groups], out_dtype, tiling, interpret)


__all__ = ["DEFAULT_TILING", "check_tiling", "default_tiling", "gmm_tpu", "group_offsets", "make_visits",
           "tgmm_tpu"]
