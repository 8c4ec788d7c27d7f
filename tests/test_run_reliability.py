"""Fault injection on the run layer (`glm5v_jax.train.run.run`), with a toy job that compiles in a
second: non-finite training (stop, skip, a state gone non-finite, a non-finite checkpoint on disk),
config changes on resume (refused, safe, accepted, reverted), another tokenizer, corrupted checkpoint
bytes, logs on resume (repeated steps, a partial line), and bad run settings. Nothing checkpointed is
lost, nothing damaged or non-finite is resumed, and every refusal names the field or file. The stages'
own jobs meet the same code: tests/test_fault_injection.py runs them from the command line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from glm5v_jax.config_blocks import run_control
from glm5v_jax.errors import ConfigError
from glm5v_jax.sharding.rules import mesh_config
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.train.nonfinite import NonFiniteError, nonfinite_leaves
from glm5v_jax.train.parallel import batch_shardings, global_batch, jit_step, plan_from_config
from glm5v_jax.train.run import Job, TrainState, run
from glm5v_jax.train.writers import read_jsonl
from helpers import checkpoint_array_files

TOKENIZER = "data.tokenizer"


class Batches:
    """Batch i: x ~ N(0, 1) [8, 4] from seed i, y = x @ w_true; `poison` steps get an infinite x."""

    def __init__(self, poison: tuple[int, ...] = ()):
        self.i, self.poison, self.stats = 0, poison, {"examples": 0}

    def __next__(self):
        x = np.random.default_rng(self.i).normal(size=(8, 4)).astype(np.float32)
        self.i += 1
        if self.i in self.poison:  # the batch of step i
            x[0, 0] = np.inf
        self.stats = {"examples": self.i * 8}
        return {"x": x, "y": x @ np.arange(1, 5, dtype=np.float32)[:, None]}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(trainer="toy", seed=0, lr=0.05, width=1, mesh=mesh_config(num_devices=1)))
    run_control(config, total_steps=8, log_every=1, eval_every=0, checkpoint_every=2)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def toy_job(config, *, poison=(), tokenizer="sha-a", corrupt_state_at: int | None = None) -> Job:
    plan = plan_from_config(config.mesh, jax.devices()[:1])
    model = nnx.Linear(4, config.width, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(TrainState(model, nnx.Optimizer(model, optax.sgd(config.lr), wrt=nnx.Param)))
    shardings = jax.tree.map(lambda x: x.sharding, state)

    def pure(state, batch):
        ts = nnx.merge(graphdef, state)

        def loss_fn(m):
            return jnp.mean((m(batch["x"]) - batch["y"]) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(ts.model)
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    batch_sh = batch_shardings({"x": np.zeros((8, 4)), "y": np.zeros((8, 1))}, plan)
    step_fn = jit_step(pure, plan, shardings, batch_sh, nonfinite=config.nonfinite)

    def train_step(state, batch, step):
        state, metrics = step_fn(state, global_batch(batch, batch_sh))
        if step == corrupt_state_at:  # a state gone non-finite while the loss stayed finite
            state = jax.tree.map(lambda x: x * jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        return state, metrics

    return Job(config=config, plan=plan, state=state, shardings=shardings, train_iter=Batches(poison),
               train_step=train_step, fingerprints={TOKENIZER: tokenizer})


def _run(workdir, config=None, **job_kw):
    config = config or toy_config()
    return run(toy_job(config, **job_kw), Path(workdir))


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _aside(workdir) -> list[str]:
    return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir() if ".bad-" in p.name)


def _restore(workdir, step):
    """The state saved at `step`, read as it is on disk (none of the Checkpointer's checks)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, toy_job(toy_config()).state)
    return ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state", target)


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return workdir


# ------------------------------------------------------------------ non-finite training
def test_nonfinite_loss_stops_before_saving(tmp_path):
    with pytest.raises(NonFiniteError, match="step 5: non-finite training.*config.nonfinite=skip"):
        _run(tmp_path, poison=(5,))
    assert _steps(tmp_path) == [2, 4]  # nothing after the bad step
    for s in _steps(tmp_path):
        assert not nonfinite_leaves(_restore(tmp_path, s))


def test_nonfinite_state_with_finite_loss_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteError, match="step 6: the state holds non-finite values"):
        _run(tmp_path, corrupt_state_at=6)
    assert _steps(tmp_path) == [2, 4]


def test_skip_mode_skips_the_bad_step_and_finishes(tmp_path, reference):
    config = toy_config(nonfinite="skip")
    out = _run(tmp_path, config, poison=(5,))
    assert out["step"] == 8 and out["train/nonfinite_skipped"] == 1
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert 5 not in [r["step"] for r in rows if "loss" in r]  # a skipped step has no loss row
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert not nonfinite_leaves(_restore(tmp_path, 8))
    # ... and skipping gives up after max_nonfinite_skips in a row
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row.*max_nonfinite_skips=2"):
        _run(tmp_path / "again", toy_config(nonfinite="skip", max_nonfinite_skips=2), poison=(3, 4, 5, 6))


