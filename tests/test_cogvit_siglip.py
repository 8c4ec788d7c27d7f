"""CogViT stage 2 (contrastive, sigmoid loss): the text tower's padding invariance, the two
towers' loss scalars and optimizer groups, the trainer's loss against `sigmoid_contrastive_loss`,
the ring loss on a 4-device mesh against the dense one, the zero-shot and retrieval metrics on
synthetic embeddings, a tiny end-to-end run (step-0 baseline, training over two patch budgets,
checkpoint, resume), and the `cogvit` teacher kind built from that run's directory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.train import run as run_lib
from glm5v_jax.losses.contrastive import sigmoid_contrastive_loss
from glm5v_jax.models.teachers.registry import build_teacher
from glm5v_jax.models.text_tower import TextEncoder, TextSpec, caption_mask
from glm5v_jax.models.two_tower import TwoTower, two_tower_spec_from_config
from glm5v_jax.optim.routing import path_key
from glm5v_jax.train import cogvit_siglip as trainer
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.train.writers import read_jsonl

from helpers import config_module

ROOT = Path(__file__).parents[1]
siglip_config = config_module("cogvit_siglip")

VOCAB, PAD = 64, 0


def _small_config(**opts) -> ml_collections.ConfigDict:
    """The tiny preset, narrower and one block deep: cheap to compile on CPU."""
    arg = ",".join(["tiny", "dtype=float32"] + [f"{k}={v}" for k, v in opts.items()])
    cfg = siglip_config.get_config(arg)
    cfg.model.vision.update(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, max_patches=32)
    cfg.model.text.update(embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
    cfg.model.embed_dim = 16
    return cfg


def _model(cfg, seed=0) -> TwoTower:
    spec = two_tower_spec_from_config(cfg.model, vocab_size=VOCAB, pad_id=PAD, eos_id=PAD)
    return TwoTower(spec, rngs=nnx.Rngs(seed))


def _captions(rng, n, text_len):
    """Caption ids (1..VOCAB-1) of random lengths, eos (= pad), then padding."""
    out = np.full((n, text_len), PAD, np.int32)
    for i in range(n):
        m = int(rng.integers(1, text_len - 1))
        out[i, :m] = rng.integers(1, VOCAB, m)
    return out


def _batch(rng, n, n_patches=16, text_len=12):
    side = math.isqrt(n_patches // 2)  # half the slots hold a side x side grid, the rest is padding
    yx = np.zeros((n, n_patches, 2), np.int32)
    yx[:, :side * side] = np.stack(np.divmod(np.arange(side * side), side), -1)
    valid = np.zeros((n, n_patches), bool)
    valid[:, :side * side] = True
    patches = rng.uniform(-1, 1, (n, n_patches, 768)).astype(np.float32) * valid[..., None]
    return {"patches": patches, "patch_yx": yx, "valid": valid, "text": _captions(rng, n, text_len)}


def test_text_tower_ignores_padding():
    spec = TextSpec(vocab_size=VOCAB, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, pad_id=PAD, eos_id=PAD)
    enc = TextEncoder(spec, rngs=nnx.Rngs(0))
    short = _captions(np.random.default_rng(0), 5, 10)
    long = np.concatenate([short, np.full((5, 14), PAD, np.int32)], 1)  # the same captions, more padding
    np.testing.assert_allclose(enc.pool(jnp.asarray(short)), enc.pool(jnp.asarray(long)), rtol=1e-5, atol=1e-6)
    out, mask = enc(jnp.asarray(long))
    n_tokens = (short != PAD).sum(1) + 1  # the caption and its eos
    np.testing.assert_array_equal(np.asarray(mask).sum(1), n_tokens)
    assert not np.asarray(out)[~np.asarray(mask)].any()  # zero outside the caption
    # A different token inside the caption changes the result (the mask is not everything).
    other = long.copy()
    other[:, 0] = (other[:, 0] % (VOCAB - 1)) + 1
    assert not np.allclose(enc.pool(jnp.asarray(other)), enc.pool(jnp.asarray(long)))
    # With distinct eos and pad ids, exactly the non-pad tokens count.
    toks = jnp.asarray([[5, 6, 2, 9, 9]])
    np.testing.assert_array_equal(caption_mask(toks, pad_id=9, eos_id=2), [[True, True, True, False, False]])
    np.testing.assert_array_equal(caption_mask(jnp.asarray([[5, 0, 0, 0]]), 0, 0), [[True, True, False, False]])


def test_loss_scalars_and_optimizer_groups():
    cfg = _small_config()
    model = _model(cfg)
    assert float(model.t_prime[...]) == pytest.approx(math.log(10.0)) and float(model.b[...]) == -10.0
    for name in ("muon", "adamw"):
        cfg.optim.name = name
        from glm5v_jax.train.optimizer import transform_from_config

        _, schedules, labels, _ = transform_from_config(model, cfg.optim, cfg.total_steps)
        params = {path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
        assert set(labels) == params  # every parameter has a group
        for path, label in labels.items():
            joined = "/".join(path)
            want = "vision" if joined.startswith("image/encoder/") else "text" if joined.startswith("text/encoder/") \
                else "projection"
            assert label.split("/")[0] == want, (joined, label)
        assert labels[("t_prime",)].endswith("adamw") and labels[("b",)] == "projection/adamw"
        for g_name, g in cfg.optim.groups.items():  # peak LRs as configured, after the warmup
            assert float(schedules[f"{g_name}/adamw"](g.warmup_steps)) == pytest.approx(g.lr)
            if name == "muon":
                assert float(schedules[f"{g_name}/muon"](g.warmup_steps)) == pytest.approx(g.muon_lr)
    assert cfg.optim.groups.projection.lr != cfg.optim.groups.vision.lr  # module-specific


def test_trainer_loss_is_the_sigmoid_loss_of_the_towers():
    cfg = _small_config()
    model = _model(cfg, seed=1)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(1), 6).items()}
    loss, metrics = trainer.make_loss_fn("dense", None)(model, batch)
    img, txt = model(batch["patches"], batch["patch_yx"], batch["valid"], batch["text"])
    assert img.shape == txt.shape == (6, 16)
    want = sigmoid_contrastive_loss(img, txt, model.t_prime[...], model.b[...])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(metrics["temperature"]) == pytest.approx(10.0) and float(metrics["bias"]) == -10.0


def test_ring_loss_on_a_mesh_matches_dense():
    """The stage's loss on a (data 2, fsdp 2) mesh of config.mesh: ring and all-gather over both batch
    axes give the dense loss and gradients."""
    batch = _batch(np.random.default_rng(2), 8)
    losses, grads = {}, {}
    for impl in ("dense", "ring", "all_gather"):
        cfg = _small_config(loss_impl=impl, optimizer="adamw")
        cfg.mesh.shape, cfg.mesh.num_devices = (2, 2, 1, 1), 4
        plan = run_lib.mesh_plan(cfg)
        assert plan.batch_axes == ("data", "fsdp", "expert")
        model = _model(cfg, seed=3)
        loss_fn = trainer.make_loss_fn(impl, plan)
        placed = jax.device_put(dict(batch), jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec(
            ("data", "fsdp"))))
        (losses[impl], _), g = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, placed)
        grads[impl] = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(g)))
    for impl in ("ring", "all_gather"):
        np.testing.assert_allclose(losses[impl], losses["dense"], rtol=1e-5)
        for a, b in zip(grads[impl], grads["dense"]):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
    with pytest.raises(ValueError, match="config.loss_impl"):
        trainer.make_loss_fn("ringg", plan)


def test_zero_shot_and_retrieval_metrics_on_synthetic_embeddings():
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(8, 32))
    labels = rng.integers(0, 8, 4000)
    images = classes[labels] + 0.05 * rng.normal(size=(4000, 32))
    assert trainer.zero_shot_accuracy(images, classes, labels) == 1.0
    assert abs(trainer.zero_shot_accuracy(images, classes, rng.permutation(labels)) - 1 / 8) < 0.03
    assert math.isnan(trainer.zero_shot_accuracy(images, classes, np.full(4000, -1)))  # no labelled image
    # Prompt ensembling: the class embedding is the mean of its unit prompt embeddings.
    prompts, of = rng.normal(size=(40, 32)), np.repeat(np.arange(8), 5)
    ens = trainer.class_embeddings(prompts, of, 8)
    unit = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    np.testing.assert_allclose(ens[3], unit[15:20].mean(0))

    x = rng.normal(size=(500, 32))
    perfect = trainer.retrieval_recall(x, 2.0 * x)
    assert perfect == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    shuffled = trainer.retrieval_recall(x, x[rng.permutation(500)])
    assert shuffled["i2t_r1"] < 0.02 and shuffled["t2i_r1"] < 0.02 and shuffled["i2t_r5"] < 0.04

    texts, colour, _ = trainer.class_prompts()
    assert len(texts) == 64 * 19 and np.bincount(colour).tolist() == [8 * 19] * 8
    assert "There is a red circle in this picture." in texts and "An orange star on a beige background." in texts


def _run_config(tmp_path, steps):
    cfg = _small_config()
    cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = steps, 1, 100, 2
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.batch_size, cfg.data.text_len = 4, 40
    cfg.mesh.num_devices = 1
    cfg.data.patch_budgets = (32, 16)  # two sequence lengths, cycled
    cfg.data.sources.natural.update(train_size=48, eval_size=8)  # eval part: the retrieval images
    cfg.data.sources.instruction.train_size = 8
    cfg.data.sources.scientific.train_size = 8
    cfg.data.eval_source.update(train_size=8, eval_size=8)  # single objects: k-NN reference, queries
    cfg.data.knn_k = 3
    for g in cfg.optim.groups.values():
        g.warmup_steps = 1
    return cfg


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    """A tiny stage-2 run: 4 steps, then resumed to 6."""
    tmp = tmp_path_factory.mktemp("siglip")
    workdir = tmp / "run"
    first = run_lib.train_and_evaluate(_run_config(tmp, 4), str(workdir))
    rows_after_first = read_jsonl(workdir / "metrics.jsonl")
    run_lib.train_and_evaluate(_run_config(tmp, 6), str(workdir))
    return workdir, first, rows_after_first


def test_tiny_run_logs_baseline_trains_checkpoints_and_resumes(stage2_run):
    workdir, first, rows = stage2_run
    baseline = [r for r in rows if r["step"] == 0]
    keys = ("zero_shot/shape", "zero_shot/colour", "retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/t2i_r1",
            "retrieval/t2i_r5", "knn/shape", "knn/colour")
    assert baseline and all(0.0 <= baseline[0][f"eval/{k}"] <= 1.0 for k in keys)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in train)
    assert [r["train/patch_budget"] for r in train] == [32, 16, 32, 16]
    assert train[0]["train/temperature"] == pytest.approx(10.0) and train[0]["train/bias"] == pytest.approx(-10.0)
    assert first["step"] == 4 and all(f"eval/{k}" in first for k in keys)
    assert (workdir / "checkpoints" / "4").is_dir() and (workdir / "eval_table.md").exists()
    assert "zero_shot/shape" in (workdir / "eval_table.md").read_text()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["trainer"] == "cogvit_siglip" and saved["model"]["text"]["vocab_size"] > 0

    # Resume: the same run with more steps continues from step 4; no second step-0 evaluation.
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["step"] == 0 for r in lines) == 1
    all_rows = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in all_rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["train/patch_budget"] for r in all_rows if "loss" in r][4:] == [32, 16]
    assert "eval/zero_shot/colour" in all_rows[-1]


def test_cogvit_teacher_from_a_stage2_run(stage2_run):
    workdir = stage2_run[0]
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    t = config.model.text
    spec = two_tower_spec_from_config(config.model, vocab_size=t.vocab_size, pad_id=t.pad_id, eos_id=t.eos_id)
    fresh = jax.tree.leaves(nnx.state(TwoTower(spec, rngs=nnx.Rngs(config.seed)).image.encoder))
    placed = trainer.place_on_mesh(config, spec, run_lib.mesh_plan(config), abstract=True).placed
    ckpt = Checkpointer(workdir / "checkpoints")
    step, saved = ckpt.restore_latest(placed.state)[:2]
    ckpt.close()
    encoder = nnx.merge(placed.graphdef, saved).model.image.encoder
    assert step == 6
    trained = jax.tree.leaves(nnx.state(encoder))
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, trained))  # training changed the encoder

    for path in (workdir, workdir / "checkpoints"):
        teacher = build_teacher("stage2", "cogvit", "", checkpoint=str(path))
        assert teacher.dim == config.model.vision.embed_dim and teacher.patch_size == 16
        batch = _batch(np.random.default_rng(4), 3, n_patches=32)
        args = [jnp.asarray(batch[k]) for k in ("patches", "patch_yx", "valid")]
        out = teacher.module(*args)["tokens"]
        assert out.dtype == jnp.float32 and out.shape == (3, 32, config.model.vision.embed_dim)
        assert not np.asarray(out)[~batch["valid"]].any()
        np.testing.assert_array_equal(out, encoder(*args))
    grad = nnx.grad(lambda p, module: module(p, *args[1:])["tokens"].sum())(args[0], teacher.module)
    assert not np.asarray(grad).any()  # frozen: no gradient flows through the teacher
    with pytest.raises(FileNotFoundError):
        build_teacher("stage2", "cogvit", "", checkpoint=str(workdir / "tensorboard"))
