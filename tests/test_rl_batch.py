"""RL batches (`rl.batch`) and the RL loss on the model (`rl.loss`): episodes of the real engine packed into
rows keep each episode's tokens, masks, rollout log-probabilities, advantages and images; the trainer's
log-probabilities of a packed batch equal the engine's at every answer token (so packing, segments and
M-RoPE agree with the engine's cache); the loss and its gradient do not change with the packing; episodes
that cannot be trained are skipped and counted; with routing replay the batch carries the engine's experts
per token and a trainer whose router would choose others still gives the engine's log-probabilities."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import IMAGE_KEYS, Sampling
from glm5v_jax.models.mmtp import shift_left
from glm5v_jax.rl.batch import RowLayout, build_batch, group_advantages, round_metrics
from glm5v_jax.rl.controller import Group, Round
from glm5v_jax.rl.loss import next_token_logprobs, rl_loss
from glm5v_jax.rl.objectives import objective
from glm5v_jax.rl.rollout import Episode, RolloutDriver
from glm5v_jax.rl.tasks import FAMILIES
from glm5v_jax.rl.types import Score
from glm5v_jax.rl.rewards import Scored
from helpers import chat_model, chat_tokenizer

SPEC = objective("grpo", tis_cap=2.0)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    """(model, groups): 3 groups of 3 sampled episodes (count, colour and a text-free-answer family) from the
    real engine over a random small model, with made-up distinct rewards."""
    tokenizer = chat_tokenizer(tmp_path_factory.mktemp("tok"))
    model = chat_model(tokenizer, seed=1)
    engine = Engine(model, max_slots=8, max_seq_len=160, tokenizer=tokenizer, record_routing=True)
    driver = RolloutDriver(engine, tokenizer, max_new_tokens=12, sampling=Sampling(1.0, seed=3))
    tasks = [FAMILIES[f].make(0, i) for i, f in enumerate(("shapes/count", "shapes/colour", "charts/bar"))]
    episodes = driver.run(tasks, n=3)
    groups = []
    for g in range(3):
        eps = episodes[3 * g:3 * g + 3]
        scores = [Scored(Score(float(v)), "x", {}, {}) for v in (g == 0, 0.5, 0.25 * g)]
        groups.append(Group(eps[0].task, eps, scores, [None] * 3))
    return model, groups


@pytest.mark.parametrize("ranks", [1, 2])
def test_packed_rows_keep_every_episode(rollout, ranks):
    model, groups = rollout
    layout = RowLayout(rows=4, seq_len=160, max_images=4, max_patches=model.spec.vision.max_patches,
                       patch_dim=model.spec.vision.patch_size ** 2 * 3, ranks=ranks)
    batch, stats = build_batch(groups, SPEC, layout, max_new_tokens=12, version=5)
    episodes = [e for g in groups for e in g.episodes]
    adv = np.concatenate(group_advantages(SPEC, groups, 12))
    assert stats.episodes == 9 and not stats.skipped and stats.rows_used < 9  # packed: several per row
    found = 0
    for r in range(layout.rows):
        slot = 0
        for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
            where = np.flatnonzero(batch["segment_ids"][r] == seg)
            assert (np.diff(where) == 1).all()  # contiguous
            toks = batch["tokens"][r, where].tolist()
            i = next(i for i, e in enumerate(episodes) if e.tokens == toks)
            e = episodes[i]
            assert batch["loss_mask"][r, where].tolist() == e.loss_mask
            np.testing.assert_array_equal(batch["rollout_logp"][r, where], np.float32(e.logp_raw))
            np.testing.assert_allclose(batch["advantages"][r, where], adv[i])
            lag = batch["version_lag"][r, where][np.asarray(e.loss_mask)]
            np.testing.assert_array_equal(lag, 5.0)  # sampled at version 0, trained at 5
            for image in e.image_slots:  # the row's own slots, in order of appearance
                for k in IMAGE_KEYS:
                    np.testing.assert_array_equal(batch[k][r * layout.max_images + slot], image[k][0])
                slot += 1
            found += 1
        assert batch["image_valid"][r * layout.max_images:(r + 1) * layout.max_images].sum() == slot
    assert found == 9
    if ranks == 2:  # each rank's pair of rows: the three packed rows are spread over both (2 + 1, not 3 + 0)
        used = (batch["segment_ids"] != 0).any(1)
        assert stats.rows_used == 3 and used[:2].any() and used[2:].any()
    # advantages: GRPO over each group's rewards (sample std)
    r0 = np.array([1.0, 0.5, 0.0])
    np.testing.assert_allclose(adv[:3], (r0 - r0.mean()) / (r0.std(ddof=1) + 1e-6), rtol=1e-5)


def test_trainer_logprobs_of_a_packed_batch_equal_the_engines(rollout):
    model, groups = rollout
    layout = RowLayout(rows=3, seq_len=160, max_images=4, max_patches=model.spec.vision.max_patches,
                       patch_dim=model.spec.vision.patch_size ** 2 * 3)
    batch, stats = build_batch(groups, SPEC, layout, max_new_tokens=12)
    assert stats.episodes == 9 and stats.rows_used < 9
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    logp = np.asarray(next_token_logprobs(model(b), b))
    mask = np.asarray(shift_left(b["loss_mask"], 1))  # position i predicts token i+1
    expected = np.asarray(shift_left(b["rollout_logp"], 1))
    assert mask.sum() > 20
    np.testing.assert_allclose(logp[mask], expected[mask], atol=2e-4)


def test_loss_and_gradient_do_not_change_with_packing(rollout):
    model, groups = rollout
    common = dict(seq_len=160, max_patches=model.spec.vision.max_patches,
                  patch_dim=model.spec.vision.patch_size ** 2 * 3)
    packed, s1 = build_batch(groups, SPEC, RowLayout(rows=3, max_images=4, **common), max_new_tokens=12)
    single, s2 = build_batch(groups, SPEC, RowLayout(rows=9, max_images=1, **common), max_new_tokens=12)
    assert s1.rows_used < 9 and s2.rows_used == 9  # one image slot per row: one episode per row

    batches = []
    for batch in (packed, single):
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        outputs = model(b)
        # a reference policy: the same model's log-probs, perturbed (the KL term has something to see)
        b["ref_logp"] = next_token_logprobs(outputs, b) - 0.05 * shift_left(b["loss_mask"], 1)
        batches.append((b, outputs))
    for spec in (SPEC, objective("dapo"), objective("gspo"), dataclasses.replace(SPEC, kl_beta=0.1)):
        (v1, m1), (v2, m2) = (rl_loss(o, b, objective=spec, num_segments=161) for b, o in batches)
        np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m1["rl/kl_ref"], m2["rl/kl_ref"], rtol=1e-5)
        assert float(m1["tokens/targets"]) == float(m2["tokens/targets"]) > 20

    gspo_kl = dataclasses.replace(objective("gspo"), kl_beta=0.1)  # sequence ratios and the KL term

    def loss(m, batch):
        return rl_loss(m(batch), batch, objective=gspo_kl, num_segments=161)[0]

    # the gradient on one group (3 episodes: packed in one row, or one per row), to keep the test cheap
    two = [build_batch(groups[:1], SPEC, RowLayout(rows=r, max_images=m, **common), max_new_tokens=12)[0]
           for r, m in ((1, 4), (3, 1))]
    grads = []
    for batch in two:
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        assert int(b["segment_ids"].max()) == (3 if len(b["tokens"]) == 1 else 1)
        b["ref_logp"] = next_token_logprobs(model(b), b) - 0.05 * shift_left(b["loss_mask"], 1)
        grads.append(jax.tree.leaves(nnx.grad(loss)(model, b)))
    g1, g2 = grads
    scale = max(float(jnp.max(jnp.abs(g))) for g in g1)
    assert scale > 0
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, atol=1e-4 * scale)


def test_untrainable_episodes_are_skipped_and_counted(rollout):
    model, groups = rollout
    common = dict(max_patches=model.spec.vision.max_patches, patch_dim=model.spec.vision.patch_size ** 2 * 3)
    no_images = RowLayout(rows=9, seq_len=160, max_images=0, **common)
    _, stats = build_batch(groups, SPEC, no_images, max_new_tokens=12)
    assert stats.episodes == 0 and stats.skipped == {"too_many_images": 9}
    few_rows = RowLayout(rows=1, seq_len=160, max_images=1, **common)
    batch, stats = build_batch(groups, SPEC, few_rows, max_new_tokens=12)
    assert stats.episodes == 1 and stats.skipped == {"no_room": 8} and batch["segment_ids"].max() == 1
    empty = Episode(groups[0].task, 0, tokens=[1, 2, 3], loss_mask=[False] * 3, logp_raw=[0.0] * 3,
                    versions=[-1] * 3)
    g = Group(groups[0].task, [empty, empty], [Scored(Score(0.0), "x", {}, {}), Scored(Score(1.0), "x", {}, {})],
              [None, None])
    _, stats = build_batch([g], SPEC, few_rows, max_new_tokens=12)
    assert stats.skipped == {"no_answer_tokens": 2}


def test_round_metrics_cover_accepted_and_filtered_groups(rollout):
    model, groups = rollout
    rnd = Round(groups[:2], filtered=1, filtered_groups=groups[2:], aborted=2, abort_reason="count")
    layout = RowLayout(4, 160, 4, model.spec.vision.max_patches, model.spec.vision.patch_size ** 2 * 3)
    _, stats = build_batch(groups[:2], SPEC, layout, max_new_tokens=12)
    m = round_metrics(rnd, stats)
    assert m["rollout/shapes/count/reward_mean"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert m["rollout/charts/bar/reward_mean"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert m["rollout/all/reward_mean"] == pytest.approx(np.mean([1, .5, 0, 0, .5, .25, 0, .5, .5]))
    assert m["rollout/filtered"] == 1 and m["rollout/aborted"] == 2 and m["rollout/abort_count"] == 1
    assert m["rollout/shapes/count/pass@1"] == pytest.approx(1 / 3) and "rollout/all/pass@3" in m


def test_routing_replay_gives_the_engines_logprobs_to_a_router_that_would_choose_otherwise(rollout):
    """The engine recorded each fed token's experts; packed as `expert_ids` (-1 on the last token, never
    fed, and on padding) they steer the trainer's MoE layers: with a correction bias that makes every
    router pick other experts (selection only; weights use the unbiased scores), the forward with replay
    still equals the engine's log-probabilities at every answer token, and the one without does not."""
    model, groups = rollout
    spec = model.spec.backbone
    layout = RowLayout(rows=4, seq_len=160, max_images=4, max_patches=model.spec.vision.max_patches,
                       patch_dim=model.spec.vision.patch_size ** 2 * 3,
                       routing=(spec.num_moe_layers, spec.experts_per_token))
    batch, stats = build_batch(groups, SPEC, layout, max_new_tokens=12)
    ids, seg = batch["expert_ids"], batch["segment_ids"]
    assert ids.shape == (4, 160, spec.num_moe_layers, spec.experts_per_token) and stats.episodes == 9
    for r in range(layout.rows):
        for sg in range(1, int(seg[r].max()) + 1):
            where = np.flatnonzero(seg[r] == sg)
            e = next(e for g in groups for e in g.episodes if e.tokens == batch["tokens"][r, where].tolist())
            assert len(e.expert_ids) == len(e.tokens) - 1  # every token but the last was fed
            np.testing.assert_array_equal(ids[r, where[:-1]], np.stack(e.expert_ids))
            assert (ids[r, where[-1]] == -1).all()
    assert (ids[seg == 0] == -1).all()

    graphdef, state = nnx.split(model)
    biased = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    bias = biased.backbone.moe_layers.mlp.correction_bias
    favour = np.zeros(bias.shape, np.float32)
    favour[:, :spec.experts_per_token] = 100.0  # every router now selects experts 0..k-1
    bias[...] = jnp.asarray(favour)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    mask = np.asarray(shift_left(b["loss_mask"], 1))
    expected = np.asarray(shift_left(b["rollout_logp"], 1))[mask]
    replayed = np.asarray(next_token_logprobs(biased(b), b))[mask]
    own = np.asarray(next_token_logprobs(biased({k: v for k, v in b.items() if k != "expert_ids"}), b))[mask]
    np.testing.assert_allclose(replayed, expected, atol=2e-4)
    assert np.abs(own - expected).max() > 10 * 2e-4  # (a random small model: the experts move logits little)
