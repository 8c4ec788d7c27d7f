"""Stages on a mesh through the run layer: on 8 fake CPU devices a 2-axis (data 2, fsdp 4) mesh
gives the one-device losses (float32 compute and Newton-Schulz, 1e-5). CogViT stage 1 has its own
module (test_cogvit_mim_sharded.py); test_sharded_training.py covers four more meshes of the VLM
step."""
from __future__ import annotations

import numpy as np
import pytest

from glm5v_jax.train import run as run_lib
from glm5v_jax.train.writers import read_jsonl

from helpers import config_module

STEPS = 2  # no warm-up: step 1 moves the weights, so step 2's loss checks an update


def _siglip(data_dir):
    cfg = config_module("cogvit_siglip").get_config("tiny,dtype=float32")
    # one patch budget: one program per run (the alternation of budgets: test_cogvit_siglip, test_trainer)
    cfg.data.batch_size, cfg.data.text_len, cfg.data.patch_budgets = 8, 40, (32,)
    for name, n in (("natural", 24), ("instruction", 8), ("scientific", 8)):
        cfg.data.sources[name].train_size = n
    cfg.model.vision.depth = cfg.model.text.depth = 1
    return cfg


def _vlm(config_name: str):
    def make(data_dir):
        cfg = config_module(config_name).get_config("tiny")
        cfg.model.dtype = "float32"
        cfg.model.backbone.num_layers, cfg.model.vision.depth = 2, 1  # a dense and a MoE layer (SMALL_MODEL)
        cfg.measure_pipeline_batches = 0
        d = cfg.data
        d.batch_size, d.seq_len, d.tokenizer_vocab_size = 8, 128, 1024
        d.sources.image.update(train_size=32, eval_size=8)
        d.sources.text.update(train_size=16, eval_size=4)
        return cfg
    return make


# VLM pre-training: the same model job as SFT (vlm_pretrain.build_model_job: state, shardings, jitted
# step) on other documents; test_sharded_training.py runs its step on four more meshes. Left out
# here to keep the suite's time (it cost 90 s of a worker).
STAGES = {"cogvit_siglip": _siglip, "vlm_sft": _vlm("vlm_sft")}


def _losses(stage: str, data_dir, workdir, shape, num_devices: int) -> list[float]:
    cfg = STAGES[stage](data_dir)
    cfg.data.data_dir = str(data_dir)
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.eval_every = STEPS, 1, STEPS, 0
    cfg.optim.muon.ns_dtype = "float32"
    cfg.mesh.shape, cfg.mesh.num_devices = shape, num_devices
    for g in cfg.optim.groups.values():
        g.warmup_steps = 0
    run_lib.train_and_evaluate(cfg, workdir)
    return [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_axis_mesh_gives_the_one_device_losses(stage, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"{stage}_data")
    one = _losses(stage, data_dir, tmp_path_factory.mktemp(f"{stage}_one"), (1, 1, 1, 1), 1)
    mesh = _losses(stage, data_dir, tmp_path_factory.mktemp(f"{stage}_mesh"), (2, 4, 1, 1), 8)
    assert len(one) == STEPS and np.all(np.isfinite(one))
    np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-5)
