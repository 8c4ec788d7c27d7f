"""`gmm` / `tgmm`: grouped matmuls for MoE, one entry point, a Pallas kernel per backend.

    out = gmm(lhs [m, k], rhs [G, k, n], group_sizes [G])        -> [m, n]
    drhs = tgmm(lhs [m, k], dout [m, n], group_sizes [G])         -> [G, k, n]

Group g owns the rows `[sum(sizes[:g]), sum(sizes[:g+1]))`; rows past the sum are zero
(and get no gradient). `gmm` is differentiable (custom VJP: dlhs is a gmm against the
transposed weights, drhs a tgmm). Ground truth: `reference.gmm_reference` and
`jax.lax.ragged_dot`.

Backend choice (`backend=None`) happens at lowering time with
`jax.lax.platform_dependent`: tpu -> `gmm_tpu` (Mosaic, scalar-prefetched group
metadata), cuda -> `gmm_gpu` (Pallas Triton, group offsets read in the kernel),
cpu -> the TPU kernel under the HLO interpreter, other -> `jax.lax.ragged_dot`.
`backend="tpu" | "gpu"` forces one kernel; `interpret` runs it (TPU by default) in an
interpreter. Every branch is traced, so `tiling` must be legal for all of them or be a
mapping `{"tpu": (tm, tk, tn), "gpu": (tm, tk, tn)}`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from glm5v_jax.kernels.gmm_tpu import gmm_tpu, tgmm_tpu

BACKENDS = ("tpu", "gpu")


def _gpu():
    from glm5v_jax.kernels import gmm_gpu  # Triton; imported on use

    return gmm_gpu


def _tiling_for(tiling, backend: str):
    if isinstance(tiling, Mapping):
        unknown = set(tiling) - set(BACKENDS)
        if unknown:
            raise ValueError(f"tiling keys must be in {BACKENDS}; got {sorted(unknown)}")
        return tiling.get(backend)
    return tiling


def _check_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}; got {backend!r}")


def _ragged_dot_gmm(lhs, rhs, group_sizes, *, preferred_element_type, transpose_rhs):
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    tiling=None,
    transpose_rhs: bool = False,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:
    """Grouped matmul `[m, k] x [G, k, n] -> [m, n]` (rhs `[G, n, k]` with transpose_rhs)."""
    _check_backend(backend)
    kw = dict(preferred_element_type=preferred_element_type, transpose_rhs=transpose_rhs)
    if backend == "gpu":
        return _gpu().gmm_gpu(lhs, rhs, group_sizes, tiling=_tiling_for(tiling, "gpu"), interpret=interpret, **kw)
    tpu = functools.partial(gmm_tpu, tiling=_tiling_for(tiling, "tpu"), **kw)
    if backend == "tpu" or interpret:
        return tpu(lhs, rhs, group_sizes, interpret=interpret)
    gpu = functools.partial(_gpu().gmm_gpu, tiling=_tiling_for(tiling, "gpu"), interpret=False, **kw)
    return jax.lax.platform_dependent(
        lhs, rhs, group_sizes,
        tpu=functools.partial(tpu, interpret=False), cuda=gpu, cpu=functools.partial(tpu, interpret=True),
        default=functools.partial(_ragged_dot_gmm, **kw),
    )


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    tiling=None,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:
    """Per-group `lhs[rows_g].T @ rhs[rows_g]`: `[m, k] x [m, n] -> [G, k, n]` (the weight gradient)."""
    _check_backend(backend)
    kw = dict(num_groups=num_groups, preferred_element_type=preferred_element_type)
    if backend == "gpu":
        return _gpu().tgmm_gpu(lhs, rhs, group_sizes, tiling=_tiling_for(tiling, "gpu"), interpret=interpret, **kw)
    tpu = functools.partial(tgmm_tpu, tiling=_tiling_for(tiling, "tpu"), **kw)
    if backend == "tpu" or interpret:
        return tpu(lhs, rhs, group_sizes, interpret=interpret)
    gpu = functools.partial(_gpu().tgmm_gpu, tiling=_tiling_for(tiling, "gpu"), interpret=False, **kw)
    return jax.lax.platform_dependent(
        lhs, rhs, group_sizes,
        tpu=functools.partial(tpu, interpret=False), cuda=gpu, cpu=functools.partial(tpu, interpret=True),
        default=functools.partial(_tgmm_reference, num_groups=num_groups,
                                  preferred_element_type=preferred_element_type),
    )


def _tgmm_reference(lhs, rhs, group_sizes, *, num_groups, preferred_element_type):
    """Pure-jnp tgmm for platforms without a kernel: a masked einsum per group."""
    g = num_groups or group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
    onehot = jax.nn.one_hot(row_group, g, dtype=jnp.float32)  # rows past the sum match no group
    out = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    return out.astype(preferred_element_type or lhs.dtype)
