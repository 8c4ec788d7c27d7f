"""The public `gmm` / `tgmm` pick a kernel per platform: one jitted function lowers to the Mosaic
kernel for TPU and the Triton kernel for CUDA, and runs the interpreted TPU kernel on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.kernels import gmm, tgmm

from helpers import lower_text


def _inputs(m=96, k=64, n=48, sizes=(20, 0, 41, 15)):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.float32)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _loss(fn):
    return lambda lhs, rhs, gs: jnp.sum(fn(lhs, rhs, gs) ** 2)


def test_cpu_runs_the_interpreted_kernel_like_ragged_dot():
    lhs, rhs, gs = _inputs()  # the sizes sum to 76 < 96: the tail stays zero
    got = jax.jit(gmm)(lhs, rhs, gs)
    want = jax.lax.ragged_dot(lhs, rhs, gs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[76:] == 0)
    g_got = jax.grad(_loss(gmm), argnums=(0, 1))(lhs, rhs, gs)
    g_want = jax.grad(_loss(jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs, gs)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    dout = jnp.ones((96, 48), jnp.float32)
    np.testing.assert_allclose(tgmm(lhs, dout, gs), jax.grad(lambda r: jnp.sum(jax.lax.ragged_dot(lhs, r, gs)))(rhs),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_one_function_lowers_to_each_backends_kernel(platform, marker):
    args = (jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16), jax.ShapeDtypeStruct((8, 512, 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    text = lower_text(jax.grad(_loss(gmm), argnums=(0, 1)), args, platform)
    assert text.count(marker) == 3  # forward, dlhs (gmm of the transposed weights), drhs (tgmm)


def test_bad_backend_and_tiling_keys_are_refused():
    lhs, rhs, gs = _inputs()
    with pytest.raises(ValueError, match="backend"):
        gmm(lhs, rhs, gs, backend="rocm")
    with pytest.raises(ValueError, match="tiling keys"):
        gmm(lhs, rhs, gs, tiling={"tpuv5": (128, 128, 128)})
    out = gmm(lhs, rhs, gs, tiling={"tpu": (8, 128, 128), "gpu": (16, 16, 16)})
    np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
