"""QK-Clip: per-head max-logit tracking in the model and the clip transform (glm5v_jax.optim.qk_clip)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import config_module, small_batch, small_spec

from glm5v_jax import kernels
from glm5v_jax.layers.attention import Attention, register_attention_impl
from glm5v_jax.layers.rope import Rotary
from glm5v_jax.layers.stack import scan_layers, stacked
from glm5v_jax.losses.lm import vlm_loss
from glm5v_jax.models.backbone import GLMBackbone
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.specs import BackboneSpec
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.qk_clip import (
    apply_qk_clip,
    clip_params,
    head_scales,
    qk_clip,
    qk_clip_metrics,
    qk_clip_targets,
)

from glm5v_jax.train.step import train_step
from glm5v_jax.train.vlm_pretrain import build_optimizer

vlm_pretrain = config_module("vlm_pretrain")

B, S, E, D = 2, 7, 16, 8
# Row 0: two documents then padding; row 1: three documents, no padding.
SEG = np.array([[1, 1, 1, 2, 2, 0, 0],
                [1, 1, 2, 2, 2, 2, 3]], np.int32)


def _visible(causal, seg, s=S):
    """Boolean `[B, S, T]`: may query s see key t (causal, same non-zero segment)."""
    ok = np.ones((B, s, s), bool)
    if causal:
        ok &= np.tril(np.ones((s, s), bool))[None]
    if seg is not None:
        ok &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    return ok


def _naive_logits(q, k, scale):
    """Explicit loops (float64): logits `[B, H, S, T]` with GQA (head h reads kv h // G)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, s, h, _ = q.shape
    t, kv = k.shape[1], k.shape[2]
    out = np.zeros((b, h, s, t))
    for bi in range(b):
        for hi in range(h):
            for si in range(s):
                for ti in range(t):
                    out[bi, hi, si, ti] = scale * q[bi, si, hi] @ k[bi, ti, hi // (h // kv)]
    return out


def _naive_max(q, k, visible, scale):
    logits = _naive_logits(q, k, scale)
    return np.where(visible[:, None], logits, -np.inf).max(axis=(0, 2, 3))  # [H]


# ---------------------------------------------------------------- tracking


@pytest.mark.parametrize("causal,segments", [(True, True), (False, True), (True, False)])
def test_max_logits_match_brute_force(causal, segments):
    """attention_reference(return_max_logits) and attention_max_logits equal explicit loops over the
    visible pairs (causal, segments, padding excluded); the output is unchanged."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, S, 4, D)).astype(np.float32) * 3
    k = rng.standard_normal((B, S, 2, D)).astype(np.float32) * 3
    v = rng.standard_normal((B, S, 2, D)).astype(np.float32)
    seg = SEG if segments else None
    seg_ids = None if seg is None else jnp.asarray(seg)
    kw = {"causal": causal, "q_segment_ids": seg_ids, "kv_segment_ids": seg_ids, "scale": 0.3}
    want = _naive_max(q, k, _visible(causal, seg), 0.3)
    out, got = jax.jit(lambda q, k, v: kernels.attention_reference(q, k, v, return_max_logits=True, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kernels.attention_max_logits(q, k, **kw)), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(kernels.attention_reference(q, k, v, **kw)))
    # A padding query row holding the largest logit does not count.
    if segments:
        q_pad = q.copy()
        q_pad[0, 6] = 100.0
        got_pad = kernels.attention_max_logits(q_pad, k, **kw)
        np.testing.assert_allclose(np.asarray(got_pad), want, rtol=1e-5)


def test_max_logits_all_padding_is_minus_inf():
    z = jnp.zeros((1, 3, 2, 4))
    seg = jnp.zeros((1, 3), jnp.int32)
    got = kernels.attention_max_logits(z, z, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert np.all(np.isneginf(np.asarray(got)))


def _no_max_core(q, k, v, **kw):
    return kernels.attention_reference(q, k, v, **kw)


register_attention_impl("test_without_max_logits", _no_max_core)


def _rotary(s=S, rotary_dim=D // 2):
    pos = jnp.broadcast_to(jnp.arange(s)[None, :, None], (B, s, 1))
    return Rotary(rotary_dim).cos_sin(pos)


@pytest.mark.parametrize("impl", ["xla", "test_without_max_logits"])
def test_attention_tracking_changes_neither_outputs_nor_gradients(impl):
    """Layer level, for a core that reports the max itself (xla) and for one that does not (the
    generic fallback): same output and parameter gradients with and without tracking, and the max
    equals the brute force on the layer's q and k."""
    layer = Attention(E, 4, 2, D, qkv_bias=True, impl=impl, init_std=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, S, E))
    r = jax.random.normal(jax.random.key(2), (B, S, E))
    rot, seg = _rotary(), jnp.asarray(SEG)

    def loss(m, track):
        y = m(x, rotary=rot, segment_ids=seg, causal=True, return_max_logits=track)
        y, ml = (y if track else (y, None))
        return jnp.sum(y * r), (y, ml)

    grad = nnx.jit(nnx.grad(loss, has_aux=True), static_argnums=1)
    g0, (y0, _) = grad(layer, False)
    g1, (y1, ml) = grad(layer, True)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    for (p, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7, err_msg=str(p))
    q, k = layer.queries_keys(x, rot)
    want = _naive_max(q, k, _visible(True, SEG), D**-0.5)
    assert ml.shape == (4,) and ml.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ml), want, rtol=1e-5)