def test_nonfinite_checkpoint_on_disk_is_not_resumed(tmp_path, caplog):
    _run(tmp_path, toy_config(total_steps=4))
    bad = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, _restore(tmp_path, 4))
    ck = Checkpointer(tmp_path / "checkpoints")  # as an older version would have saved it
    ck.save(6, bad, {"i": 6}, json.loads(toy_config(total_steps=4).to_json()), force=True)
    ck.close()
    with caplog.at_level(logging.WARNING):
        out = _run(tmp_path, toy_config(total_steps=8))
    assert "checkpoint step 6" in caplog.text and "non-finite values in" in caplog.text
    assert _aside(tmp_path) == ["6.bad-0"] and out["step"] == 8  # resumed from 4, kept step 6 aside


# ------------------------------------------------------------------ config changes on resume
def test_incompatible_config_change_is_refused_and_nothing_is_lost(tmp_path):
    _run(tmp_path, toy_config(total_steps=4))
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, toy_config(total_steps=8, lr=0.5, width=2))
    assert e.value.field == "config" and "lr: 0.05 -> 0.5" in str(e.value) and "width: 1 -> 2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, toy_config(total_steps=8, width=2))
    assert e.value.field == "config.width" and "resume_accept" in str(e.value)
    assert _steps(tmp_path) == [2, 4] and not _aside(tmp_path)  # a mismatch is not damage
    assert (tmp_path / "config.json").read_text() == before  # refused before anything was written
    # Reverting the change resumes where it was.
    assert _run(tmp_path, toy_config(total_steps=6))["step"] == 6 and _steps(tmp_path) == [2, 4, 6]


def test_safe_and_accepted_changes_resume(tmp_path, reference, caplog):
    _run(tmp_path, toy_config(total_steps=4))
    with caplog.at_level(logging.INFO):
        _run(tmp_path, toy_config(total_steps=8, log_every=2, checkpoint_every=4, keep_checkpoints=5))
    assert "with changed settings" in caplog.text and "total_steps: 4 -> 8" in caplog.text
    for a, b in zip(_params(_restore(reference, 8)), _params(_restore(tmp_path, 8))):
        np.testing.assert_array_equal(a, b)  # the same training as the uninterrupted run
    # An accepted change of a field that keeps the state's shapes resumes ...
    assert _run(tmp_path, toy_config(total_steps=10, lr=0.01, resume_accept="lr"))["step"] == 10
    # ... one that changes them is refused by the structure check, naming the parameter
    with pytest.raises(ConfigError, match="kernel.*saved float32\\[4, 1\\], this run float32\\[4, 2\\]"):
        _run(tmp_path, toy_config(total_steps=12, lr=0.01, width=2, resume_accept="lr,width"))
    assert not _aside(tmp_path)


def test_other_tokenizer_is_refused(tmp_path):
    _run(tmp_path, toy_config(total_steps=2))
    with pytest.raises(ConfigError, match="config.data.tokenizer: .*sha256 was"):
        _run(tmp_path, toy_config(total_steps=4), tokenizer="sha-b")
    assert _steps(tmp_path) == [2] and not _aside(tmp_path)


def test_total_steps_below_the_checkpoint_is_refused(tmp_path):
    _run(tmp_path, toy_config(total_steps=4))
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match="config.total_steps: 3 is below the step of the checkpoint"):
        _run(tmp_path, toy_config(total_steps=3))
    assert (tmp_path / "config.json").read_text() == before and _steps(tmp_path) == [2, 4]


# ------------------------------------------------------------------ damaged checkpoints, logs
def test_corrupted_checkpoint_falls_back_and_training_is_exact(tmp_path, reference):
    _run(tmp_path, toy_config(total_steps=6))
    target = max(checkpoint_array_files(tmp_path / "checkpoints" / "6"), key=lambda f: f.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one flipped bit
    target.write_bytes(bytes(raw))
    out = _run(tmp_path, toy_config(total_steps=8))
    assert out["step"] == 8 and _aside(tmp_path) == ["6.bad-0"]
    for a, b in zip(_params(_restore(reference, 8)), _params(_restore(tmp_path, 8))):
        np.testing.assert_array_equal(a, b)


def test_logs_roll_back_to_the_resumed_step_and_tolerate_a_partial_line(tmp_path, reference):
    _run(tmp_path, toy_config(total_steps=8))
    # What a kill after step 8's log line but before its checkpoint leaves, then a torn write.
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.1')  # partial
    _run(tmp_path, toy_config(total_steps=8))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))  # each step once: 7 and 8 were dropped and logged again
    ref = {r["step"]: r["loss"] for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r}
    assert {r["step"]: r["loss"] for r in rows if "loss" in r} == ref


# ------------------------------------------------------------------ run settings
@pytest.mark.parametrize("field,value", [("checkpoint_every", 0), ("log_every", 0), ("keep_checkpoints", 0),
                                         ("total_steps", 0), ("eval_every", -1), ("nonfinite", "ignore")])
def test_bad_run_settings_are_refused_up_front(tmp_path, field, value):
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, toy_config(**{field: value}))
    assert e.value.field == f"config.{field}"
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
