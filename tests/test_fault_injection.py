"""Fault injection on a stage run from the command line (`python -m glm5v_jax.main`, VLM pre-training),
as a user meets it: two runs on one directory (together, and one started later), an incompatible
config change on resume, another tokenizer of the same padded size, non-finite training after a
learning-rate change, zero run settings. Each refusal is one line naming the field or file and a
non-zero exit; no checkpoint is lost, moved aside or written non-finite. The run layer's own probes
(corrupted bytes, skip mode, log rollback, ...) are in tests/test_run_reliability.py."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from glm5v_jax.data import shapes_world
from glm5v_jax.data.tokenizer import Tokenizer, train_tokenizer
from helpers import cli_env, stage_command

ROOT = Path(__file__).parents[1]
STEPS = 4
# total_steps of the resumed runs: the learning-rate schedule is compiled into the step, so every run of
# one length shares one compile (the persistent cache of cli_env); 8 for all of them.
RESUMED = 8


def _command(workdir, data_dir, steps=STEPS, *extra, checkpoint_every=2):
    return stage_command("vlm_pretrain", workdir, data_dir, steps, "--config.measure_pipeline_batches=0", *extra,
                         checkpoint_every=checkpoint_every)


def _run(workdir, data_dir, *extra, steps=STEPS, **kw):
    return subprocess.run(_command(workdir, data_dir, steps, *extra, **kw), cwd=ROOT, env=cli_env(data_dir),
                          capture_output=True, text=True, timeout=600)


def _start(workdir, data_dir):
    return subprocess.Popen(_command(workdir, data_dir), cwd=ROOT, env=cli_env(data_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _checkpoints(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _refusal(out) -> str:
    """The one line a refusal prints last on stderr."""
    assert out.returncode != 0, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_world")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished 4-step run, started as two runs on one directory at once, and a third started while
    the winner trains: exactly one trains, the others are refused at once, naming the lock file."""
    workdir = tmp_path_factory.mktemp("run")
    procs = [_start(workdir, data_dir) for _ in range(2)]
    deadline = time.time() + 300
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    loser_err = loser.stderr.read()
    if loser.returncode != 2 or winner.poll() is not None:
        winner.kill()
        raise AssertionError(f"exits {loser.returncode}, {winner.wait()}:\n{loser_err[-3000:]}\n---\n"
                             f"{winner.stderr.read()[-3000:]}")
    line = loser_err.strip().splitlines()[-1]
    assert line.startswith("config error: workdir:") and "run.lock" in line and "pid" in line, line
    assert winner.poll() is None, winner.stderr.read()[-3000:]  # still training: the staggered case
    late = _run(workdir, data_dir)
    assert late.returncode == 2 and "run.lock" in _refusal(late)
    assert winner.wait(timeout=600) == 0, winner.stderr.read()[-3000:]
    assert _checkpoints(workdir) == ["2", "4"] and not (workdir / "run.lock").exists()
    return workdir


