"""experiments/mmtp_ablation.py, run the way a researcher runs it in Colab: colabs/mmtp_ablation.ipynb
with small settings. The three MMTP modes of one seed see byte-identical batches (per-step hash), the
table / JSON / PNG are written and shown, vision-feature bytes reach the MTP stream only in
visual_embed; the command line re-renders the table; the metric helpers on synthetic curves."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from notebooks import SMALL_DATA, SMALL_MODEL, execute, has_output, text_outputs

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
    """One run of the notebook: 3 modes x 1 seed x STEPS steps on a small model and dataset, in a
    fresh kernel on one CPU device (the notebook calls the runner's main() with these flags)."""
    tmp = tmp_path_factory.mktemp("mmtp_ablation")
    sets = [f"{k}={v}" for k, v in {**SMALL_DATA, **SMALL_MODEL}.items()
            if k not in ("data.batch_size", "data.seq_len")]
    nb, seconds = execute("mmtp_ablation", {
        "STEPS": STEPS, "SEEDS": "0", "EVAL_EVERY": 0, "WORKDIR": str(tmp / "work"), "OUT_DIR": str(tmp / "out"),
        "EXTRA_ARGS": ["--batch_size", "2", "--seq_len", "128", "--vision_batches", str(STEPS),
                       "--tau_prompts", "1", "--tau_tokens", "4",
                       *[a for item in sets for a in ("--set", item)]]},
        # the three modes compile some identical programs (the state's initialisation, the finiteness check
        # before a checkpoint, and visual_embed's speculative decode steps equal image_token's): once each
        compile_cache=str(tmp / "jit_cache"))
    print(f"mmtp_ablation notebook: {seconds:.0f} s")
    out = json.loads((tmp / "out" / "results.json").read_text())
    return out, tmp / "out", nb


def test_modes_see_byte_identical_batches(result):
    out = result[0]
    hashes = {r["mode"]: r["batch_hash"] for r in out["runs"]}
    assert set(hashes) == set(MODES)
    assert all(len(h) == STEPS for h in hashes.values())
    assert hashes["image_token"] == hashes["visual_embed"] == hashes["mask"]
    assert len(set(hashes["mask"])) == STEPS  # every step a different batch
    assert out["identical_batches"] == {"0": True}  # also matches the runner's own replay of the pipeline


def test_outputs_written_with_a_row_per_mode(result):
    out, out_dir = result[:2]
    data = json.loads((out_dir / "results.json").read_text())
    assert [r["mode"] for r in data["table"]] == list(MODES)
    columns = {"main_end", "main_tail", "mtp_1_end", "mtp_1_tail", "smoothness", "grad_spikes", "s_per_step",
               "vision_bytes_per_step", "seeds", "tau_image", "tau_text", "accept_image_1"}
    for row in data["table"]:
        assert columns <= set(row), columns - set(row)
        assert np.isfinite(row["main_end"]) and row["s_per_step"] > 0
        assert 1 <= row["tau_image"] <= 4 and 1 <= row["tau_text"] <= 4  # speculative decoding, k = 3
    for run in data["runs"]:
        assert len(run["loss_main"]) == len(run["mtp"]["1"]) == len(run["grad_norm"]) == STEPS
    md = (out_dir / "results.md").read_text()
    for mode in MODES:
        assert f"| {mode} |" in md
    assert "| τ image | τ text |" in md
    assert "mmtp_ablation.py --preset tiny" in md and "jax " in md and "seed 0: yes" in md
    assert "Verdict (paired by seed, 1 seed)" in md
    assert (out_dir / "curves.png").stat().st_size > 1000


def test_notebook_shows_table_plot_and_committed_results(result):
    nb = result[2]
    text = text_outputs(nb)
    for mode in MODES:
        assert f"| {mode} |" in text  # the table, shown as markdown
    assert has_output(nb, "image/png")  # the curves
    assert "committed: Verdict (paired by seed, 3 seeds)" in text


def test_command_line_rerenders_from_results_json(result, tmp_path):
    out, out_dir = result[:2]
    copy = tmp_path / "out"
    copy.mkdir()
    (copy / "results.json").write_text((out_dir / "results.json").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "mmtp_ablation.py"), "--render_only",
                           "--out_dir", str(copy)], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "results.md").read_text() == (out_dir / "results.md").read_text()
    assert (copy / "curves.png").stat().st_size > 1000


def test_vision_bytes_only_for_visual_embed(result):
    out = result[0]
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


def test_verdict_pairs_runs_by_seed():
    def rows(diffs, smooth_diffs):
        out = []
        for seed, (d, sd) in enumerate(zip(diffs, smooth_diffs)):
            base = 2.0 + 0.5 * seed  # a seed spread far larger than the mode differences
            out += [dict(mode="visual_embed", seed=seed, main_tail=base, smoothness=0.01),
                    dict(mode="image_token", seed=seed, main_tail=base + d, smoothness=0.01 + sd)]
        return out

    table = [dict(mode="image_token", main_tail_std=0.4), dict(mode="visual_embed", main_tail_std=0.4)]
    diffs = ablation.paired_differences(rows([-0.02, -0.03, -0.025], [0, 0, 0]), "image_token", "visual_embed",
                                        "main_tail")
    np.testing.assert_allclose(diffs, [-0.02, -0.03, -0.025])

    holds = ablation.verdict(rows([-0.02, -0.03, -0.025], [-1e-4, -2e-4, 0.0]), table, 0.2)
    assert "lower or equal in 3/3 seeds" in holds[0] and "smoother or equal in 3/3 seeds" in holds[1]
    assert "holds in every seed" in holds[2] and "larger than twice its standard error" in holds[2]

    mixed = ablation.verdict(rows([0.002, -0.001, 0.003], [-1e-4, -2e-4, -1e-4]), table, 0.2)
    assert "lower or equal in 1/3 seeds" in mixed[0]
    assert "does not hold in every seed" in mixed[2] and "not resolved" in mixed[2]

    assert "needs both" in ablation.verdict([dict(mode="mask", seed=0)], [], 0.2)[0]
