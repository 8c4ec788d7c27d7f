"""Stage: VLM pre-training with MMTP on packed image-text and text-only data (report 2.2).

Reads top to bottom; the run layer (`glm5v_jax.train.run`) does the loop, checkpoints, resume,
`init_from`, preemption and writers:
  data: the named sources of config.data.sources (shapes world built on first use, TFDS datasets,
     ArrayRecord files; `glm5v_jax.data.source_registry`) and the tokenizer (config.data.tokenizer,
     or SentencePiece trained on the shapes-world texts) -> grain pipeline of packed rows (segment
     ids, loss mask, NaFlex patches per image slot)
  -> model from the config (vocabulary size and <|image|> id from the tokenizer)
  -> Muon (or AdamW) with per-module groups, created sharded on the mesh (`config.mesh`)
  -> step: LM loss + lambda x MTP loss (+ balance loss), optimizer, router-bias update
  -> evaluate: mean validation losses over the first `config.data.eval_batches` batches.
The SFT stage (`vlm_sft`) reuses `build_model_job` with its own data and evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from glm5v_jax.data import pipeline as pipeline_lib
from glm5v_jax.data.source_registry import open_sources, tokenizer_from_config
from glm5v_jax.data.tokenizer import RUN_FILE, Tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.losses.lm import vlm_loss
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.train import flops as flops_lib
from glm5v_jax.train import run as run_lib
from glm5v_jax.train.optimizer import transform_from_config
from glm5v_jax.train.parallel import (MeshPlan, TrainProgram, abstract_state, batch_shardings, global_batch,
                                       jit_eval, jit_step, local_row_shards, plan_from_config)
from glm5v_jax.train.step import train_step

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "segment_ids", "loss_mask", "patches", "patch_yx", "patch_valid", "image_grid",
              "image_valid")

# ----------------------------------------------------------------------------- data
# The run's tokenizer, kept in its directory: stages chained by init_from read it from there, so ids
# and vocabulary match.
TOKENIZER_FILE = RUN_FILE


def save_tokenizer(tokenizer: Tokenizer, workdir: epath.Path) -> None:
    path = epath.Path(workdir) / TOKENIZER_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tokenizer.serialized_model_proto)


def prepare_data(cfg: ml_collections.ConfigDict, workdir: epath.Path, tokenizer: Tokenizer | None = None):
    """({"train": {name: source}, "eval": {name: source}}, mixture weights, tokenizer) from
    config.data: its named sources (`glm5v_jax.data.source_registry`; shapes world is built on first
    use) and `tokenizer`, else `tokenizer_from_config` (config.data.tokenizer, or one trained on the
    shapes-world texts; a real corpus needs config.data.tokenizer)."""
    data = open_sources(cfg, workdir)
    tokenizer = tokenizer or tokenizer_from_config(cfg, workdir)
    return {"train": data.train, "eval": data.eval}, data.weights, tokenizer


def pipeline_config(cfg, spec, *, seed: int, train: bool, row_shards: int = 1,
                    **extra) -> pipeline_lib.PipelineConfig:
    """The packed-row pipeline settings of config.data for this host; `row_shards`: the data-parallel shards
    of the host's rows, which joint packing balances over unless `data.packing_ranks` (> 0) says otherwise."""
    return pipeline_lib.PipelineConfig(
        seq_len=cfg.seq_len, rows_per_batch=cfg.batch_size // jax.process_count(),
        max_images_per_row=cfg.max_images_per_row, patch_size=spec.vision.patch_size,
        max_patches=spec.vision.max_patches, merge=spec.vision.merge_size, seed=seed,
        num_epochs=None if train else 1, shuffle=train, num_workers=cfg.num_workers if train else 0,
        process_index=jax.process_index(), process_count=jax.process_count(),
        packing=cfg.packing, packing_ranks=int(cfg.packing_ranks) or row_shards, **extra)


