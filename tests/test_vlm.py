"""Model-level acceptance tests: forward/backward, MMTP modes, causality, packing, NaFlex."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.losses.lm import moe_balance_loss, per_segment_mean, target_weights, token_cross_entropy, vlm_loss
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.mmtp import shift_left
from glm5v_jax.models.specs import H0Norm, MTPSpec, TrunkGradient
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.train.step import jit_train_step, make_optimizer

from helpers import IMAGE_ID, config_module, small_batch, small_spec

vlm_pretrain = config_module("vlm_pretrain")


def _flat_grads(grads, prefix):
    return [v for p, v in nnx.to_flat_state(nnx.state(grads)) if p[0] == prefix]


def test_tiny_preset_forward_backward_bf16_packed_images_and_text():
    """The tiny preset (bf16 compute, f32 params) trains on 2 packed rows with 3 images
    of different aspect ratios plus text-only documents; all parts get finite gradients."""
    spec = vlm_spec_from_config(vlm_pretrain.get_config("tiny").model)
    assert spec.backbone.dtype == jnp.bfloat16
    model = GLM5V(spec, rngs=nnx.Rngs(0))
    batch = small_batch(rows=2, seq_len=128, image_sizes=[(64, 128), (128, 48), (80, 80)],
                        max_patches=spec.vision.max_patches, vocab_size=spec.backbone.vocab_size)
    assert int(batch["segment_ids"].max()) >= 3  # image docs and text docs share rows
    opt = make_optimizer(model, 1e-3)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    metrics = jit_train_step(model, opt, batch)
    assert np.isfinite(float(metrics["loss/total"])) and np.isfinite(float(metrics["grad_norm"]))
    assert 4.0 < float(metrics["loss/main"]) < 12.0  # about log(8192) = 9 at init
    after = nnx.state(model, nnx.Param)
    for (path, v0), (_, v1) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        assert v1.dtype == jnp.float32, path
    changed = {p[0] for (p, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))
               if not np.array_equal(np.asarray(a), np.asarray(b))}
    assert {"vision", "projector", "backbone", "mtp"} <= changed


_forward = nnx.jit(lambda model, batch: model(batch))


def _mtp_loss(model, batch):
    return vlm_loss(model(batch), batch)[1]["loss/mtp"]


@pytest.mark.parametrize("mode,trunk,expect_zero", [
    ("image_token", "isolate_vision", True),  # an ablation option of ours
    ("mask", "isolate_vision", True),
    ("visual_embed", "isolate_vision", False),
    ("image_token", "stop", True),
    ("mask", "stop", True),
    ("visual_embed", "stop", False),
    ("image_token", "full", False),  # the default, plain DeepSeek-V3: through the trunk into vision
    ("visual_embed", "full", False),
])
def test_mtp_loss_gradient_reaching_vision(mode, trunk, expect_zero):
    """image_token / mask: no gradient of the MTP loss reaches CogViT or the projector
    (exactly zero) with the ablation options trunk_gradient='isolate_vision' and 'stop';
    visual_embed sends gradient straight through the MTP input. With 'full' (the default,
    the report's design), MTP gradients reach vision through the trunk in every mode."""
    model = GLM5V(small_spec(mode=mode, trunk=trunk), rngs=nnx.Rngs(1))
    batch = small_batch()
    grads = nnx.jit(nnx.grad(_mtp_loss))(model, batch)
    leaves = _flat_grads(grads, "vision") + _flat_grads(grads, "projector")
    assert leaves
    if expect_zero:
        for v in leaves:
            assert not np.any(np.asarray(v)), "MTP loss reached the vision tower"
    else:
        assert sum(float(jnp.abs(v).sum()) for v in leaves) > 0
        assert all(np.isfinite(np.asarray(v)).all() for v in leaves)


def test_isolate_vision_keeps_trunk_gradients_and_main_vision_gradients():
    """isolate_vision changes no forward value; the MTP loss trains the backbone exactly as
    with 'full'; the vision tower gets exactly the main loss's gradient."""
    batch = small_batch()

    def grads(trunk, which):
        model = GLM5V(small_spec(mode="image_token", trunk=trunk), rngs=nnx.Rngs(9))

        def loss(m, b):
            _, metrics = vlm_loss(m(b), b)
            return metrics[which]
        return nnx.jit(nnx.value_and_grad(loss))(model, batch)

    (l_iso, g_iso), (l_full, g_full) = grads("isolate_vision", "loss/mtp"), grads("full", "loss/mtp")
    assert float(l_iso) == float(l_full)
    bb_iso, bb_full = _flat_grads(g_iso, "backbone"), _flat_grads(g_full, "backbone")
    assert sum(float(jnp.abs(v).sum()) for v in bb_iso) > 0
    for a, b in zip(bb_iso, bb_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert sum(float(jnp.abs(v).sum()) for v in _flat_grads(g_full, "vision")) > 0
    _, g_total = grads("isolate_vision", "loss/total")
    _, g_main = grads("isolate_vision", "loss/main")
    for a, b in zip(_flat_grads(g_total, "vision"), _flat_grads(g_main, "vision")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_image_token_mode_feeds_shared_image_embedding():
    """With image_token, the MTP stream's input for every visual token is the one
    shared <|image|> row of the embedding table (no vision feature)."""
    model = GLM5V(small_spec(mode="image_token"), rngs=nnx.Rngs(2))
    batch = small_batch()
    out = _forward(model, batch)
    emb_k = np.asarray(out["mtp_inputs"][0])  # e_{i+1} at position i
    next_visual = np.asarray(shift_left(out["is_visual"], 1, fill=False)) & (np.asarray(out["mtp_segments"][0]) != 0)
    assert next_visual.sum() >= 4
    row = np.asarray(model.backbone.embed[...][IMAGE_ID])
    np.testing.assert_array_equal(emb_k[next_visual], np.broadcast_to(row, emb_k[next_visual].shape))
    # visual_embed feeds the projected features instead: those differ per position.
    model.mtp.spec = small_spec(mode="visual_embed").mtp
    emb_v = np.asarray(_forward(model, batch)["mtp_inputs"][0])[next_visual]
    assert np.abs(emb_v - row).max() > 1e-3


def test_mask_mode_ignores_visual_positions():
    """mask: inputs at visual positions (pixels, their hidden states, their embeddings)
    never change the MTP loss, and visual positions are out of the MTP stream, so no
    query attends to them."""
    model = GLM5V(small_spec(mode="mask", depths=2), rngs=nnx.Rngs(3))
    batch = small_batch()
    out = _forward(model, batch)
    vis = np.asarray(out["is_visual"])
    for k, seg_k in enumerate(out["mtp_segments"], start=1):
        seg_k = np.asarray(seg_k)
        assert not seg_k[vis].any()  # a visual position is never a query or a key
        assert not seg_k[np.asarray(shift_left(out["is_visual"], k, fill=True))].any()
    h0, _ = model.backbone.run_layers(model.backbone.embed_tokens(batch["tokens"]),
                                      model.positions(batch), batch["segment_ids"])
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(size=h0.shape) * 5, h0.dtype)
    visual = out["is_visual"][..., None]

    def mtp_logits(h, embeds):
        logits, segs, _, _ = model.mtp(model.backbone, h, batch["tokens"], embeds, model.positions(batch),
                                       batch["segment_ids"], out["is_visual"])
        return [np.where(np.asarray(s)[..., None] != 0, np.asarray(lg), 0) for lg, s in zip(logits, segs)]

    embeds = model.backbone.embed_tokens(batch["tokens"])
    base = mtp_logits(h0, embeds)
    perturbed = mtp_logits(jnp.where(visual, h0 + noise, h0), jnp.where(visual, embeds + noise, embeds))
    for a, b in zip(base, perturbed):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # New pixels change the vision features scattered into the backbone input, yet with the
    # trunk's h0 fixed the MTP head sees nothing of them.
    pixels = dict(batch, patches=batch["patches"] + 3.0)
    feats = _forward(model, pixels)  # still runs; main logits change, MTP input embeddings do not
    assert not np.allclose(np.asarray(feats["logits"]), np.asarray(out["logits"]))
    for a, b in zip(out["mtp_inputs"], feats["mtp_inputs"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["image_token", "visual_embed", "mask"])
def test_labels_at_visual_positions_never_count(mode):
    """No loss term (main or any MTP depth) has a visual token as its target."""
    model = GLM5V(small_spec(mode=mode, depths=2), rngs=nnx.Rngs(4))
    batch = small_batch()
    out = _forward(model, batch)
    vis = out["is_visual"]
    for shift, seg in [(1, None)] + [(k + 1, s) for k, s in enumerate(out["mtp_segments"], start=1)]:
        w = np.asarray(target_weights(batch["segment_ids"], vis, shift, stream_segments=seg))
        assert w.sum() > 0
        assert not w[np.asarray(shift_left(vis, shift, fill=True))].any()
    # And the loss is blind to logits at positions whose target is visual.
    target_visual = shift_left(vis, 1, fill=True)[..., None]
    out2 = dict(out, logits=jnp.where(target_visual, out["logits"] * 7.0 + 3.0, out["logits"]))
    assert float(vlm_loss(out, batch)[1]["loss/main"]) == float(vlm_loss(out2, batch)[1]["loss/main"])


def test_causality_main_and_mtp_depths():
    """Changing tokens after position t leaves main logits at <= t unchanged; MTP depth k
    at position i depends on no token beyond i + k."""
    model = GLM5V(small_spec(depths=2), rngs=nnx.Rngs(5))
    rng = np.random.default_rng(1)
    s = 24
    tokens = rng.integers(16, 128, (1, s)).astype(np.int32)
    base = dict(tokens=jnp.asarray(tokens), segment_ids=jnp.ones((1, s), jnp.int32))
    ref = _forward(model, base)
    for t in (3, 11, 20):
        changed = tokens.copy()
        changed[0, t + 1:] = rng.integers(16, 128, s - t - 1)
        out = _forward(model, dict(base, tokens=jnp.asarray(changed)))
        np.testing.assert_allclose(out["logits"][0, : t + 1], ref["logits"][0, : t + 1], atol=1e-5)
        assert not np.allclose(out["logits"][0, t + 1:], ref["logits"][0, t + 1:])
        for k, (a, b) in enumerate(zip(out["mtp_logits"], ref["mtp_logits"]), start=1):
            upto = t - k + 1  # positions i with i + k <= t
            if upto > 0:
                np.testing.assert_allclose(a[0, :upto], b[0, :upto], atol=1e-5)
            assert not np.allclose(a[0, upto:s - k], b[0, upto:s - k])


def test_packing_matches_documents_run_alone():
    """Two documents packed in one row give the same per-token (and per-document) main
    and MTP losses as each document alone in its own row (f32, 1e-5)."""
    model = GLM5V(small_spec(depths=1), rngs=nnx.Rngs(6))
    rng = np.random.default_rng(2)
    s, la, lb = 40, 17, 15
    a, b = rng.integers(16, 128, la), rng.integers(16, 128, lb)
    packed, seg_p = np.zeros((1, s), np.int32), np.zeros((1, s), np.int32)
    packed[0, :la], packed[0, la:la + lb] = a, b
    seg_p[0, :la], seg_p[0, la:la + lb] = 1, 2
    alone, seg_a = np.zeros((2, s), np.int32), np.zeros((2, s), np.int32)
    alone[0, :la], alone[1, :lb] = a, b
    seg_a[0, :la], seg_a[1, :lb] = 1, 1

    def per_token(tokens, seg):
        batch = dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
        out = _forward(model, batch)
        vis = out["is_visual"]
        main = token_cross_entropy(out["logits"], shift_left(batch["tokens"], 1))
        w = target_weights(batch["segment_ids"], vis, 1)
        mtp = token_cross_entropy(out["mtp_logits"][0], shift_left(batch["tokens"], 2))
        wm = target_weights(batch["segment_ids"], vis, 2, stream_segments=out["mtp_segments"][0])
        docs = per_segment_mean(main, w, batch["segment_ids"], 2)
        return np.asarray(main * w), np.asarray(mtp * wm), np.asarray(docs)

    main_p, mtp_p, docs_p = per_token(packed, seg_p)
    main_a, mtp_a, docs_a = per_token(alone, seg_a)
    np.testing.assert_allclose(main_p[0, :la], main_a[0, :la], atol=1e-5)
    np.testing.assert_allclose(main_p[0, la:la + lb], main_a[1, :lb], atol=1e-5)
    np.testing.assert_allclose(mtp_p[0, :la], mtp_a[0, :la], atol=1e-5)
    np.testing.assert_allclose(mtp_p[0, la:la + lb], mtp_a[1, :lb], atol=1e-5)
    np.testing.assert_allclose(docs_p[0], [docs_a[0, 0], docs_a[1, 0]], atol=1e-5)


def test_naflex_padding_changes_no_valid_output():
    """CogViT: changing padded patches (and their coordinates) changes no valid output;
    padded outputs are zero."""
    model = GLM5V(small_spec(), rngs=nnx.Rngs(7))
    batch = small_batch()
    valid = np.asarray(batch["patch_valid"])
    assert (~valid).any()
    rng = np.random.default_rng(3)
    noisy = np.where(valid[..., None], np.asarray(batch["patches"]), rng.normal(size=batch["patches"].shape) * 10)
    yx = np.where(valid[..., None], np.asarray(batch["patch_yx"]), rng.integers(0, 50, batch["patch_yx"].shape))
    a = np.asarray(model.vision(batch["patches"], batch["patch_yx"], batch["patch_valid"]))
    b = np.asarray(model.vision(jnp.asarray(noisy, jnp.float32), jnp.asarray(yx), batch["patch_valid"]))
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-5)
    assert not b[~valid].any()
    pooled = np.asarray(model.vision.pool(jnp.asarray(b), batch["patch_valid"]))
    for j in range(b.shape[0]):  # pooling averages valid tokens only
        np.testing.assert_allclose(pooled[j], b[j][valid[j]].mean(0), atol=1e-5)


def test_moe_impls_agree_in_the_model():
    """dense and ragged_dot MoE dispatch give the same VLM loss."""
    batch = small_batch()
    losses = []
    for impl in ("dense", "ragged_dot"):
        model = GLM5V(small_spec(moe_impl=impl), rngs=nnx.Rngs(8))
        losses.append(float(vlm_loss(_forward(model, batch), batch)[0]))
    assert abs(losses[0] - losses[1]) < 1e-5


def test_mtp_defaults_are_the_reports():
    """MTPSpec and the vlm_pretrain config default to trunk_gradient='full' (the report /
    DeepSeek-V3) and h^0 after the final norm (as GLM-4.5's MTP weights are served)."""
    assert MTPSpec().trunk_gradient == TrunkGradient.FULL and MTPSpec().h0_norm == H0Norm.FINAL_NORM
    for preset in vlm_pretrain.PRESETS:
        spec = vlm_spec_from_config(vlm_pretrain.get_config(preset).model)
        assert spec.mtp.trunk_gradient == TrunkGradient.FULL, preset
        assert spec.mtp.h0_norm == H0Norm.FINAL_NORM, preset
    cfg = vlm_pretrain.get_config("tiny,trunk_grad=isolate_vision")
    cfg.model.mtp.h0_norm = "pre_norm"
    spec = vlm_spec_from_config(cfg.model)
    assert spec.mtp.trunk_gradient == TrunkGradient.ISOLATE_VISION and spec.mtp.h0_norm == H0Norm.PRE_NORM


def _with_h0_norm(h0_norm):
    spec = small_spec(depths=2)
    return dataclasses.replace(spec, mtp=dataclasses.replace(spec.mtp, h0_norm=h0_norm))


def test_h0_norm_reads_the_final_norm_only_when_asked():
    """Perturbing the backbone's final-norm scale changes the MTP logits with
    h0_norm='final_norm' and leaves them bit-identical with 'pre_norm' (the main logits
    change in both). 'final_norm' equals 'pre_norm' fed the normed h^0."""
    batch = small_batch()
    rng = np.random.default_rng(11)
    out, perturbed = {}, {}
    for h0_norm in ("final_norm", "pre_norm"):
        model = GLM5V(_with_h0_norm(h0_norm), rngs=nnx.Rngs(12))
        out[h0_norm] = _forward(model, batch)
        scale = model.backbone.final_norm.scale
        scale[...] = scale[...] * jnp.asarray(rng.uniform(0.5, 1.5, scale.shape), scale.dtype)
        perturbed[h0_norm] = _forward(model, batch)
        assert not np.allclose(np.asarray(out[h0_norm]["logits"]), np.asarray(perturbed[h0_norm]["logits"]))
    for a, b in zip(out["pre_norm"]["mtp_logits"], perturbed["pre_norm"]["mtp_logits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k, (a, b) in enumerate(zip(out["final_norm"]["mtp_logits"], perturbed["final_norm"]["mtp_logits"])):
        in_stream = np.asarray(out["final_norm"]["mtp_segments"][k]) != 0
        assert np.abs(np.asarray(a) - np.asarray(b))[in_stream].max() > 1e-4, k
    # The option changes exactly which h^0 enters: final_norm(h) vs h.
    model = GLM5V(_with_h0_norm("final_norm"), rngs=nnx.Rngs(13))
    tokens, seg = batch["tokens"], batch["segment_ids"]
    is_visual = tokens == IMAGE_ID
    embeds = model.backbone.embed_tokens(tokens)
    positions = model.positions(batch)
    h, _ = model.backbone.run_layers(embeds, positions, seg)
    args = (tokens, embeds, positions, seg, is_visual)
    got = model.mtp(model.backbone, h, *args)[0]
    model.mtp.spec = dataclasses.replace(model.mtp.spec, h0_norm="pre_norm")
    want = model.mtp(model.backbone, model.backbone.final_norm(h), *args)[0]
    unnormed = model.mtp(model.backbone, h, *args)[0]
    for g, w, u in zip(got, want, unnormed):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(g), np.asarray(u))


def test_moe_balance_loss_averages_backbone_and_mtp_layers():
    """Each MoE layer counts once: (L * backbone mean + sum of MTP blocks) / (L + D_moe)."""
    outputs = {"aux": {"balance_loss": jnp.float32(2.0), "expert_load": jnp.zeros((3, 4))},
               "mtp_aux": [{"balance_loss": jnp.float32(6.0)}, {"balance_loss": jnp.float32(10.0)}]}
    balance, metrics = moe_balance_loss(outputs)
    np.testing.assert_allclose(float(balance), (3 * 2.0 + 6.0 + 10.0) / 5, rtol=1e-6)
    assert float(metrics["loss/balance_mtp_2"]) == 10.0 and float(metrics["loss/balance_backbone"]) == 2.0
    dense_mtp = dict(outputs, mtp_aux=[{}])  # a dense MTP block adds nothing
    assert float(moe_balance_loss(dense_mtp)[0]) == 2.0
    assert moe_balance_loss({"aux": {}, "mtp_aux": [{}]})[0] is None  # no MoE anywhere


def test_mtp_block_balance_loss_enters_the_total():
    """With balance_loss_weight > 0 and an MoE MTP block, the total's balance term is the
    weight times the mean over backbone and MTP MoE layers, and it moves when only the MTP
    block's router changes."""
    batch = small_batch()
    model = GLM5V(small_spec(), rngs=nnx.Rngs(14))
    assert model.mtp.depths[0].block.is_moe
    weight = 0.5

    def terms():
        out = _forward(model, batch)
        with_bal, metrics = vlm_loss(out, batch, balance_loss_weight=weight)
        without, _ = vlm_loss(out, batch, balance_loss_weight=0.0)
        return float(with_bal) - float(without), metrics

    term0, m0 = terms()
    layers = model.spec.backbone.num_moe_layers
    want = (layers * float(m0["loss/balance_backbone"]) + float(m0["loss/balance_mtp_1"])) / (layers + 1)
    np.testing.assert_allclose(float(m0["loss/balance"]), want, rtol=1e-6)
    np.testing.assert_allclose(term0, weight * want, rtol=1e-4)
    router = model.mtp.depths[0].block.mlp.router
    router[...] = router[...] * 5.0 + 0.3 * jnp.arange(router.shape[-1], dtype=router.dtype)
    term1, m1 = terms()
    assert float(m1["loss/balance_backbone"]) == float(m0["loss/balance_backbone"])
    assert abs(float(m1["loss/balance_mtp_1"]) - float(m0["loss/balance_mtp_1"])) > 1e-3
    assert abs(term1 - term0) > 1e-4
    np.testing.assert_allclose(term1, weight * float(m1["loss/balance"]), rtol=1e-4)
