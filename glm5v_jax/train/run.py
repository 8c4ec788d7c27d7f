"""The run layer: what every training stage shares, written once.

A stage module (`glm5v_jax.train.stages`) builds a `Job` -- its sharded state, its jitted step, its
batches, its evaluation -- and this module runs it:

    plan = mesh_plan(config)                        # the mesh, refused early (ConfigError)
    job = stage.setup(config, workdir, plan)        # state created sharded, step, batches, evaluate
    resume from the newest good checkpoint           # resharded onto this run's mesh
      or, on a fresh start, `config.init_from`      # copy a subtree of another run's model
    job.observe_state(state, start step)            # a stage that samples its own data (RL) sees it
    step 0: evaluate (the baseline training must beat)
    loop: batch -> step -> observe_state -> average metrics -> log (steps/s, tokens/s, ETA, MFU) -> evaluate
          -> checkpoint (async) ; SIGTERM / SIGINT: checkpoint the current step and stop
    end: wait for the last checkpoint, plot the curves, eval_table.md (step 0 vs the end), the stage's
         `finish`.

Every state is an `nnx.State` of a `TrainState` module (`model`, `optimizer`, extras), so
checkpoints of every stage share one layout and `init_from` reads `model/...` paths of any of them.
All paths go through `etils.epath`, so run directories can live on `gs://`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.train import flops as flops_lib
from glm5v_jax.train.checkpoint import Checkpointer, Restored
from glm5v_jax.init_from import apply_init_from
from glm5v_jax.train.nonfinite import NonFiniteError, NonFiniteMonitor, nonfinite_leaves
from glm5v_jax.train.resume import check_resume, validate_run_settings
from glm5v_jax.train.run_lock import RunLock
from glm5v_jax.sharding.partition import create_sharded, state_shardings
from glm5v_jax.sharding.rules import parameter_shardings
from glm5v_jax.train.optimizer import transform_from_config
from glm5v_jax.train.parallel import MeshPlan, abstract_state, plan_from_config, preflight
from glm5v_jax.paths import as_path
from glm5v_jax.train.stages import stage_module
from glm5v_jax.train.writers import (JsonlWriter, MultiWriter, TensorBoardWriter, plot_curves, rollback_jsonl,
                                     write_eval_table)

log = logging.getLogger(__name__)


class TrainState(nnx.Module):
    """What a stage trains and checkpoints: `model`, its `optimizer`, and stage extras (e.g. the
    distillation targets' running statistics) as further attributes."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, **extras: Any):
        self.model, self.optimizer = model, optimizer
        for name, value in extras.items():
            setattr(self, name, value)


class BatchIterator(Protocol):
    """A checkpointable iterator of host batches (grain's iterators, or a stage's wrapper)."""

    stats: Mapping[str, int]

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class Job:
    """A stage's run, ready for the loop. Every callable takes the state as it is now."""

    config: ml_collections.ConfigDict  # resolved (e.g. vocabulary from the tokenizer): saved with the run
    plan: MeshPlan
    state: Any  # nnx.State of a TrainState, sharded
    shardings: Any  # its NamedShardings
    train_iter: BatchIterator
    train_step: Callable[[Any, dict, int], tuple[Any, dict]]  # (state, host batch, step) -> (state, metrics)
    schedules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)  # "<group>/<kind>" -> lr(step)
    evaluate: Callable[[Any], dict] | None = None  # state -> {"eval/...": value}
    work: Callable[[dict], dict] | None = None  # host batch -> {"tokens": n, "flops": f} of this host's rows
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    start_scalars: Callable[[], dict] | None = None  # measured once on a fresh start, logged at step 0
    finish: Callable[[epath.Path, int], None] | None = None  # (workdir, last step) at the end of a full run
    batch_keys: tuple[str, ...] | None = None  # what `batch_hash` fingerprints (None: every key)
    routing: str | None = None  # Muon routing table, written to routing.txt
    replicated: float = 0.0  # fraction of parameter bytes replicated over a non-data axis
    # (state, step) of the state the loop starts from (after a resume or init_from) and after every step:
    # for a stage whose batches come from the model itself (RL: the rollout engine gets each new policy)
    observe_state: Callable[[Any, int], None] | None = None
    # {config field: sha256} of files the config names (the tokenizer): saved with each checkpoint, and a
    # resume with other bytes is refused (glm5v_jax.train.resume)
    fingerprints: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PlacedState:
    """A stage's TrainState on the mesh (or abstract, for AOT compiles), with what was derived on the
    way: shardings, the optimizer's schedules and per-parameter group labels, the Muon routing."""

    graphdef: Any
    state: Any  # nnx.State of the TrainState: jax.Arrays, or ShapeDtypeStructs with shardings
    shardings: Any
    abstract_model: nnx.Module
    schedules: dict  # "<group>/<kind>" -> lr(step)
    update_labels: dict  # param path -> "<group>/<kind>" (per-group update-RMS metrics)
    routing: str | None
    replicated: float  # fraction of parameter bytes replicated over a non-data mesh axis

    @property
    def params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self.abstract_model, nnx.Param)))


