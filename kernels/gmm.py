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

import jax
import jax.numpy as jnp

from glm5v_jax.kernels.dispatch import for_backend, run_on_platform
from glm5v_jax.kernels.gmm_tpu import gmm_tpu, tgmm_tpu


def _gpu(name: str, tiling, **kw):
    """A thunk importing the Triton kernel `name` of `gmm_gpu` on use."""
    def load():
        from glm5v_jax.kernels import gmm_gpu

        return functools.partial(getattr(gmm_gpu, name), tiling=for_backend(tiling, "gpu", "tiling"), **kw)
    return load


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
    kw = dict(preferred_element_type=preferred_element_type, transpose_rhs=transpose_rhs)
    return run_on_platform(
        (lhs, rhs, group_sizes),
        tpu=functools.partial(gmm_tpu, tiling=for_backend(tiling, "tpu", "tiling"), **kw),
        gpu=_gpu("gmm_gpu", tiling, **kw), fallback=functools.partial(_ragged_dot_gmm, **kw),
        backend=backend, interpret=interpret)


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
    kw = dict(num_groups=num_groups, preferred_element_type=preferred_element_type)
    return run_on_platform(
        (lhs, rhs, group_sizes),
        tpu=functools.partial(tgmm_tpu, tiling=for_backend(tiling, "tpu", "tiling"), **kw),
        gpu=_gpu("tgmm_gpu", tiling, **kw), fallback=functools.partial(_tgmm_reference, **kw),
        backend=backend, interpret=interpret)


def _tgmm_reference(lhs, rhs, group_sizes, *, num_groups, preferred_element_type):
    """Pure-jnp tgmm for platforms without a kernel: a masked einsum per group."""
    g = num_groups or group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
    onehot = jax.nn.one_hot(row_group, g, dtype=jnp.float32)  # rows past the sum match no group
    out = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    return out.astype(preferred_element_type or lhs.dtype)
