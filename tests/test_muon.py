"""Muon: routing over the real model, update RMS, per-expert orthogonalisation, momentum,
and a training step through nnx.Optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.layers.params import normal, param
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.muon import SCALE_MODES, muon, muon_momentum, orthogonality_error, orthogonalize
from glm5v_jax.optim.newton_schulz import newton_schulz
from glm5v_jax.optim.routing import MatrixSpec, format_table, route
from glm5v_jax.losses.lm import vlm_loss

from helpers import small_batch, small_spec


@pytest.fixture(scope="module")
def model():
    return GLM5V(small_spec(), rngs=nnx.Rngs(0))


def test_routing_of_the_vlm(model):
    table = route(model)
    by = {"/".join(k): v for k, v in table.items()}
    adam = {k for k, v in by.items() if v is None}
    for name in ("backbone/embed", "backbone/head", "vision/patch_embed", "vision/mask_token",
                 "backbone/moe_layers/mlp/router", "backbone/final_norm/scale", "vision/patch_bias",
                 "backbone/dense_layers/attn/q_bias", "projector/fc1_bias"):
        assert name in adam, name
    assert by["backbone/dense_layers/attn/q"] == MatrixSpec((0,), (1,), (2, 3))  # [L, embed, heads, kv]
    assert by["backbone/dense_layers/attn/o"] == MatrixSpec((0,), (1, 2), (3,))  # [L, heads, kv, embed]
    assert by["backbone/moe_layers/mlp/gate"] == MatrixSpec((0, 1), (2,), (3,))  # [L, exp, embed, mlp]
    assert by["backbone/moe_layers/mlp/down"] == MatrixSpec((0, 1), (2,), (3,))  # [L, exp, mlp, embed]
    assert by["mtp/depths/0/eh_proj"] == MatrixSpec((), (0,), (1,))
    assert by["mtp/depths/0/block/attn/q"] == MatrixSpec((), (0,), (1, 2))
    assert by["projector/fc1"] == MatrixSpec((), (0,), (1,))
    assert by["vision/blocks/mlp/fc1"] == MatrixSpec((0,), (1,), (2,))
    assert not any("correction_bias" in k for k in by)  # not a Param: never optimised
    text = format_table(model, scale_fn=SCALE_MODES["rms"])
    assert "backbone/embed" in text and "adamw" in text and "muon" in text


def test_unnamed_matrix_is_an_error():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 3)))

    with pytest.raises(ValueError, match="w .* no logical axis names"):
        route(Bare())

    class Odd(nnx.Module):
        def __init__(self):
            self.w = param(nnx.Rngs(0), normal(), (4, 3), ("mlp", "heads"))

    with pytest.raises(ValueError, match="w .* matches no Muon routing rule"):
        route(Odd())


def test_update_rms_and_per_expert_orthogonalisation():
    g = jax.random.normal(jax.random.key(0), (3, 64, 256))  # [exp, in, out]
    spec = MatrixSpec((0,), (1,), (2,))
    table = {("w",): spec}
    tx = orthogonalize(table, lambda x: newton_schulz(x, dtype=jnp.float32), "rms")
    out, _ = tx.update({"w": g}, tx.init({"w": g}))
    rms = np.sqrt(np.mean(np.square(np.asarray(out["w"])), axis=(1, 2)))
    np.testing.assert_allclose(rms, 0.2, rtol=0.1)  # Moonlight matching: RMS 0.2 per matrix
    for e in range(3):  # each expert on its own
        np.testing.assert_allclose(out["w"][e], newton_schulz(g[e], dtype=jnp.float32) * 0.2 * 16, atol=1e-5)
    spectral = orthogonalize(table, lambda x: newton_schulz(x, dtype=jnp.float32), "spectral")
    o2, _ = spectral.update({"w": g}, spectral.init({"w": g}))
    np.testing.assert_allclose(o2["w"], out["w"] / (0.2 * 16) * 2.0, atol=1e-5)  # sqrt(256/64)


def test_nesterov_momentum_matches_reference():
    tx = muon_momentum(beta=0.9)
    g1, g2 = jnp.array([1.0, -2.0]), jnp.array([0.5, 4.0])
    s = tx.init(g1)
    u1, s = tx.update(g1, s)
    u2, s = tx.update(g2, s)
    m1 = 0.1 * g1
    m2 = 0.9 * m1 + 0.1 * g2
    np.testing.assert_allclose(u1, 0.1 * g1 + 0.9 * m1, rtol=1e-6)
    np.testing.assert_allclose(u2, 0.1 * g2 + 0.9 * m2, rtol=1e-6)


def test_train_step_with_muon(model):
    table = route(model)
    opt = nnx.Optimizer(model, muon(0.02, table, adam_learning_rate=1e-3), wrt=nnx.Param)
    batch = small_batch()

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(lambda m: vlm_loss(m(batch), batch)[0])(model)
        opt.update(model, grads)
        return loss

    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    losses = [float(step(model, opt, batch)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = nnx.state(model, nnx.Param)
    q0 = np.asarray(before["backbone"]["dense_layers"]["attn"]["q"][...])
    q1 = np.asarray(after["backbone"]["dense_layers"]["attn"]["q"][...])
    assert not np.allclose(q0, q1)


def test_orthogonality_error_measures_distance_to_the_polar_factor():
    x = jax.random.normal(jax.random.key(0), (64, 192))
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    assert float(orthogonality_error(x, u @ vt)) < 1e-5
    errors = {p: float(orthogonality_error(x, newton_schulz(x, p, dtype=jnp.float32)))
              for p in ("jordan", "you", "polar_express")}
    assert errors["you"] < errors["polar_express"] < errors["jordan"] < 0.25, errors
    # A rank-4 input: only its 4 signal directions count (f32 Newton-Schulz leaves the rest near 0) ...
    low = jax.random.normal(jax.random.key(1), (64, 4)) @ jax.random.normal(jax.random.key(2), (4, 192))
    assert float(orthogonality_error(low, newton_schulz(low, dtype=jnp.float32))) < 0.25
    # ... while bf16 rounding noise, amplified by the iteration, shows up as a large error.
    assert float(orthogonality_error(low, newton_schulz(low, dtype=jnp.bfloat16))) > 0.5


def test_split_heads_orthogonalises_each_head(model):
    table = route(model, split_heads=True)
    by = {"/".join(k): v for k, v in table.items()}
    assert by["backbone/dense_layers/attn/q"] == MatrixSpec((0, 2), (1,), (3,))  # [L, embed, heads, kv]
    assert by["backbone/dense_layers/attn/o"] == MatrixSpec((0, 1), (2,), (3,))  # [L, heads, kv, embed]
    assert by["backbone/dense_layers/mlp/gate"] == route(model)[("backbone", "dense_layers", "mlp", "gate")]
    assert by["backbone/dense_layers/attn/q_bias"] is None
    g = jax.random.normal(jax.random.key(3), (2, 32, 4, 16))  # [L, embed, heads, kv]
    tx = orthogonalize({("q",): MatrixSpec((0, 2), (1,), (3,))}, lambda x: newton_schulz(x, dtype=jnp.float32),
                       "spectral")
    out, _ = tx.update({"q": g}, tx.init({"q": g}))
    for layer in range(2):
        for head in range(4):
            np.testing.assert_allclose(out["q"][layer, :, head], newton_schulz(g[layer, :, head], dtype=jnp.float32),
                                       atol=1e-5)