def place_state(config: ml_collections.ConfigDict, plan: MeshPlan, make_model: Callable[[], nnx.Module], *,
                extras: Callable[[], dict] | None = None, abstract: bool = False) -> PlacedState:
    """Every check that can fail (ConfigError naming the field) on the abstract model, then
    `TrainState(make_model(), its optimizer of config.optim, **extras())` created sharded per the
    mesh rules (no device holds a full replica) -- or, `abstract=True`, only its shapes and shardings."""
    abstract_model = nnx.eval_shape(make_model)
    replicated = preflight(abstract_model, plan, global_batch=config.data.batch_size, mesh_cfg=config.mesh)
    param_sh = parameter_shardings(abstract_model, plan.mesh, plan.rules)
    tx, schedules, labels, routing = transform_from_config(abstract_model, config.optim, config.total_steps,
                                                           mesh=plan.mesh, shardings=param_sh)

    def make():
        model = make_model()
        return TrainState(model, nnx.Optimizer(model, tx, wrt=nnx.Param), **(extras() if extras else {}))

    if abstract:
        graphdef, state = nnx.split(nnx.eval_shape(make))
        shardings = state_shardings(state, plan.mesh, param_sh)
        state = abstract_state(state, shardings)
    else:
        graphdef, state, shardings = create_sharded(make, plan.mesh, param_sh)
    return PlacedState(graphdef, state, shardings, abstract_model, schedules, labels, routing, replicated)


def mesh_plan(config: ml_collections.ConfigDict) -> MeshPlan:
    """`config.mesh` over all devices, or the first `config.mesh.num_devices` (one host only)."""
    n, devices = int(config.mesh.get("num_devices", 0)), jax.devices()
    if n:
        if n > len(devices) or jax.process_count() > 1:
            raise ConfigError("config.mesh.num_devices", f"{n} devices asked for, {len(devices)} exist over "
                                                         f"{jax.process_count()} hosts (0 uses all; >0 on one host)")
        devices = devices[:n]
    return plan_from_config(config.mesh, devices)