def make_iterator(cfg, sources: dict, weights: dict, tokenizer: Tokenizer, spec, *, seed: int, train: bool,
                  **extra):
    source = pipeline_lib.mix_sources(sources, {k: weights[k] for k in sources}, seed)
    return pipeline_lib.make_batch_iterator(source, tokenizer, pipeline_config(cfg, spec, seed=seed, train=train,
                                                                               **extra))


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """The vocabulary size and <|image|> id come from the tokenizer, whatever the preset said."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.backbone.vocab_size = tokenizer.padded_vocab_size
    config.model.image_token_id = tokenizer.image_id
    return config


def batch_hash(batch: dict) -> int:
    """`run.batch_hash` over the training keys (what the ablation compares across modes)."""
    return run_lib.batch_hash(batch, BATCH_KEYS)


def batch_contract(spec, data_cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of a training batch (see glm5v_jax.data.batch)."""
    b, s, m = data_cfg.batch_size, data_cfg.seq_len, data_cfg.max_images_per_row
    n, p = spec.vision.max_patches, spec.vision.patch_size
    sds = jax.ShapeDtypeStruct
    return dict(tokens=sds((b, s), jnp.int32), segment_ids=sds((b, s), jnp.int32), loss_mask=sds((b, s), bool),
                patches=sds((b * m, n, p * p * 3), jnp.float32), patch_yx=sds((b * m, n, 2), jnp.int32),
                patch_valid=sds((b * m, n), bool), image_grid=sds((b * m, 2), jnp.int32),
                image_valid=sds((b * m,), bool))


# ----------------------------------------------------------------------------- model, optimizer, step
def build_optimizer(model: GLM5V, cfg: ml_collections.ConfigDict, total_steps: int, **kwargs):
    """(nnx.Optimizer, {"<group>/<kind>": schedule}, {param path: "<group>/<kind>"}) from config.optim
    (for benchmarks and tests that hold a model; `kwargs` (mesh, shardings) go to `transform_from_config`)."""
    tx, schedules, labels, _ = transform_from_config(model, cfg, total_steps, **kwargs)
    return nnx.Optimizer(model, tx, wrt=nnx.Param), schedules, labels


def train_step_fn(graphdef, config: ml_collections.ConfigDict, update_labels: dict | None,
                  loss_fn: Callable | None = None):
    """`(state, batch) -> (state, metrics)` on the split TrainState. `update_labels=None` leaves out
    the per-group update-RMS metrics; `loss_fn(outputs, batch) -> (loss, metrics)` replaces the
    pre-training objective (`glm5v_jax.train.step.train_step`)."""
    mtp_w, bal_w = float(config.model.mtp.loss_weight), float(config.model.backbone.balance_loss_weight)
    bias_rate, tau = float(config.optim.router_bias_update_rate), float(config.optim.qk_clip_tau)

    def pure_train_step(state, batch):
        ts = nnx.merge(graphdef, state)
        metrics = train_step(ts.model, ts.optimizer, batch, mtp_loss_weight=mtp_w, balance_loss_weight=bal_w,
                             router_bias_rate=bias_rate, update_labels=update_labels, qk_clip_tau=tau,
                             loss_fn=loss_fn)
        return nnx.state(ts), metrics

    return pure_train_step


def eval_step_fn(graphdef, config: ml_collections.ConfigDict, *, predictions: bool = False):
    """`(state, batch) -> metrics`: the losses of the training objective, no update.
    `predictions=True`: `(metrics, main-head argmax [B, S] int32)` (SFT's answer accuracy)."""
    mtp_w, bal_w = float(config.model.mtp.loss_weight), float(config.model.backbone.balance_loss_weight)

    def pure_eval_step(state, batch):
        outputs = nnx.merge(graphdef, state).model(batch)
        _, metrics = vlm_loss(outputs, batch, mtp_loss_weight=mtp_w, balance_loss_weight=bal_w)
        return (metrics, outputs["logits"].argmax(-1).astype(jnp.int32)) if predictions else metrics

    return pure_eval_step


