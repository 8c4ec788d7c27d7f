"""The report's training chain on tiny presets, a few steps each, through the one run layer:

    stage 2 (cogvit_siglip) -> stage 1 (cogvit_mim, teacher_run = the stage-2 run)
      -> VLM pre-training (init_from = the stage-1 student's encoder -> vision)
      -> SFT (init_from = the whole pre-trained model)

At step 0 every copied leaf equals its source bit for bit; a wrong SRC and a shape mismatch are
refused before training, naming the paths.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from glm5v_jax.errors import ConfigError
from glm5v_jax.train import run as run_lib
from glm5v_jax.init_from import apply_init_from
from glm5v_jax.train.stages import stage_module
from glm5v_jax.train.writers import read_jsonl

from helpers import config_module, tiny_mim_config

STEPS = 2


def _vlm_data(cfg, data_dir):
    cfg.model.backbone.num_layers = 2  # a dense and a MoE layer (notebooks.SMALL_MODEL); the tower stays whole
    d = cfg.data
    d.data_dir, d.batch_size, d.seq_len, d.tokenizer_vocab_size, d.eval_batches = str(data_dir), 2, 128, 1024, 2
    d.sources.image.update(train_size=32, eval_size=8)
    d.sources.text.update(train_size=16, eval_size=4)
    cfg.mesh.num_devices = 1
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.eval_every = STEPS, 1, STEPS, 0
    cfg.measure_pipeline_batches = 0
    return cfg


def _stage2(data_dir):
    cfg = config_module("cogvit_siglip").get_config("tiny")
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.eval_every = STEPS, 1, STEPS, 0
    cfg.data.data_dir, cfg.data.batch_size, cfg.data.text_len, cfg.data.patch_budgets = str(data_dir), 4, 40, (32,)
    for name, n in (("natural", 16), ("instruction", 8), ("scientific", 8)):
        cfg.data.sources[name].train_size = n
    cfg.mesh.num_devices = 1
    return cfg


def _source_arrays(workdir: epath.Path, *path: str) -> dict[tuple[str, ...], np.ndarray]:
    """{leaf path below `path`: array} of the newest checkpoint's state, read independently of
    init_from (a plain orbax restore of the whole item)."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(steps[-1]) / "state")
    for p in ("model",) + path:
        tree = tree[p]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", k)) for k in kp): np.asarray(v) for kp, v in flat}


def _copied_at_step_zero(cfg, workdir: epath.Path, dst: tuple[str, ...]) -> dict[tuple[str, ...], np.ndarray]:
    """The `dst` subtree of the stage's state right after init_from, as the run layer builds it."""
    plan = run_lib.mesh_plan(cfg)
    job = stage_module(cfg).setup(cfg, workdir, plan)
    state = apply_init_from(cfg.init_from, job.state, job.shardings)
    tree = jax.tree.map(np.asarray, state)
    for p in ("model",) + dst:
        tree = tree[p]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): np.asarray(v) for kp, v in flat}


def _assert_bitwise(copied: dict, source: dict):
    assert copied and set(copied) == set(source), sorted(set(copied) ^ set(source))[:5]
    for key, value in copied.items():
        assert value.dtype == source[key].dtype and np.array_equal(value, source[key]), key


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = epath.Path(tmp_path_factory.mktemp("chain"))
    data = root / "data"
    runs = {name: root / name for name in ("s2", "s1", "pt", "sft")}
    run_lib.train_and_evaluate(_stage2(data), runs["s2"])
    s1 = tiny_mim_config(data, STEPS, options=f"teacher_run={runs['s2']}", train_images=(16, 8, 8),
                         checkpoint_every=STEPS)
    s1.model.vision.depth = 2  # the VLM's tower: copied whole into model.vision
    s1.teachers.siglip2.overrides = ml_collections.ConfigDict(dict(dtype="float32"))  # a run fixes its shape
    run_lib.train_and_evaluate(s1, runs["s1"])
    pt = _vlm_data(config_module("vlm_pretrain").get_config("tiny"), data)
    pt.init_from = f"{runs['s1']}:encoder=vision"
    run_lib.train_and_evaluate(pt, runs["pt"])
    sft = _vlm_data(config_module("vlm_sft").get_config("tiny"), data)
    sft.init_from = str(runs["pt"])
    sft.eval_every = STEPS  # SFT's evaluation (answer accuracy per task) at step 0 and at the end
    # generated answers: off here (nothing below reads them); test_sft_generated_eval runs the same evaluate
    # with them on, one device and a mesh
    sft.data.eval_generate_examples = 0
    sft.rl_eval.update(prompts=1, n=2, max_new_tokens=4, families="shapes/count")  # all families: test_rl_evaluate
    run_lib.train_and_evaluate(sft, runs["sft"])
    return runs, pt, sft


def test_every_stage_of_the_chain_trains(chain):
    runs, _, _ = chain
    for name, workdir in runs.items():
        losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
        assert len(losses) == STEPS and np.all(np.isfinite(losses)), name
    assert (runs["s1"] / "config.json").read_text().count("cogvit")  # stage 1 read the stage-2 tower
    assert (runs["sft"] / "tokenizer.model").read_bytes() == (runs["pt"] / "tokenizer.model").read_bytes()
    evals = {r["step"]: r for r in read_jsonl(runs["sft"] / "metrics.jsonl") if "eval/answer_acc/all" in r}
    assert sorted(evals) == [0, STEPS] and evals[0]["eval/answers/all"] > 0
    assert all(0.0 <= r["eval/answer_acc/all"] <= 1.0 for r in evals.values())
    assert "answer_acc/count" in (runs["sft"] / "eval_table.md").read_text()
    for r in evals.values():  # the RL task families' reward and pass@k (rl.evaluate) at each evaluation
        assert {f"eval/rl/{f}/{m}" for f in ("shapes/count", "all")
                for m in ("reward_mean", "pass@1", "pass@2")} <= set(r)
        assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("eval/rl/"))


def test_copied_leaves_equal_their_source_bit_for_bit_at_step_zero(chain, tmp_path):
    runs, pt, sft = chain
    _assert_bitwise(_copied_at_step_zero(pt, epath.Path(tmp_path) / "pt0", ("vision",)),
                    _source_arrays(runs["s1"], "encoder"))
    _assert_bitwise(_copied_at_step_zero(sft, epath.Path(tmp_path) / "sft0", ()), _source_arrays(runs["pt"]))


def test_wrong_source_and_shape_mismatch_are_refused_before_training(chain, tmp_path):
    runs, pt, _ = chain
    bad = pt.copy_and_resolve_references()
    bad.init_from = f"{runs['s1']}:encodr=vision"
    with pytest.raises(ConfigError, match=r"config.init_from: SRC encodr: no such path .*'encoder'"):
        run_lib.train_and_evaluate(bad, tmp_path / "bad_src")
    wide = pt.copy_and_resolve_references()
    wide.init_from = f"{runs['s1']}:encoder=vision"
    wide.model.vision.mlp_dim = 256
    with pytest.raises(ConfigError, match=r"shape mismatch: model\.encoder\.blocks\.mlp\.fc1 in .* is \(2, 128, 512\), "
                                          r"model\.vision\.blocks\.mlp\.fc1 here is \(2, 128, 256\)"):
        run_lib.train_and_evaluate(wide, tmp_path / "bad_shape")
    for d in ("bad_src", "bad_shape"):  # refused before any step
        assert not (tmp_path / d / "metrics.jsonl").exists() or not [
            r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