class Preemption:
    """SIGTERM or SIGINT (Ctrl-C) -> finish the current step, checkpoint it, stop cleanly. A second
    signal exits at once (status 128 + signal): the checkpoint being written is left incomplete, which
    a restart ignores, and the earlier ones are intact."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested:
            log.warning("second %s: exiting now; the last complete checkpoint is kept", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.warning("%s received: checkpointing the current step and stopping (again: exit at once)", name)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def average(acc: dict, metrics: Mapping[str, Any]) -> dict:
    """Running means of scalar metrics (clu.metrics.Average; arrays are averaged over elements)."""
    for k, v in metrics.items():
        m = clu_metrics.Average.from_model_output(jnp.asarray(v, jnp.float32).reshape(-1))
        acc[k] = m if k not in acc else acc[k].merge(m)
    return acc


def batch_hash(batch: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> int:
    """A 48-bit fingerprint of a host batch: the first 12 hex digits of sha256 over each array's
    name, dtype, shape and bytes (in `keys` order, default sorted). Below 2**53, so exact as a float
    in metrics.jsonl (TensorBoard gets a float32-rounded value)."""
    h = hashlib.sha256()
    for k in keys if keys is not None else sorted(batch):
        if k not in batch:
            continue
        a = np.ascontiguousarray(np.asarray(batch[k]))
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return int(h.hexdigest()[:12], 16)


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _progress_line(step: int, total: int, s: Mapping[str, float]) -> str:
    line = f"step {step}/{total}  loss {s['loss']:.4f}  {s['perf/steps_per_s']:.2f} steps/s"
    if s.get("perf/tokens_per_s"):
        line += f"  {s['perf/tokens_per_s']:.0f} tokens/s"
    if s.get("perf/mfu"):
        line += f"  MFU {100 * s['perf/mfu']:.2f}%"
    eta = (total - step) / max(s["perf/steps_per_s"], 1e-9)
    return line + f"  ETA {eta:.0f}s"


def _restore(job: Job, ckpt: Checkpointer, workdir: epath.Path) -> Restored | None:
    """The newest good checkpoint, refused (ConfigError) when it was trained under another config or
    tokenizer or beyond `total_steps`; a non-finite one is damaged (moved aside, an older one tried)."""
    config = job.config

    def check(saved_config: dict, saved_meta: dict) -> None:
        check_resume(saved_config, saved_meta, config_json(config), config, job.fingerprints,
                     where=str(workdir / "checkpoints" / str(saved_meta.get("step", "?"))))

    def is_bad(state) -> str | None:
        bad = nonfinite_leaves(state)
        return f"non-finite values in {', '.join(bad)}" if bad else None

    return ckpt.restore_latest(job.state, check=check, is_bad=is_bad)


def run(job: Job, workdir: epath.Path) -> dict:
    """Train `job` (resuming if possible) until `config.total_steps`; returns the last metrics."""
    config, state = job.config, job.state
    validate_run_settings(config)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    try:
        start_step = 0
        restored = _restore(job, ckpt, workdir)  # resharded onto this run's mesh, whatever it was saved on
        if restored is not None:
            start_step, state = restored.step, restored.state
            job.train_iter.set_state(restored.data)
            log.info("resuming at step %d%s", start_step,
                     " (config.init_from is ignored: the checkpoint already holds the copied weights)"
                     if config.get("init_from", "") else "")
        elif config.get("init_from", ""):
            state = apply_init_from(config.init_from, state, job.shardings)
        if job.observe_state is not None:
            job.observe_state(state, start_step)
    except BaseException:
        ckpt.close()
        raise
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))  # after the resume checks
    log.info("%s; %.2f%% of parameter bytes replicated over a non-data axis", job.plan.describe(),
             100 * job.replicated)
    if job.routing:
        log.info("Muon routing:\n%s", job.routing)
        (workdir / "routing.txt").write_text(job.routing + "\n")

    primary = jax.process_index() == 0
    if primary:  # the logs of steps after the checkpoint (a kill) are logged again: drop the old ones
        dropped = rollback_jsonl(workdir / "metrics.jsonl", start_step if restored is not None else -1)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows logged after step %d (training resumes there)", dropped,
                     start_step)
    purge = start_step + 1 if restored is not None else 0  # TensorBoard hides what was logged after it
    writer = MultiWriter([TensorBoardWriter(workdir / "tensorboard", purge_step=purge),
                          JsonlWriter(workdir / "metrics.jsonl")])
    last: dict = {}
    if start_step == 0:
        writer.write_hparams(dict(job.hparams, trainer=config.get("trainer", "")))
        if job.start_scalars is not None:
            writer.write_scalars(0, job.start_scalars())
        if job.evaluate is not None and config.eval_every:
            last = job.evaluate(state)  # the starting point (random init or init_from) training must beat
            writer.write_scalars(0, last)
            log.info("step 0 (before training): %s", _brief(last))
    peak, peak_source = flops_lib.device_peak_flops()
    log.info("device peak %.3g FLOP/s (%s) x %d devices", peak, peak_source, jax.device_count())

    preemption = Preemption()
    monitor = NonFiniteMonitor(config.get("nonfinite", "stop"), int(config.get("max_nonfinite_skips", 20)))
    hosts = jax.process_count()
    acc: dict = {}
    stats_mark = dict(job.train_iter.stats)
    tokens, flops, window_start, window_steps, data_time, eval_time = 0, 0.0, time.time(), 0, 0.0, 0.0
    step = start_step
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            t_data = time.time()
            batch = next(job.train_iter)
            data_time += time.time() - t_data
            if config.get("log_batch_hash", False):  # proves that runs saw byte-identical batches
                writer.write_scalars(step, {"data/batch_hash": batch_hash(batch, job.batch_keys)})
            state, metrics = job.train_step(state, batch, step)
            if job.observe_state is not None:
                job.observe_state(state, step)
            for _, good in monitor.push(step, metrics):  # the previous step's flag: no wait on this one
                acc = average(acc, good)
            if job.work is not None:
                w = job.work(batch)
                tokens += int(w.get("tokens", 0)) * hosts
                flops += float(w.get("flops", 0.0)) * hosts
            window_steps += 1
            ckpt.poll()  # a finished save is logged, a failed one stops the run now

            if step % config.log_every == 0 or step == config.total_steps or preemption.requested:
                for _, good in monitor.flush():
                    acc = average(acc, good)
                scalars = {(k if k == "loss" else f"train/{k}"): float(v.compute()) for k, v in acc.items()}
                if "loss" not in scalars and "train/loss/total" in scalars:
                    scalars["loss"] = scalars.pop("train/loss/total")
                if monitor.mode == "skip":
                    scalars["train/nonfinite_skipped"] = float(monitor.skipped)
                elapsed = max(time.time() - window_start - eval_time, 1e-9)
                scalars["perf/steps_per_s"] = window_steps / elapsed
                scalars["perf/data_fraction"] = data_time / elapsed
                if tokens:
                    scalars["perf/tokens_per_s"] = tokens / elapsed
                if flops:
                    scalars["perf/mfu"] = flops / elapsed / (peak * jax.device_count())
                stats = dict(job.train_iter.stats)
                if "examples" in stats:
                    scalars["perf/examples_per_s"] = (stats["examples"] - stats_mark.get("examples", 0)) / elapsed
                stats_mark = stats
                scalars.update({f"lr/{k}": float(s(step - 1)) for k, s in job.schedules.items()})
                scalars.update({f"data/{k}": float(v) for k, v in stats.items()})
                writer.write_scalars(step, scalars)
                if "loss" in scalars:
                    log.info("%s", _progress_line(step, config.total_steps, scalars))
                else:
                    log.warning("step %d: every step since the last log line was skipped (non-finite)", step)
                last.update(scalars)
                acc, tokens, flops, window_steps = {}, 0, 0.0, 0
                window_start, data_time, eval_time = time.time(), 0.0, 0.0

            if job.evaluate is not None and config.eval_every and (
                    step % config.eval_every == 0 or step == config.total_steps):
                t_eval = time.time()
                ev = job.evaluate(state)
                writer.write_scalars(step, ev)
                log.info("step %d eval: %s", step, _brief(ev))
                last.update(ev)
                eval_time += time.time() - t_eval

            if step % config.checkpoint_every == 0 or step == config.total_steps or preemption.requested:
                for _, good in monitor.flush():  # this step's flag (stop mode: raises before anything is saved)
                    acc = average(acc, good)
                bad = nonfinite_leaves(state)
                if bad:
                    raise NonFiniteError(f"step {step}: the state holds non-finite values ({', '.join(bad)}) "
                                         "although the loss was finite; not saved. Lower the learning rates; "
                                         "rerunning resumes from the last checkpoint")
                ckpt.save(step, state, job.train_iter.get_state(), config_json(config),
                          meta={"fingerprints": dict(job.fingerprints)}, force=True)
            writer.flush()
            if preemption.requested:
                break
    finally:
        try:
            ckpt.close()
        finally:
            writer.close()
            preemption.restore()
    if not preemption.requested and step == config.total_steps:
        plot_curves(workdir / "metrics.jsonl", workdir / "loss_curves.png")
        if job.evaluate is not None and config.eval_every:
            log.info("evaluation, step 0 (the start) vs step %d (eval_table.md):\n%s", step,
                     write_eval_table(workdir, step))
        if job.finish is not None:
            job.finish(workdir, step)
    return dict(last, step=step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> dict:
    """Run the stage named by `config.trainer` in `workdir` (resuming if it holds checkpoints), holding
    the run directory's lock (a second run on it is refused)."""
    validate_run_settings(config)
    workdir = as_path(workdir)
    stage = stage_module(config)
    plan = mesh_plan(config)  # the mesh, and every check on it, before anything is built
    with lock_run_directory(workdir):
        return run(stage.setup(config, workdir, plan), workdir)


@contextlib.contextmanager
def lock_run_directory(workdir: epath.Path):
    """`RunLock` held by process 0; on several hosts its outcome is shared, so that every process
    stops (ConfigError) when the directory is locked instead of waiting in a collective."""
    lock, refused = RunLock(workdir, enabled=jax.process_index() == 0), None
    try:
        lock.acquire()
    except ConfigError as e:
        refused = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(refused is None))) and refused is None:
            refused = ConfigError("workdir", f"process 0 could not lock {workdir} (see its error)")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        lock.release()


def _brief(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(metrics.items()))
