"""Stage 3 trainer: VLM pre-training with MMTP on packed image-text and text-only data.

One readable loop, big_vision style:
  data (shapes world built on first use, SentencePiece tokenizer, grain pipeline)
  -> model from the config (vocab size and <|image|> id taken from the tokenizer)
  -> Muon (or AdamW) with per-module groups and schedules -> resume from the newest good checkpoint
  -> steps: train, router-bias update, log (TensorBoard + metrics.jsonl + progress
     line with steps/s, tokens/s, ETA, MFU), evaluate, checkpoint (async)
  -> on SIGTERM: checkpoint the current step and exit cleanly
  -> at the end: wait for the last checkpoint, plot the loss curves.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from glm5v_jax.data import pipeline as pipeline_lib
from glm5v_jax.data.tokenizer import Tokenizer, train_tokenizer
from glm5v_jax.losses.lm import vlm_loss
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.train import flops as flops_lib
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.sharding.partition import create_sharded
from glm5v_jax.sharding.rules import parameter_shardings
from glm5v_jax.train.optimizer import transform_from_config
from glm5v_jax.train.parallel import (MeshPlan, batch_shardings, global_batch, jit_eval, jit_step,
                                       plan_from_config, preflight)
from glm5v_jax.train.step import train_step
from glm5v_jax.train.writers import JsonlWriter, MultiWriter, TensorBoardWriter, plot_curves

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- data
DATASETS = ("shapes_world", "tfds", "array_record")


def _shapes_world(cfg, workdir: Path):
    from glm5v_jax.data import shapes_world, shapes_world_tfds

    data_dir = Path(cfg.data_dir) if cfg.data_dir else workdir / "data"
    sizes = dict(cfg.split_sizes)
    t0 = time.time()
    dataset_dir = Path(shapes_world_tfds.build_shapes_world(str(data_dir), seed=cfg.build_seed, split_sizes=sizes))
    log.info("shapes world ready at %s (%.1f s)", dataset_dir, time.time() - t0)
    if cfg.tokenizer:
        tokenizer = Tokenizer(cfg.tokenizer)
    else:
        path = dataset_dir / f"tokenizer_{cfg.tokenizer_vocab_size}.model"
        if path.exists():
            tokenizer = Tokenizer(str(path))
        else:
            t0 = time.time()
            tokenizer = train_tokenizer(shapes_world.iter_texts(cfg.build_seed, sizes), str(path),
                                        vocab_size=cfg.tokenizer_vocab_size)
            log.info("trained tokenizer %s (%d pieces) in %.1f s", path, tokenizer.vocab_size, time.time() - t0)
    weights = {"image": 1.0 - cfg.text_weight, "text": cfg.text_weight}
    splits = {"train": {"image": "train", "text": "text_train"},
              "eval": {"image": "validation", "text": "text_validation"}}
    sources = {part: {kind: shapes_world_tfds.load_split(str(dataset_dir), split) for kind, split in names.items()}
               for part, names in splits.items()}
    return sources, weights, tokenizer


def prepare_data(cfg: ml_collections.ConfigDict, workdir: Path):
    """({"train": {name: source}, "eval": {...}}, mixture weights, tokenizer) from config.data.

    `shapes_world` is built (with its tokenizer) on first use; `tfds` reads any TFDS
    dataset with an image and a text feature (`config.data.tfds.*`); `array_record`
    reads record files (`config.data.array_record.*`). Real corpora need
    `config.data.tokenizer`.
    """
    if cfg.dataset not in DATASETS:
        raise ValueError(f"config.data.dataset: unknown dataset {cfg.dataset!r}; expected one of {DATASETS}")
    if cfg.dataset == "shapes_world":
        return _shapes_world(cfg, workdir)
    if not cfg.tokenizer:
        raise ValueError("config.data.tokenizer: a real corpus needs the path of a SentencePiece model "
                         "with the GLM special tokens (see glm5v_jax.data.tokenizer.train_tokenizer)")
    tokenizer = Tokenizer(cfg.tokenizer)
    if cfg.dataset == "tfds":
        t = cfg.tfds
        if not t.name:
            raise ValueError("config.data.tfds.name: set the TFDS dataset name")
        make = lambda split: pipeline_lib.tfds_source(t.name, split, t.data_dir or None,  # noqa: E731
                                                      image_key=t.image_key, text_key=t.text_key)
        sources = {"train": {"corpus": make(t.train_split)}, "eval": {"corpus": make(t.eval_split)}}
    else:
        a = cfg.array_record
        paths = {part: sorted(p for pattern in getattr(a, f"{part}_paths").split(",") if pattern.strip()
                              for p in glob.glob(pattern.strip()))
                 for part in ("train", "eval")}
        for part, found in paths.items():
            if not found:
                raise ValueError(f"config.data.array_record.{part}_paths: no files match "
                                 f"{getattr(a, f'{part}_paths')!r}")
        sources = {part: {"corpus": pipeline_lib.array_record_source(found, parse=a.parse)}
                   for part, found in paths.items()}
    return sources, {"corpus": 1.0}, tokenizer


def make_iterator(cfg, sources: dict, weights: dict, tokenizer: Tokenizer, spec, *, seed: int, train: bool):
    source = pipeline_lib.mix_sources(sources, {k: weights[k] for k in sources}, seed)
    pcfg = pipeline_lib.PipelineConfig(
        seq_len=cfg.seq_len, rows_per_batch=cfg.batch_size // jax.process_count(),
        max_images_per_row=cfg.max_images_per_row, patch_size=spec.vision.patch_size,
        max_patches=spec.vision.max_patches, merge=spec.vision.merge_size, seed=seed,
        num_epochs=None if train else 1, shuffle=train, num_workers=cfg.num_workers if train else 0,
        process_index=jax.process_index(), process_count=jax.process_count())
    return pipeline_lib.make_batch_iterator(source, tokenizer, pcfg)


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """The vocabulary size and <|image|> id come from the tokenizer, whatever the preset said."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.backbone.vocab_size = tokenizer.padded_vocab_size
    config.model.image_token_id = tokenizer.image_id
    return config


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(model: GLM5V, cfg: ml_collections.ConfigDict, total_steps: int, workdir: Path | None = None,
                    **kwargs):
    """(nnx.Optimizer, {"<group>/<kind>": schedule}, {param path: "<group>/<kind>"}) from
    config.optim; logs the Muon routing table (and writes it to <workdir>/routing.txt).
    `kwargs` (mesh, shardings) go to `transform_from_config`."""
    tx, schedules, labels, routing = transform_from_config(model, cfg, total_steps, **kwargs)
    _log_routing(routing, workdir)
    return nnx.Optimizer(model, tx, wrt=nnx.Param), schedules, labels


