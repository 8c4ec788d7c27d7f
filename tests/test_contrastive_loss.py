"""The sigmoid (SigLIP) loss: dense against a NumPy loop; the ring and all-gather distributed
forms against the dense loss (values and gradients, float32, 1e-5) on meshes of 1-8 fake CPU
devices; per-device compiled memory of the ring below the all-gather form as the batch grows."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.losses import sigmoid_contrastive_loss
from glm5v_jax.losses.contrastive import BIAS_INIT, T_PRIME_INIT, sharded_sigmoid_contrastive_loss


def _mesh(shape, axes):
    """Auto axes (the codebase's meshes): shard_map takes unsharded global arrays and splits them."""
    return jax.make_mesh(shape, axes, devices=jax.devices()[:math.prod(shape)],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _embeddings(n, d, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = (0.5 * img + rng.normal(size=(n, d))).astype(np.float32)  # correlated pairs
    return jnp.asarray(img), jnp.asarray(txt)


def test_dense_loss_matches_a_numpy_loop():
    img, txt = _embeddings(6, 5)
    t_prime, b = 1.3, -2.0
    x = np.asarray(img, np.float64) / np.linalg.norm(np.asarray(img, np.float64), axis=1, keepdims=True)
    y = np.asarray(txt, np.float64) / np.linalg.norm(np.asarray(txt, np.float64), axis=1, keepdims=True)
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-z * (np.exp(t_prime) * x[i] @ y[j] + b)))  # -log sigmoid
    assert float(sigmoid_contrastive_loss(img, txt, t_prime, b)) == pytest.approx(total / 6, rel=1e-5)
    # scale-free: embeddings are normalised inside
    assert float(sigmoid_contrastive_loss(3 * img, 0.1 * txt, t_prime, b)) == pytest.approx(total / 6, rel=1e-5)
    assert T_PRIME_INIT == pytest.approx(math.log(10)) and BIAS_INIT == -10.0


def test_shape_errors_name_the_problem():
    img, txt = _embeddings(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_contrastive_loss(img, txt[:3], 0.0, 0.0)
    mesh = _mesh((8,), ("data",))
    with pytest.raises(ValueError, match="does not split over 8 devices"):
        sharded_sigmoid_contrastive_loss(*_embeddings(12, 3), 0.0, 0.0, mesh=mesh, batch_axes="data")
    with pytest.raises(ValueError, match="impl"):
        sharded_sigmoid_contrastive_loss(img, txt, 0.0, 0.0, mesh=mesh, batch_axes="data", impl="chunked")
    with pytest.raises(ValueError, match="batch_axes"):
        sharded_sigmoid_contrastive_loss(img, txt, 0.0, 0.0, mesh=mesh, batch_axes="fsdp")


def _value_and_grads(fn, img, txt, t_prime, b):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(img, txt, jnp.float32(t_prime), jnp.float32(b))


@pytest.mark.parametrize("impl", ["ring", "all_gather"])
@pytest.mark.parametrize("shape,axes", [((1,), ("data",)), ((2,), ("data",)), ((3,), ("data",)),
                                        ((5,), ("data",)), ((8,), ("data",)), ((2, 4), ("data", "fsdp"))])
def test_distributed_loss_and_gradients_equal_the_dense_loss(impl, shape, axes):
    devices = math.prod(shape)
    mesh = _mesh(shape, axes)
    img, txt = _embeddings(4 * devices, 16, seed=devices)
    t_prime, b = T_PRIME_INIT, BIAS_INIT + 7.0  # a bias where positives and negatives both matter

    def sharded(i, t, tp, bb):
        return sharded_sigmoid_contrastive_loss(i, t, tp, bb, mesh=mesh, batch_axes=axes, impl=impl)

    loss, grads = _value_and_grads(sharded, img, txt, t_prime, b)
    ref_loss, ref_grads = _value_and_grads(sigmoid_contrastive_loss, img, txt, t_prime, b)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, g, r in zip(("image", "text", "t_prime", "b"), grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)


def _temp_bytes(impl, per_device, dim, mesh):
    n = per_device * mesh.size
    args = (jax.ShapeDtypeStruct((n, dim), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((), jnp.float32),) * 2

    def loss(i, t, tp, bb):
        return sharded_sigmoid_contrastive_loss(i, t, tp, bb, mesh=mesh, batch_axes="data", impl=impl)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_uses_less_memory_than_gathering_as_the_batch_grows():
    mesh = _mesh((8,), ("data",))
    dim = 32
    ratios = []
    for per_device in (64, 256):
        ring, gathered = _temp_bytes("ring", per_device, dim, mesh), _temp_bytes("all_gather", per_device, dim, mesh)
        assert ring < gathered, (per_device, ring, gathered)
        ratios.append(ring / gathered)
    assert ratios[1] < ratios[0]  # the gap widens with the batch


def test_benchmark_smoke(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    proc = subprocess.run([sys.executable, str(root / "experiments" / "bench_sigmoid_loss.py"), "--smoke"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 32 | 256 |" in proc.stdout and "ring / all-gather" in proc.stdout
