"""experiments/mmtp_ablation.py: the three MMTP modes of one seed see byte-identical batches
(per-step hash), the table / JSON / PNG are written, vision-feature bytes reach the MTP stream
only in visual_embed, and the smoothness / gradient-spike helpers on synthetic curves."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
STEPS = 3
MODES = ("image_token", "visual_embed", "mask")


def _load():
    spec = importlib.util.spec_from_file_location("mmtp_ablation", ROOT / "experiments" / "mmtp_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _load()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmtp_ablation")
    small = ["data.split_sizes.train=48", "data.split_sizes.validation=8", "data.split_sizes.text_train=24",
             "data.split_sizes.text_validation=4", "data.tokenizer_vocab_size=1024",
             "model.backbone.num_layers=2", "model.vision.depth=1"]
    argv = ["--preset", "tiny", "--seeds", "0", "--steps", str(STEPS), "--eval_every", "0",
            "--batch_size", "2", "--seq_len", "128", "--vision_batches", str(STEPS),
            "--data_dir", str(tmp / "data"), "--workdir", str(tmp / "work"), "--out_dir", str(tmp / "out")]
    for item in small:
        argv += ["--set", item]
    # A subprocess, like tests/test_trainer.py: conftest gives this process 8 fake CPU devices, over
    # which the preset's mesh would shard the model; the experiment runs on one device.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "mmtp_ablation.py"), *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp / "out" / "results.json").read_text())
    return out, tmp / "out"


def test_modes_see_byte_identical_batches(result):
    out, _ = result
    hashes = {r["mode"]: r["batch_hash"] for r in out["runs"]}
    assert set(hashes) == set(MODES)
    assert all(len(h) == STEPS for h in hashes.values())
    assert hashes["image_token"] == hashes["visual_embed"] == hashes["mask"]
    assert len(set(hashes["mask"])) == STEPS  # every step a different batch
    assert out["identical_batches"] == {"0": True}  # also matches the runner's own replay of the pipeline


def test_outputs_written_with_a_row_per_mode(result):
    out, out_dir = result
    data = json.loads((out_dir / "results.json").read_text())
    assert [r["mode"] for r in data["table"]] == list(MODES)
    columns = {"main_end", "main_tail", "mtp_1_end", "mtp_1_tail", "smoothness", "grad_spikes", "s_per_step",
               "vision_bytes_per_step", "seeds"}
    for row in data["table"]:
        assert columns <= set(row), columns - set(row)
        assert np.isfinite(row["main_end"]) and row["s_per_step"] > 0
    for run in data["runs"]:
        assert len(run["loss_main"]) == len(run["mtp"]["1"]) == len(run["grad_norm"]) == STEPS
    md = (out_dir / "results.md").read_text()
    for mode in MODES:
        assert f"| {mode} |" in md
    assert "mmtp_ablation.py --preset tiny" in md and "jax " in md and "seed 0: yes" in md
    assert (out_dir / "curves.png").stat().st_size > 1000


def test_vision_bytes_only_for_visual_embed(result):
    out, _ = result
    by_mode = {r["mode"]: r["vision_bytes_per_step"] for r in out["table"]}
    assert by_mode["visual_embed"] > 0 and by_mode["image_token"] == 0 and by_mode["mask"] == 0
    vis = out["vision"]["0"]
    assert by_mode["visual_embed"] == vis["positions_per_step"] * vis["embed_dim"] * vis["itemsize"]
    assert vis["embed_dim"] == 256 and vis["itemsize"] == 2  # tiny: 256 wide, bfloat16


def test_vision_stream_positions_counts_image_inputs_within_documents():
    img = 7
    tokens = np.array([[1, img, img, 2, img, 3, 0, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2, 0, 0]])
    # depth 1: i=0->1, i=1->2 (image, same doc); i=3->4 crosses documents; depth 2: i=0->2 only.
    assert ablation.vision_stream_positions(tokens, seg, img, num_depths=1) == 2
    assert ablation.vision_stream_positions(tokens, seg, img, num_depths=2) == 3


def test_smoothness_and_spikes_on_synthetic_curves():
    steps = np.arange(100)
    line = 5.0 - 0.01 * steps  # constant decrements: zero variance of the changes
    assert ablation.smoothness(line) == pytest.approx(0.0, abs=1e-20)
    zigzag = line + 0.1 * (-1.0) ** steps  # changes alternate -0.21 / +0.19: variance ~0.2**2
    assert ablation.smoothness(zigzag) == pytest.approx(0.04, rel=1e-3)
    assert ablation.smoothness(zigzag) > ablation.smoothness(line + 0.01 * (-1.0) ** steps)

    g = np.ones(60)
    g[[3, 30, 45]] = [10.0, 2.5, 1.9]  # 3: too little history; 45: below 2x the median
    assert ablation.grad_spikes(g, k=2.0, window=20) == [30]
    assert ablation.grad_spikes(g, k=1.5, window=20) == [30, 45]
    ramp = np.linspace(1.0, 3.0, 60)  # slow growth is no spike
    assert ablation.grad_spikes(ramp) == []

    assert ablation.tail_mean(np.arange(10.0), 0.2) == pytest.approx(8.5)
    assert ablation.warm_median([30.0, 5.0, 1.0, 1.2, 0.8]) == pytest.approx(1.0)  # first 2 skipped
    assert ablation.mtp_vision_bytes("visual_embed", 10, 256, 2) == 5120
    assert ablation.mtp_vision_bytes("mask", 10, 256, 2) == 0