_TINY = BackboneSpec(vocab_size=64, embed_dim=32, num_layers=3, first_k_dense=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, num_experts=4, experts_per_token=2, moe_mlp_dim=16, qk_norm=False,
                     mrope_sections=None, init_std=0.2)


def test_backbone_reports_stacked_max_logits_without_changing_outputs():
    """GLMBackbone with track_max_logits: aux `attn_max_logits` {dense_layers [1, H], moe_layers [2, H]},
    keyed by qk_clip_targets paths; logits and gradients equal those of the untracked model."""
    tokens = jax.random.randint(jax.random.key(0), (B, S), 0, 64)
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    seg = jnp.asarray(SEG)

    def run(track):
        model = GLMBackbone(dataclasses.replace(_TINY, track_max_logits=track), rngs=nnx.Rngs(0))

        def loss(m):
            logits, _, aux = m(tokens, positions, seg)
            return jnp.sum(logits * (seg != 0)[..., None]) * 1e-3, (logits, aux)

        grads, (logits, aux) = nnx.jit(nnx.grad(loss, has_aux=True))(model)
        return model, grads, logits, aux

    _, g0, l0, aux0 = run(False)
    model, g1, l1, aux1 = run(True)
    assert "attn_max_logits" not in aux0
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l0))
    for (p, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        # two programs (with and without the max-logit outputs) fuse differently: float32 rounding
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7, err_msg=str(p))
    ml = aux1["attn_max_logits"]
    assert ml["dense_layers"].shape == (1, 4) and ml["moe_layers"].shape == (2, 4)
    by_path = model.attention_max_logits(aux1)
    assert set(by_path) == set(qk_clip_targets(model)) == {"dense_layers/attn", "moe_layers/attn"}
    with pytest.raises(ValueError, match="track_max_logits"):
        model.attention_max_logits(aux0)


def test_config_key_reaches_the_spec():
    cfg = vlm_pretrain.get_config("tiny")
    assert vlm_spec_from_config(cfg.model).backbone.track_max_logits is False
    with cfg.unlocked():
        cfg.model.backbone.track_max_logits = True
    assert vlm_spec_from_config(cfg.model).backbone.track_max_logits is True


# ---------------------------------------------------------------- the clip


class _Holder(nnx.Module):
    def __init__(self, layers):
        self.layers = layers


def _stack(num_heads, num_kv_heads, num_layers=2, seed=0):
    def make(r):
        return Attention(E, num_heads, num_kv_heads, D, qkv_bias=True, init_std=0.5, rngs=r)

    layers = stacked(make, num_layers, nnx.Rngs(seed))
    # Non-zero biases, so that the test sees them scaled too.
    for name in ("q_bias", "k_bias"):
        var = getattr(layers, name)
        var[...] = 0.3 * jax.random.normal(jax.random.key(seed + 7), var.shape)
    return _Holder(layers)