def _log_routing(routing: str | None, workdir: Path | None) -> None:
    if routing is None:
        return
    log.info("Muon routing:\n%s", routing)
    if workdir is not None:
        (workdir / "routing.txt").write_text(routing + "\n")


# ----------------------------------------------------------------------------- the run on a mesh
@dataclasses.dataclass(frozen=True)
class ShardedSetup:
    """What the trainer (and the AOT tool) build before any array exists."""

    abstract_model: GLM5V
    replicated: float  # fraction of parameter bytes replicated over a non-data mesh axis
    param_shardings: dict
    make: Callable[[], tuple]  # () -> (model, nnx.Optimizer), to run under create_sharded / eval_shape
    schedules: dict
    update_labels: dict
    routing: str | None


def sharded_setup(config: ml_collections.ConfigDict, spec, plan: MeshPlan) -> ShardedSetup:
    """Preflight checks (ConfigError naming the field), parameter shardings and the
    optimizer of `config.optim` placed on `plan`'s mesh, all from an abstract model."""
    abstract_model = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(config.seed)))
    replicated = preflight(abstract_model, plan, global_batch=config.data.batch_size, mesh_cfg=config.mesh)
    param_sh = parameter_shardings(abstract_model, plan.mesh, plan.rules)
    tx, schedules, labels, routing = transform_from_config(abstract_model, config.optim, config.total_steps,
                                                           mesh=plan.mesh, shardings=param_sh)

    def make():
        model = GLM5V(spec, rngs=nnx.Rngs(config.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return ShardedSetup(abstract_model, replicated, param_sh, make, schedules, labels, routing)


def train_step_fn(graphdef, config: ml_collections.ConfigDict, update_labels: dict | None):
    """`(state, batch) -> (state, metrics)`: the trainer's step on split (model, optimizer)
    state. `update_labels=None` leaves out the per-group update-RMS metrics."""
    mtp_w, bal_w = float(config.model.mtp.loss_weight), float(config.model.backbone.balance_loss_weight)
    bias_rate, tau = float(config.optim.router_bias_update_rate), float(config.optim.qk_clip_tau)

    def pure_train_step(state, batch):
        m, o = nnx.merge(graphdef, state)
        metrics = train_step(m, o, batch, mtp_loss_weight=mtp_w, balance_loss_weight=bal_w,
                             router_bias_rate=bias_rate, update_labels=update_labels, qk_clip_tau=tau)
        return nnx.state((m, o)), metrics

    return pure_train_step


# ----------------------------------------------------------------------------- helpers
class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) -> finish the current step, checkpoint it, exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        log.warning("%s received: checkpointing the current step and stopping", signal.Signals(signum).name)
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _average(acc: dict, metrics: dict) -> dict:
    for k, v in metrics.items():
        m = clu_metrics.Average.from_model_output(jnp.asarray(v, jnp.float32))
        acc[k] = m if k not in acc else acc[k].merge(m)
    return acc


def evaluate(eval_fn, state, make_eval_iter, num_batches: int, shardings) -> dict:
    """Mean losses over the first `num_batches` validation batches (fixed order)."""
    acc: dict = {}
    for i, batch in enumerate(make_eval_iter()):
        if i >= num_batches:
            break
        acc = _average(acc, eval_fn(state, global_batch(_batch_arrays(batch), shardings)))
    return {f"eval/{k}": float(v.compute()) for k, v in acc.items()}


_BATCH_KEYS = ("tokens", "segment_ids", "loss_mask", "patches", "patch_yx", "patch_valid", "image_grid",
               "image_valid")


def _batch_arrays(batch: dict) -> dict:
    return {k: batch[k] for k in _BATCH_KEYS if k in batch}


def batch_hash(batch: dict) -> int:
    """A 48-bit fingerprint of a host batch: the first 12 hex digits of sha256 over each
    array's name, dtype, shape and bytes in `_BATCH_KEYS` order. An int below 2**53, so it
    is exact as a float in metrics.jsonl (TensorBoard gets a float32-rounded value)."""
    h = hashlib.sha256()
    for k, v in _batch_arrays(batch).items():
        a = np.ascontiguousarray(np.asarray(v))
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return int(h.hexdigest()[:12], 16)


def batch_contract(spec, data_cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of a training batch (see glm5v_jax.data.batch)."""
    b, s, m = data_cfg.batch_size, data_cfg.seq_len, data_cfg.max_images_per_row
    n, p = spec.vision.max_patches, spec.vision.patch_size
    sds = jax.ShapeDtypeStruct
    return dict(tokens=sds((b, s), jnp.int32), segment_ids=sds((b, s), jnp.int32), loss_mask=sds((b, s), bool),
                patches=sds((b * m, n, p * p * 3), jnp.float32), patch_yx=sds((b * m, n, 2), jnp.int32),
                patch_valid=sds((b * m, n), bool), image_grid=sds((b * m, 2), jnp.int32),
                image_valid=sds((b * m,), bool))


# ----------------------------------------------------------------------------- main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming if possible) until `config.total_steps`; returns the last metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources, weights, tokenizer = prepare_data(config.data, workdir)
    config = resolve_model_config(config, tokenizer)
    spec = vlm_spec_from_config(config.model)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    # The mesh, and every check that can fail, before anything is built or compiled.
    plan = plan_from_config(config.mesh)
    setup = sharded_setup(config, spec, plan)
    log.info("%s; %.2f%% of parameter bytes replicated over a non-data axis", plan.describe(),
             100 * setup.replicated)
    _log_routing(setup.routing, workdir)
    schedules, abstract_model = setup.schedules, setup.abstract_model

    # Model and optimizer state are created already sharded: no device holds a full replica.
    graphdef, state, state_sh = create_sharded(setup.make, plan.mesh, setup.param_shardings)
    train_iter = make_iterator(config.data, sources["train"], weights, tokenizer, spec, seed=config.seed,
                               train=True)

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    start_step = 0
    restored = ckpt.restore_latest(state)  # resharded onto this run's mesh, whatever it was saved on
    if restored is not None:
        start_step, state, data_state, _ = restored
        train_iter.set_state(data_state)
        log.info("resuming at step %d", start_step)

    mtp_w, bal_w = float(config.model.mtp.loss_weight), float(config.model.backbone.balance_loss_weight)
    pure_train_step = train_step_fn(graphdef, config, setup.update_labels)

    def pure_eval_step(state, batch):
        m, _ = nnx.merge(graphdef, state)
        _, metrics = vlm_loss(m(batch), batch, mtp_loss_weight=mtp_w, balance_loss_weight=bal_w)
        return metrics

    batch_sh = batch_shardings(batch_contract(spec, config.data), plan)
    step_fn = jit_step(pure_train_step, plan, state_sh, batch_sh)
    eval_fn = jit_eval(pure_eval_step, plan, state_sh, batch_sh)

    def make_eval_iter():
        return make_iterator(config.data, sources["eval"], weights, tokenizer, spec, seed=0, train=False)

    writer = MultiWriter([TensorBoardWriter(workdir / "tensorboard"), JsonlWriter(workdir / "metrics.jsonl")])
    if start_step == 0:
        writer.write_hparams({"preset": config.preset, "mmtp": config.model.mtp.mode,
                              "params": sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))})
    if start_step == 0 and config.get("measure_pipeline_batches", 0):
        probe = make_iterator(config.data, sources["train"], weights, tokenizer, spec, seed=config.seed + 1,
                              train=True)
        tput = pipeline_lib.measure_throughput(probe, config.measure_pipeline_batches)
        writer.write_scalars(0, {"perf/pipeline_examples_per_s": tput["examples_per_s"],
                                 "perf/pipeline_tokens_per_s": tput["tokens_per_s"]})
        log.info("input pipeline alone: %.1f examples/s, %.0f tokens/s (%d batches)",
                 tput["examples_per_s"], tput["tokens_per_s"], config.measure_pipeline_batches)
    peak, peak_source = flops_lib.device_peak_flops()
    log.info("device peak %.3g FLOP/s (%s) x %d devices", peak, peak_source, jax.device_count())
    if start_step == 0 and config.eval_every:
        ev = evaluate(eval_fn, state, make_eval_iter, config.data.eval_batches, batch_sh)
        writer.write_scalars(0, ev)
        log.info("step 0  eval loss %.4f (before training)", ev.get("eval/loss/total", float("nan")))
    preemption = _Preemption()

    acc: dict = {}
    last: dict = {}
    examples_mark = train_iter.stats.get("examples", 0)
    tokens_seen, flops_done, window_start, window_steps = 0, 0.0, time.time(), 0
    data_time, eval_time = 0.0, 0.0  # eval time is excluded from the throughput window
    step = start_step
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            t_data = time.time()
            batch = next(train_iter)
            data_time += time.time() - t_data
            if config.get("log_batch_hash", False):  # proves runs saw byte-identical batches
                writer.write_scalars(step, {"data/batch_hash": batch_hash(batch)})
            state, metrics = step_fn(state, global_batch(_batch_arrays(batch), batch_sh))
            acc = _average(acc, metrics)
            n_images = int(np.asarray(batch["image_valid"]).sum()) if "image_valid" in batch else 0
            tokens_seen += int((np.asarray(batch["segment_ids"]) != 0).sum())
            flops_done += flops_lib.train_flops_per_step(
                spec, rows=batch["tokens"].shape[0] * jax.process_count(), seq_len=batch["tokens"].shape[1],
                images=n_images, patches_per_image=spec.vision.max_patches)
            window_steps += 1

            if step % config.log_every == 0 or step == config.total_steps or preemption.requested:
                scalars = {f"train/{k}": float(v.compute()) for k, v in acc.items()}
                scalars["loss"] = scalars.pop("train/loss/total")
                elapsed = max(time.time() - window_start - eval_time, 1e-9)
                scalars.update({
                    "perf/steps_per_s": window_steps / elapsed,
                    "perf/tokens_per_s": tokens_seen / elapsed,
                    "perf/mfu": flops_done / elapsed / (peak * jax.device_count()),
                    "perf/data_fraction": data_time / elapsed,
                    "perf/examples_per_s": (train_iter.stats.get("examples", 0) - examples_mark) / elapsed,
                })
                examples_mark = train_iter.stats.get("examples", 0)
                scalars.update({f"lr/{k}": float(s(step - 1)) for k, s in schedules.items()})
                scalars.update({f"data/{k}": float(v) for k, v in train_iter.stats.items()})
                writer.write_scalars(step, scalars)
                eta = (config.total_steps - step) / max(scalars["perf/steps_per_s"], 1e-9)
                log.info("step %d/%d  loss %.4f  %.2f steps/s  %.0f tokens/s  MFU %.2f%%  ETA %.0fs",
                         step, config.total_steps, scalars["loss"], scalars["perf/steps_per_s"],
                         scalars["perf/tokens_per_s"], 100 * scalars["perf/mfu"], eta)
                last = scalars
                acc, tokens_seen, flops_done, window_steps = {}, 0, 0.0, 0
                window_start, data_time, eval_time = time.time(), 0.0, 0.0

            if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
                t_eval = time.time()
                ev = evaluate(eval_fn, state, make_eval_iter, config.data.eval_batches, batch_sh)
                writer.write_scalars(step, ev)
                log.info("step %d  eval loss %.4f", step, ev.get("eval/loss/total", float("nan")))
                last.update(ev)
                eval_time += time.time() - t_eval

            if step % config.checkpoint_every == 0 or step == config.total_steps or preemption.requested:
                ckpt.save(step, state, train_iter.get_state(), json.loads(config.to_json_best_effort()),
                          force=True)
            writer.flush()
            if preemption.requested:
                break
    finally:
        ckpt.close()
        writer.close()
        preemption.restore()
    if not preemption.requested:
        plot_curves(workdir / "metrics.jsonl", workdir / "loss_curves.png")
    return dict(last, step=step)