@dataclasses.dataclass
class ModelJob:
    """The VLM on the mesh with its jitted train and eval steps (shared by pre-training and SFT)."""

    spec: Any
    placed: run_lib.PlacedState
    batch_shardings: dict
    train_step: Callable  # (state, global batch) -> (state, metrics)
    eval_step: Callable  # (state, global batch) -> metrics

    def row_shards(self, data_cfg) -> int:
        """The data-parallel shards of this host's rows (what joint packing balances over)."""
        return local_row_shards(self.batch_shardings["tokens"], int(data_cfg.batch_size), int(data_cfg.seq_len))

    def job(self, config, plan: MeshPlan, train_iter, evaluate, **kw) -> run_lib.Job:
        """A run-layer Job that feeds host batches of `BATCH_KEYS` (plus `kw`) to the train step."""
        spec, batch_sh, placed = self.spec, self.batch_shardings, self.placed

        def step(state, batch, step_num):
            del step_num
            return self.train_step(state, global_batch({k: batch[k] for k in BATCH_KEYS if k in batch}, batch_sh))

        def work(batch):
            images = int(np.asarray(batch["image_valid"]).sum()) if "image_valid" in batch else 0
            return dict(tokens=int((np.asarray(batch["segment_ids"]) != 0).sum()),
                        flops=flops_lib.train_flops_per_step(spec, rows=batch["tokens"].shape[0],
                                                             seq_len=batch["tokens"].shape[1], images=images,
                                                             patches_per_image=spec.vision.max_patches))

        return run_lib.Job(config=config, plan=plan, state=placed.state, shardings=placed.shardings,
                           train_iter=train_iter, train_step=step, schedules=placed.schedules, evaluate=evaluate,
                           work=work, batch_keys=BATCH_KEYS, routing=placed.routing, replicated=placed.replicated,
                           hparams=dict(preset=config.get("preset", ""), mmtp=config.model.mtp.mode,
                                        params=placed.params), **kw)


def place_model(config: ml_collections.ConfigDict, spec, plan: MeshPlan, *, abstract: bool = False,
                update_rms: bool = True, loss_fn: Callable | None = None,
                contract: dict[str, jax.ShapeDtypeStruct] | None = None):
    """(PlacedState of the VLM and its optimizer, batch shardings, jitted train step): the pieces the
    run and the AOT program share. `update_rms`: log the per-group update-RMS metrics; `loss_fn` and
    `contract` (the batch's global shapes, default `batch_contract`): another objective on another batch
    (the RL stage)."""
    placed = run_lib.place_state(config, plan, lambda: GLM5V(spec, rngs=nnx.Rngs(config.seed)), abstract=abstract)
    batch_sh = batch_shardings(contract or batch_contract(spec, config.data), plan)
    step = jit_step(train_step_fn(placed.graphdef, config, placed.update_labels if update_rms else None, loss_fn),
                    plan, placed.shardings, batch_sh, nonfinite=config.get("nonfinite", "stop"))
    return placed, batch_sh, step


def build_model_job(config: ml_collections.ConfigDict, plan: MeshPlan) -> ModelJob:
    """Model and optimizer created sharded on `plan`, with the jitted steps (explicit shardings)."""
    spec = vlm_spec_from_config(config.model)
    placed, batch_sh, step = place_model(config, spec, plan)
    return ModelJob(spec, placed, batch_sh, step,
                    jit_eval(eval_step_fn(placed.graphdef, config), plan, placed.shardings, batch_sh))


def mean_metrics(eval_step: Callable, state, batches: Iterator[dict], num_batches: int, shardings) -> dict:
    """Means over the first `num_batches` batches of `eval_step(state, batch)`'s scalars."""
    acc: dict = {}
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        acc = run_lib.average(acc, eval_step(state, global_batch({k: batch[k] for k in BATCH_KEYS if k in batch},
                                                                 shardings)))
    return {k: float(v.compute()) for k, v in acc.items()}