@nnx.jit
def _stack_stats(model, x):
    """Every layer of the stack on the same input x: max logits `[L, H]`, logits `[L, B, H, S, T]`."""
    rot, seg = _rotary(), jnp.asarray(SEG)

    def body(layer, carry):
        _, ml = layer(carry, rotary=rot, segment_ids=seg, causal=True, return_max_logits=True)
        q, k = layer.queries_keys(carry, rot)
        g = q.shape[2] // k.shape[2]
        logits = jnp.einsum("bshd,bthd->bhst", q, jnp.repeat(k, g, axis=2)) * D**-0.5
        return carry, (ml, logits)

    _, (ml, logits) = scan_layers(model.layers, x, body)
    return ml, logits


def _params(model):
    return nnx.as_pure(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_clip_caps_max_logit_at_tau_on_a_scanned_stack(num_heads, num_kv_heads):
    """Zero updates through qk_clip on an [L, ...] stack: afterwards every clipped head's max logit
    equals tau, each head's logits are scaled by exactly gamma_h = min(1, tau/S_h), and heads
    (MHA) / kv groups (GQA) that need no clip keep their weights bit for bit."""
    model = _stack(num_heads, num_kv_heads)
    x = jax.random.normal(jax.random.key(3), (B, S, E))
    ml, logits = map(np.asarray, _stack_stats(model, x))
    tau = float(np.median(ml))
    clipped = ml > tau
    assert clipped.any() and (~clipped).any()
    g = num_heads // num_kv_heads
    if g > 1:  # the interesting GQA case: a group with one head clipped and one not
        grouped = clipped.reshape(-1, g)
        assert (grouped.any(-1) & ~grouped.all(-1)).any()

    targets = qk_clip_targets(model)
    assert targets == ("layers",)
    params = _params(model)
    tx = qk_clip(tau, targets=targets)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params, max_logits={"layers": jnp.asarray(ml)})
    before = jax.tree.map(np.asarray, params)
    nnx.update(model, optax.apply_updates(params, updates))
    ml2, logits2 = map(np.asarray, _stack_stats(model, x))

    gamma = np.where(clipped, tau / ml, 1.0)  # [L, H]
    np.testing.assert_allclose(ml2[clipped], tau, rtol=1e-5)
    np.testing.assert_allclose(ml2[~clipped], ml[~clipped], rtol=1e-5)
    vis = _visible(True, SEG)[None, :, None]  # [1, B, 1, S, T]
    want = logits * gamma[:, None, :, None, None]
    np.testing.assert_allclose(np.where(vis, logits2, 0), np.where(vis, want, 0), rtol=1e-4, atol=1e-4)

    after = jax.tree.map(np.asarray, _params(model))["layers"]
    before = before["layers"]
    np.testing.assert_array_equal(after["v"], before["v"])
    np.testing.assert_array_equal(after["o"], before["o"])
    if g == 1:
        for layer in range(ml.shape[0]):
            keep = ~clipped[layer]
            for name in ("q", "k"):
                np.testing.assert_array_equal(after[name][layer][:, keep], before[name][layer][:, keep])
            np.testing.assert_array_equal(after["q_bias"][layer][keep], before["q_bias"][layer][keep])
            # MHA: Kimi's rule, both sides scaled by sqrt(gamma).
            s = np.sqrt(gamma[layer])
            np.testing.assert_allclose(after["k"][layer], before["k"][layer] * s[None, :, None], rtol=1e-6)
            np.testing.assert_allclose(after["q_bias"][layer], before["q_bias"][layer] * s[:, None], rtol=1e-6)
    else:
        untouched = ~clipped.reshape(ml.shape[0], num_kv_heads, g).any(-1)  # [L, KV]
        for layer in range(ml.shape[0]):
            kv_keep = untouched[layer]
            q_keep = np.repeat(kv_keep, g)
            np.testing.assert_array_equal(after["k"][layer][:, kv_keep], before["k"][layer][:, kv_keep])
            np.testing.assert_array_equal(after["k_bias"][layer][kv_keep], before["k_bias"][layer][kv_keep])
            np.testing.assert_array_equal(after["q"][layer][:, q_keep], before["q"][layer][:, q_keep])