def _copy(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    return workdir


def test_incompatible_config_change_is_refused_and_loses_nothing(finished, data_dir, tmp_path):
    workdir = _copy(finished, tmp_path)
    before = (workdir / "config.json").read_text()
    out = _run(workdir, data_dir, "--config.model.backbone.embed_dim=128", "--config.optim.name=adamw", steps=RESUMED)
    line = _refusal(out)
    assert out.returncode == 2 and line.startswith("config error: config:"), line
    assert "model.backbone.embed_dim: 256 -> 128" in line and "optim.name: 'muon' -> 'adamw'" in line
    assert "Traceback" not in out.stderr  # one line, not orbax's tree diff
    assert _checkpoints(workdir) == ["2", "4"] and (workdir / "config.json").read_text() == before
    # reverting the flags resumes where the run was
    out = _run(workdir, data_dir, steps=RESUMED)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at step 4" in out.stderr and _checkpoints(workdir) == ["4", "6", "8"]  # keep_checkpoints 3


def test_other_tokenizer_of_the_same_padded_size_is_refused(finished, data_dir, tmp_path):
    workdir = _copy(finished, tmp_path)
    moved = tmp_path / "data"  # the data moved (an accepted change), its cached tokenizer replaced
    shutil.copytree(data_dir, moved, ignore=shutil.ignore_patterns("*_jit_cache"))
    cached = next(moved.glob("tokenizer_v1024_*.model"))
    old = Tokenizer(cached)
    texts = [*shapes_world.iter_split_texts(0, "text_train", 24), *shapes_world.iter_split_texts(0, "train", 48)]
    new = train_tokenizer(texts, tmp_path / "other.model", vocab_size=old.vocab_size - 24)  # 1000 -> padded 1024
    assert new.padded_vocab_size == old.padded_vocab_size and new.sha256 != old.sha256
    shutil.copy(tmp_path / "other.model", cached)
    out = subprocess.run(_command(workdir, moved, RESUMED, "--config.resume_accept=data.data_dir"), cwd=ROOT,
                         env=cli_env(data_dir), capture_output=True, text=True, timeout=600)
    line = _refusal(out)
    assert out.returncode == 2 and line.startswith("config error: config.data.tokenizer:") and "sha256" in line, line
    assert _checkpoints(workdir) == ["2", "4"]


def test_nonfinite_training_stops_and_saves_nothing_nonfinite(finished, data_dir, tmp_path):
    """Learning rates of 1e6 (a change a resume accepts): the run stops with exit 1 at the first
    non-finite step, checkpointing every step until then; every kept checkpoint is finite."""
    workdir = _copy(finished, tmp_path)
    lrs = [f"--config.optim.groups.{g}.{k}=1e6" for g in ("text", "vision", "projector") for k in ("lr", "muon_lr")]
    out = _run(workdir, data_dir, *lrs, "--config.keep_checkpoints=20", steps=30, checkpoint_every=1)
    line = _refusal(out)
    assert out.returncode == 1 and line.startswith("run stopped: step ") and "non-finite" in line, line
    assert "with changed settings" in out.stderr
    steps = [int(s) for s in _checkpoints(workdir)]
    bad_step = int(line.split()[3].rstrip(":"))
    assert max(steps) < bad_step and not (workdir / "checkpoints" / str(bad_step)).exists()
    for step in steps:
        tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
                   if np.issubdtype(np.asarray(x).dtype, np.floating)), step


@pytest.mark.parametrize("flag", ["--config.checkpoint_every=0", "--config.log_every=0", "--config.keep_checkpoints=0"])
def test_zero_run_settings_are_refused_before_anything_runs(tmp_path, data_dir, flag):
    out = _run(tmp_path / "run", data_dir, flag)
    field = flag.split("=")[0].removeprefix("--")
    assert out.returncode == 2 and _refusal(out).startswith(f"config error: {field}:")
    assert not (tmp_path / "run").exists()


def test_second_signal_exits_at_once_and_the_next_run_resumes(finished, data_dir, tmp_path):
    """SIGINT twice (an impatient Ctrl-C): exit 130 without waiting for the checkpoint; the lock left
    by the dead process is stale, and the next run resumes from the newest complete checkpoint."""
    import signal
    import threading

    from glm5v_jax.train.writers import read_jsonl

    workdir = _copy(finished, tmp_path)
    proc = subprocess.Popen(_command(workdir, data_dir, RESUMED), cwd=ROOT, env=cli_env(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 6 for r in read_jsonl(workdir / "metrics.jsonl")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)
    while time.time() < deadline and not any("SIGINT received" in line for line in lines):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # while it finishes the step and checkpoints
    assert proc.wait(timeout=60) == 130, "".join(lines)[-3000:]
    reader.join(timeout=10)
    assert any("second SIGINT" in line for line in lines)
    assert (workdir / "run.lock").exists()  # left behind by the forced exit
    out = _run(workdir, data_dir, steps=RESUMED)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stale" in out.stderr and "resuming at step" in out.stderr


def test_sigkill_during_a_save_then_restart_is_exact(finished, data_dir, tmp_path):
    """SIGKILL while step 2's checkpoint is being written (its orbax temporary directory exists), then
    a restart: the incomplete save is ignored, the dead run's lock is stale, and step 4's parameters
    equal those of the uninterrupted run bit for bit."""
    import signal

    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(workdir, data_dir), cwd=ROOT, env=cli_env(data_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline, during = time.time() + 300, None
    while during is None and time.time() < deadline and proc.poll() is None:
        ckpts = workdir / "checkpoints"
        during = next((p.name for p in ckpts.iterdir() if p.name.startswith("2.orbax-checkpoint-tmp")), None) \
            if ckpts.is_dir() else None
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert during is not None, "the save of step 2 was not seen"
    out = _run(workdir, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    a = ocp.StandardCheckpointer().restore(finished / "checkpoints" / "4" / "state")
    b = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
