"""Every stage end to end through the run layer: determinism, SIGTERM checkpoint, exact resume (after a
SIGKILL too, on the main job); for the main job also TensorBoard event files and metrics.jsonl. Runs
`python -m glm5v_jax.main` as a user would."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from glm5v_jax.train.writers import read_jsonl
from helpers import STAGE_RUNS, cli_env as _env, stage_command

ROOT = Path(__file__).parents[1]
STEPS = 12


def _command(stage: str, workdir: Path, data_dir: Path, steps: int = STEPS) -> list[str]:
    return stage_command(stage, workdir, data_dir, steps)


def _run(stage, workdir, data_dir, steps=STEPS):
    out = subprocess.run(_command(stage, workdir, data_dir, steps), cwd=ROOT, env=_env(data_dir),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _start(stage, workdir, data_dir):
    return subprocess.Popen(_command(stage, workdir, data_dir), cwd=ROOT, env=_env(data_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir: Path, step: int, timeout=400):
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        if path.exists() and any(r["step"] >= step for r in read_jsonl(path)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


def _final_state(workdir: Path):
    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
    restored = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored.state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_world")


_REFERENCES: dict[str, Path] = {}


def _reference(stage: str, tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run of `stage` (once per module)."""
    if stage not in _REFERENCES:
        workdir = tmp_path_factory.mktemp(f"uninterrupted_{stage}")
        _run(stage, workdir, data_dir)
        _REFERENCES[stage] = workdir
    return _REFERENCES[stage]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
    return _reference("vlm_pretrain", tmp_path_factory, data_dir)


def test_uninterrupted_run_logs_and_learns(reference_run):
    rows = read_jsonl(reference_run / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["perf/pipeline_examples_per_s"] > 0  # pipeline timed alone
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "train/loss/main", "train/loss/mtp_1", "train/grad_norm", "lr/vision/muon",
                "lr/text/adamw", "train/optim/update_rms/text/muon", "train/optim/update_rms/vision/adamw",
                "train/optim/ortho_error",
                "perf/tokens_per_s", "perf/mfu", "train/moe/load_max_over_mean", "train/moe/bias_abs_mean",
                "data/skipped/undecodable_image", "data/examples"):
        assert key in rows[-1], key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (reference_run / "loss_curves.png").stat().st_size > 1000


def test_tensorboard_events_read_back(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "train/loss/mtp_1", "perf/steps_per_s"} <= set(tags)
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    jsonl = _losses(reference_run)
    np.testing.assert_allclose([e.value for e in events], [jsonl[s] for s in range(1, STEPS + 1)], rtol=1e-6)


@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_sigterm_checkpoint_then_resume_is_exact(stage, tmp_path, tmp_path_factory, data_dir):
    """For every stage: SIGTERM at a random step leaves a complete checkpoint of the step it was on and
    exits 0; a restart reaches the same per-step losses and final parameters as the uninterrupted run
    (which also shows two runs give identical losses). VLM pre-training also takes a SIGKILL at a random
    step between the two. What a SIGKILL adds -- an incomplete async save ignored, metrics.jsonl rolled
    back to the resumed step -- is the run layer's, whatever the stage: one stage pays that launch here
    (test_fault_injection kills a run mid-save; test_run_reliability rolls the logs back)."""
    reference_run = _reference(stage, tmp_path_factory, data_dir)
    rng = np.random.default_rng(int(time.time()))
    sigkill = stage == "vlm_pretrain"
    term_at = 3 if sigkill else int(rng.integers(3, 8))  # room left for the SIGKILL's step
    workdir = tmp_path / "interrupted"
    proc = _start(stage, workdir, data_dir)
    _wait_for_step(proc, workdir, term_at)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    last = max(r["step"] for r in read_jsonl(workdir / "metrics.jsonl"))
    assert last < STEPS
    mngr = ocp.CheckpointManager(workdir / "checkpoints")
    assert mngr.latest_step() == last  # the step it was on, complete (finalized)
    mngr.close()

    kill_at = None
    if sigkill:
        proc = _start(stage, workdir, data_dir)
        kill_at = int(rng.integers(last + 2, STEPS - 1))
        _wait_for_step(proc, workdir, kill_at)
        proc.kill()
        proc.wait()
    _run(stage, workdir, data_dir)

    ref, got = _losses(reference_run), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)], f"SIGTERM at {last}, killed at {kill_at}"
    a, b = _final_state(reference_run), _final_state(workdir)
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