def test_transform_update_lands_on_clip_of_updated_params():
    """p + qk_clip(u) = clip_params(p + u) for random u; other parameters keep u unchanged."""
    model = _stack(4, 2)
    params = _params(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    u = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
    ml = {"layers": jnp.asarray([[50.0, 120.0, 99.0, 400.0], [101.0, -3.0, 20.0, 30.0]])}
    tx = qk_clip(100.0, targets=["layers"])
    u2, _ = tx.update(u, tx.init(params), params, max_logits=ml)
    got = optax.apply_updates(params, u2)
    want = clip_params(optax.apply_updates(params, u), ml, targets=["layers"], tau=100.0)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree_util.tree_flatten_with_path(want)[0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=str(path))
    for name in ("v", "o", "v_bias"):
        np.testing.assert_array_equal(np.asarray(u2["layers"][name]), np.asarray(u["layers"][name]))
    # Layer 1, group 0 holds heads (101, -3): k scaled by sqrt(100/101), q of head 1 by 1/that.
    qs, ks = head_scales(ml["layers"], 2, 100.0)
    np.testing.assert_allclose(np.asarray(ks[1, 0]), np.sqrt(100 / 101), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qs[1, 1] * ks[1, 0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qs * np.repeat(ks, 2, -1)),
                               np.minimum(1.0, 100.0 / np.maximum(np.asarray(ml["layers"]), 1e-9)),
                               rtol=1e-6)
    metrics = qk_clip_metrics(ml, 100.0)
    assert float(metrics["qk_clip/max_logit"]) == 400.0 and int(metrics["qk_clip/clipped_heads"]) == 3


def test_qk_norm_and_bad_arguments_raise():
    normed = _Holder(Attention(E, 2, 2, D, qk_norm=True, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="QK-Norm"):
        qk_clip_targets(normed)
    params = _params(normed)
    ml = {"layers": jnp.full((2,), 500.0)}
    with pytest.raises(ValueError, match="QK-Norm"):
        qk_clip(targets=["layers"]).update(params, optax.EmptyState(), params, max_logits=ml)
    with pytest.raises(ValueError, match="QK-Norm"):
        apply_qk_clip(normed, ml, targets=["layers"])

    model = _stack(4, 2)
    params = _params(model)
    tx = qk_clip(targets=["layers"])
    with pytest.raises(ValueError, match="max_logits"):
        tx.update(params, optax.EmptyState(), params)
    with pytest.raises(ValueError, match="missing"):
        tx.update(params, optax.EmptyState(), params, max_logits={"other/attn": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        tx.update(params, optax.EmptyState(), params, max_logits={"layers": jnp.zeros((4,))})
    with pytest.raises(ValueError, match="tau"):
        qk_clip(0.0, targets=["layers"])
    with pytest.raises(ValueError, match="no parameters"):
        qk_clip(targets=["nowhere"]).update(params, optax.EmptyState(), params, max_logits={"nowhere": 0})


# ---------------------------------------------------------------- training


def _vlm(trunk="isolate_vision"):
    spec = small_spec(trunk=trunk)
    spec = dataclasses.replace(spec, backbone=dataclasses.replace(spec.backbone, qk_norm=False, track_max_logits=True))
    return GLM5V(spec, rngs=nnx.Rngs(0))


def test_vlm_train_step_with_qk_clip_in_an_optax_chain():
    """One jitted nnx.Optimizer step with chain(multi_transform(adamw, ...), qk_clip): max_logits
    reaches qk_clip as an extra argument through nnx.Optimizer, chain and multi_transform, and the
    result equals the same step without qk_clip followed by apply_qk_clip."""
    batch = small_batch()
    model = _vlm()
    with pytest.raises(ValueError, match="QK-Norm"):  # CogViT uses QK-Norm
        qk_clip_targets(model)
    targets = qk_clip_targets(model, prefixes=("backbone", "mtp"))
    assert set(targets) == {"backbone/dense_layers/attn", "backbone/moe_layers/attn", "mtp/depths/0/block/attn"}

    outputs = nnx.jit(lambda m: m(batch))(model)
    ml0 = model.attention_max_logits(outputs)
    assert set(ml0) == set(targets) and ml0["backbone/dense_layers/attn"].shape == (1, 4)
    tau = float(np.median(np.concatenate([np.ravel(v) for v in ml0.values()])))

    def label(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "vision" if p[0].key == "vision" else "rest", params)

    base = optax.multi_transform({"vision": optax.adamw(1e-3), "rest": optax.adamw(1e-2)}, label)
    reference = nnx.clone(model)
    opt = nnx.Optimizer(model, optax.chain(base, qk_clip(tau, targets=targets)), wrt=nnx.Param)
    ref_opt = nnx.Optimizer(reference, base, wrt=nnx.Param)

    def loss_fn(m):
        out = m(batch)
        return vlm_loss(out, batch)[0], out

    @nnx.jit
    def step(m, o):  # the trainer's step: it passes the max logits to the optimizer
        metrics = train_step(m, o, batch, mtp_loss_weight=0.3, balance_loss_weight=0.0, qk_clip_tau=tau)
        return metrics["loss/total"], metrics["qk_clip/clipped_heads"]

    @nnx.jit
    def ref_step(m, o):
        (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        max_logits = m.attention_max_logits(out)
        o.update(m, grads)
        apply_qk_clip(m, max_logits, targets=targets, tau=tau)
        return loss, max_logits, grads

    ref_loss, ml, ref_grads = ref_step(reference, ref_opt)
    loss, clipped = step(model, opt)
    assert int(clipped) == int(qk_clip_metrics(ml, tau)["qk_clip/clipped_heads"])
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert int(qk_clip_metrics(ml, tau)["qk_clip/clipped_heads"]) > 0
    got, want = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(reference, nnx.Param))
    grads = dict(nnx.to_flat_state(nnx.state(ref_grads)))
    for (path, a), (_, b) in zip(got, want):
        # The two programs fuse (and so round) differently, and Adam divides by sqrt(v): an element
        # with a near-zero gradient moves by up to lr (1e-2) on rounding noise alone. A key bias
        # shifts every logit of a query equally, so softmax makes its true gradient exactly 0;
        # any other element can be that small by chance (within 100x of Adam's eps 1e-8).
        # A clipped head's q and k scale by sqrt(tau / max logit), far more than 1e-5.
        tiny = (path[-1] == "k_bias") | (np.abs(np.asarray(grads[path][...])) < 1e-6)
        atol = np.where(tiny, 1e-2, 1e-5)
        np.testing.assert_array_less(np.abs(np.asarray(a[...]) - np.asarray(b[...])),
                                     atol + 1e-5 * np.abs(np.asarray(b[...])) + 1e-12, err_msg=str(path))
    q = nnx.state(model, nnx.Param)["backbone"]["dense_layers"]["attn"]["q"]
    assert np.isfinite(np.asarray(q[...])).all()


def test_trainer_refuses_qk_clip_without_tracking_or_with_qk_norm():
    optim = vlm_pretrain.get_config("tiny").optim
    optim.qk_clip_tau = 50.0
    untracked = small_spec()
    untracked = dataclasses.replace(untracked, backbone=dataclasses.replace(untracked.backbone, qk_norm=False))
    with pytest.raises(ValueError, match="track_max_logits"):
        build_optimizer(GLM5V(untracked, rngs=nnx.Rngs(0)), optim, 10)
    normed = small_spec()
    normed = dataclasses.replace(normed, backbone=dataclasses.replace(normed.backbone, track_max_logits=True))
    with pytest.raises(ValueError, match="qk_norm=False"):
        build_optimizer(GLM5V(normed, rngs=nnx.Rngs(0)), optim, 10)
    opt, _, _ = build_optimizer(_vlm(), optim, 10)
    assert isinstance(opt.tx, optax.GradientTransformationExtraArgs)
