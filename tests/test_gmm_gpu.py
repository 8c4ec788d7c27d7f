"""The GPU (Pallas Triton) grouped matmul, on CPU: interpret mode against ragged_dot / the f32 reference,
CUDA lowering at the default tiling, tiling validation.

Shapes are tiny and the jitted functions are shared (group sizes are traced arguments, so new sizes
reuse a compile); tilings of 16/32 give several tiles per dimension.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.kernels.gmm_gpu import DEFAULT_TILING, check_tiling, gmm_gpu, tgmm_gpu
from glm5v_jax.kernels.reference import gmm_reference

from helpers import lower_text, rel_err

M, K, N = 100, 96, 80  # m not a tile multiple; k, n not powers of two
SIZES = [30, 0, 41, 20, 0]  # empty groups, sizes off the tiles, sum 91 < M (tail rows)
TILING = (32, 32, 16)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@jax.jit
def _reference(lhs, rhs, group_sizes, dout):
    """ragged_dot in f32 (inputs upcast): out [m, n], dlhs [m, k], drhs [G, k, n]."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, group_sizes), f32(lhs), f32(rhs))
    return (out, *vjp(f32(dout)))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs"))
def _kernel(lhs, rhs, group_sizes, dout, tiling=TILING, transpose_rhs=False):
    """gmm_gpu in interpret mode: out, dlhs, drhs (drhs in rhs's layout)."""
    def f(a, b):
        return gmm_gpu(a, b, group_sizes, tiling=tiling, transpose_rhs=transpose_rhs, interpret=True)
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(dout))


def _data(dtype, m=M, k=K, n=N, groups=len(SIZES), seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return draw(m, k), draw(groups, k, n), draw(m, n)


def _check(dtype, sizes, transpose_rhs=False, **shape):
    """Forward and both gradients of the kernel vs ragged_dot; tail rows zero with zero gradient."""
    lhs, rhs, dout = _data(dtype, groups=len(sizes), **shape)
    gs = jnp.asarray(sizes, jnp.int32)
    ref = _reference(lhs, rhs, gs, dout)
    rhs_in = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out, dlhs, drhs = _kernel(lhs, rhs_in, gs, dout, transpose_rhs=transpose_rhs)
    if transpose_rhs:
        drhs = jnp.swapaxes(drhs, 1, 2)
    assert (out.dtype, dlhs.dtype, drhs.dtype) == (dtype, dtype, dtype)
    for name, got, want in zip(("out", "dlhs", "drhs"), (out, dlhs, drhs), ref):
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= TOL[dtype], (name, rel_err(got, want))
    total = sum(sizes)
    assert not np.asarray(out[total:]).any() and not np.asarray(dlhs[total:]).any()
    return out, lhs, rhs, gs


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_f32_forward_and_grads(transpose_rhs):
    """f32, empty groups, ragged sizes, tail rows, k/n not powers of two; also the f32 jnp reference."""
    out, lhs, rhs, gs = _check(jnp.float32, SIZES, transpose_rhs)
    assert rel_err(out, gmm_reference(lhs, rhs, gs)) <= 1e-5


def test_gmm_traced_group_sizes_reuse_one_compile():
    """New group sizes (one full group, all rows in the last, all empty) run through the same compile."""
    _check(jnp.float32, SIZES)
    before = _kernel._cache_size()
    _check(jnp.float32, [M, 0, 0, 0, 0])
    _check(jnp.float32, [0, 0, 0, 0, M])
    out, *_ = _check(jnp.float32, [0, 0, 0, 0, 0])
    assert not np.asarray(out).any()
    assert _kernel._cache_size() == before


def test_gmm_bf16_forward_and_grads():
    _check(jnp.bfloat16, SIZES)


def test_gmm_single_group_default_tiling():
    """One group covering m rows, at DEFAULT_TILING (clamped to the small dims) and preferred f32."""
    lhs, rhs, _ = _data(jnp.bfloat16, m=200, k=64, n=128, groups=1)
    gs = jnp.array([200], jnp.int32)
    out = jax.jit(lambda a, b, g: gmm_gpu(a, b, g, preferred_element_type=jnp.float32, interpret=True))(lhs, rhs, gs)
    assert out.dtype == jnp.float32
    assert rel_err(out, lhs.astype(jnp.float32) @ rhs[0].astype(jnp.float32)) <= 1e-5


def test_tgmm_direct():
    """tgmm: per-group lhs.T @ rhs, zeros for empty groups and for num_groups past len(group_sizes)."""
    lhs, _, dout = _data(jnp.float32)
    gs = jnp.asarray(SIZES, jnp.int32)
    got = jax.jit(lambda a, b, g: tgmm_gpu(a, b, g, num_groups=6, tiling=TILING, interpret=True))(lhs, dout, gs)
    ends = np.cumsum(SIZES)
    want = np.zeros((6, K, N), np.float32)
    for g, (start, end) in enumerate(zip(ends - SIZES, ends)):
        want[g] = np.asarray(lhs[start:end]).T @ np.asarray(dout[start:end])
    assert got.shape == (6, K, N)
    assert rel_err(got, want) <= 1e-5
    assert not np.asarray(got)[[1, 4, 5]].any()


def _lower_cuda(fn, *args) -> str:
    return lower_text(fn, args, "cuda")  # an abstract H100 target; the 0.11 Triton warning silenced


@pytest.mark.parametrize("dtype,transpose_rhs", [(jnp.bfloat16, False), (jnp.float32, True)])
def test_lowers_for_cuda_at_default_tiling(dtype, transpose_rhs):
    """Forward and grad (gmm, transposed gmm, tgmm) lower to Triton calls at full-size default tiles."""
    m, k, n, groups = 512, 256, 384, 8
    spec = jax.ShapeDtypeStruct
    args = (spec((m, k), dtype), spec((groups, n, k) if transpose_rhs else (groups, k, n), dtype),
            spec((groups,), jnp.int32))

    def loss(a, b, g):
        return gmm_gpu(a, b, g, transpose_rhs=transpose_rhs).astype(jnp.float32).sum()

    assert _lower_cuda(lambda a, b, g: gmm_gpu(a, b, g, transpose_rhs=transpose_rhs), *args).count(
        "__gpu$xla.gpu.triton") == 1
    assert _lower_cuda(jax.grad(loss, argnums=(0, 1)), *args).count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("tiling", [(48, 32, 32), (8, 32, 32), (32, 32), (32, 32, 32.0), (True, 32, 32), "abc", 32])
def test_illegal_tiling_raises(tiling):
    lhs, rhs, dout = _data(jnp.float32, m=32, k=32, n=32, groups=2)
    gs = jnp.array([16, 16], jnp.int32)
    with pytest.raises(ValueError, match="tiling"):
        gmm_gpu(lhs, rhs, gs, tiling=tiling)
    with pytest.raises(ValueError, match="tiling"):
        tgmm_gpu(lhs, dout, gs, tiling=tiling)


def test_check_tiling_accepts_powers_of_two():
    assert check_tiling(DEFAULT_TILING) == DEFAULT_TILING
    assert check_tiling([16, np.int64(256), 64]) == (16, 256, 64)