# ----------------------------------------------------------------------------- the stage
def check_eval_parts(config: ml_collections.ConfigDict, sources: dict) -> None:
    """Evaluation reads the sources' eval parts: ConfigError when it is on and there are none."""
    if config.eval_every and not sources["eval"]:
        raise ConfigError("config.data.sources", "evaluation (config.eval_every > 0) reads the sources' eval "
                                                 "parts: give a source an eval_split, or set config.eval_every=0")


def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> run_lib.Job:
    sources, weights, tokenizer = prepare_data(config.data, workdir)
    check_eval_parts(config, sources)
    config = resolve_model_config(config, tokenizer)
    save_tokenizer(tokenizer, workdir)
    mj = build_model_job(config, plan)
    shards = mj.row_shards(config.data)
    train_iter = make_iterator(config.data, sources["train"], weights, tokenizer, mj.spec, seed=config.seed,
                               train=True, row_shards=shards)

    def evaluate(state) -> dict:
        batches = make_iterator(config.data, sources["eval"], weights, tokenizer, mj.spec, seed=0, train=False,
                                row_shards=shards)
        means = mean_metrics(mj.eval_step, state, batches, config.data.eval_batches, mj.batch_shardings)
        return {f"eval/{k}": v for k, v in means.items()}

    def pipeline_throughput() -> dict:  # the input pipeline alone, before training (fresh runs)
        n = int(config.get("measure_pipeline_batches", 0))
        if not n:
            return {}
        probe = make_iterator(config.data, sources["train"], weights, tokenizer, mj.spec, seed=config.seed + 1,
                              train=True, row_shards=shards)
        tput = pipeline_lib.measure_throughput(probe, n)
        log.info("input pipeline alone: %.1f examples/s, %.0f tokens/s (%d batches)", tput["examples_per_s"],
                 tput["tokens_per_s"], n)
        return {"perf/pipeline_examples_per_s": tput["examples_per_s"],
                "perf/pipeline_tokens_per_s": tput["tokens_per_s"]}

    return mj.job(config, plan, train_iter, evaluate if config.eval_every else None,
                  start_scalars=pipeline_throughput, fingerprints={"data.tokenizer": tokenizer.sha256})


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True,
                     loss_fn: Callable | None = None, contract: Callable | None = None,
                     facts: dict | None = None, note: str = ""):
    """The train step with abstract model, optimizer and packed batch (`glm5v_jax.tools.aot`). The
    model keeps the preset's vocabulary size (there is no tokenizer here). Another stage's objective
    on another batch: `loss_fn` and `contract(spec, config)` (its global batch shapes), with its own
    `facts` and a `note` ahead of the summary (the RL stage)."""
    spec = vlm_spec_from_config(config.model)
    plan = plan_from_config(config.mesh, devices)
    batch = (contract or (lambda sp, c: batch_contract(sp, c.data)))(spec, config)
    placed, batch_sh, step = place_model(config, spec, plan, abstract=True, update_rms=update_rms, loss_fn=loss_fn,
                                         contract=batch)
    d, m = config.data, config.model
    facts = dict(global_batch=int(d.batch_size), seq_len=int(d.seq_len), max_images_per_row=int(d.max_images_per_row),
                 vocab_size=int(m.backbone.vocab_size), remat=bool(m.remat), attention_impl=str(m.attention_impl),
                 moe_impl=str(m.moe_impl), optimizer=str(config.optim.name), update_rms=update_rms, **(facts or {}))
    summary = note + (f"{d.batch_size} rows x {d.seq_len} tokens, {d.max_images_per_row} image slots per row "
                      f"(global); remat={m.remat}, attention_impl={m.attention_impl}, moe_impl={m.moe_impl}, "
                      f"optimizer={config.optim.name}; vocab {m.backbone.vocab_size} (the preset's)")
    flops = flops_lib.train_flops_per_step(spec, rows=d.batch_size, seq_len=d.seq_len,
                                           images=d.batch_size * d.max_images_per_row,
                                           patches_per_image=spec.vision.max_patches)
    return TrainProgram(plan, step, (placed.state, abstract_state(batch, batch_sh)), placed.replicated, facts,
                        summary, flops)
