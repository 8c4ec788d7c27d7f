"""Stage 1 trainer: CogViT masked-image distillation from frozen teachers (report 2.1).

One readable loop, big_vision style:
  image sources mixed by weight (shapes world built on first use) -> NaFlex batches
  -> teachers from config.teachers (checkpoints or random init), frozen, bfloat16, no gradients
  -> student: CogViT + one adaptor head per teacher; per-teacher running standardisation
  -> Muon (or AdamW) with cosine decay -> resume from the newest good checkpoint
  -> steps: mask 35% of each image's valid patches (block-wise or random), teacher features on
     the full image, student on the masked one, loss at masked positions only
  -> k-NN accuracy (shape, colour) of the student's pooled features at step 0 (the random-init
     baseline), every eval_every steps and at the end -> TensorBoard + metrics.jsonl, and the
     step-0-vs-final table in eval_table.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
from glm5v_jax.losses.distill import FeatureStandardizer, distill_loss
from glm5v_jax.models.build import vision_spec_from_config
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.cogvit_mim import MIMStudent
from glm5v_jax.models.masking import mim_mask
from glm5v_jax.models.teachers.registry import Teacher, build_teacher
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.train.optimizer import transform_from_config
from glm5v_jax.train.vision_data import prepare_image_sources
from glm5v_jax.train.vision_eval import knn_report, write_eval_table
from glm5v_jax.train.writers import JsonlWriter, MultiWriter, TensorBoardWriter, plot_curves

log = logging.getLogger(__name__)
IMAGE_KEYS = ("patches", "patch_yx", "valid")


def build_teachers(config: ml_collections.ConfigDict, patch_size: int) -> dict[str, Teacher]:
    teachers = {}
    for name, t in config.teachers.items():
        teacher = build_teacher(name, t.kind, t.variant, overrides=t.overrides.to_dict(), checkpoint=t.checkpoint,
                                seed=int(t.seed))
        if teacher.patch_size != patch_size:
            # resample_tokens (models/cogvit_mim.py) aligns grids, but the pipeline does not yet
            # produce a second NaFlex view at the teacher's patch size.
            raise ValueError(f"config.teachers.{name}: patch size {teacher.patch_size} differs from the "
                             f"student's {patch_size}; only equal patch sizes are wired into this trainer")
        teachers[name] = teacher
        log.info("teacher %s: %s %s, width %d, %s", name, t.kind, t.variant, teacher.dim, teacher.source)
    return teachers


class MIMState(nnx.Module):
    """What training changes and checkpoints: student, optimizer, target statistics."""

    def __init__(self, student: MIMStudent, optimizer: nnx.Optimizer, standardizers: Mapping[str, FeatureStandardizer]):
        self.student, self.optimizer = student, optimizer
        self.standardizers = nnx.Dict(dict(standardizers))


def make_train_step(config: ml_collections.ConfigDict):
    m = config.mim
    weights = {name: float(t.weight) for name, t in config.teachers.items()}

    @nnx.jit
    def train_step(state: MIMState, teachers: nnx.Dict, batch, key):
        patches, yx, valid = (batch[k] for k in IMAGE_KEYS)
        mask = mim_mask(key, valid, yx, ratio=m.ratio, layout=m.layout, num_blocks=m.num_blocks)
        targets = {}
        for name, teacher in teachers.items():  # frozen: outside the differentiated function
            feats = jax.lax.stop_gradient(teacher(patches, yx, valid)["tokens"])
            state.standardizers[name].update(feats, valid)
            targets[name] = state.standardizers[name](feats)

        def loss_fn(student):
            _, preds = student(patches, yx, valid, mim_mask=mask)
            total, metrics = 0.0, {}
            for name, target in targets.items():
                loss, parts = distill_loss(preds[name], target, mask, m.loss, cosine_weight=m.cosine_weight,
                                           smooth_l1_weight=m.smooth_l1_weight)
                total = total + weights[name] * loss
                metrics[f"loss/{name}"] = loss
                metrics.update({f"{name}/{k}": v for k, v in parts.items()})
            return total, metrics

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(state.student)
        state.optimizer.update(state.student, grads)
        metrics.update({"loss": loss, "grad_norm": optax.tree.norm(grads),
                        "masked_fraction": mask.sum() / jnp.maximum(valid.sum(), 1)})
        return metrics

    return train_step


def _batches(source, config, n_images: int, batch_size: int):
    """The first n_images of `source` in a fixed order, as batches (the last one may be smaller)."""
    import grain

    ds = grain.MapDataset.source(source)[:n_images] if not isinstance(source, grain.MapDataset) else source[:n_images]
    cfg = ImageBatchConfig(batch_size=batch_size, patch_size=config.model.vision.patch_size,
                           max_patches=config.model.vision.max_patches, merge=config.model.vision.merge_size,
                           shuffle=False, num_epochs=1)
    return list(make_image_batch_iterator(ds, cfg))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming if possible) until `config.total_steps`; returns the last metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    spec = vision_spec_from_config(config.model.vision, dtype=config.model.dtype,
                                   attention_impl=config.model.attention_impl, remat=config.model.remat)
    sources = prepare_image_sources(config.data, workdir, seed=config.seed)
    teachers = build_teachers(config, spec.patch_size)

    student = MIMStudent(spec, {n: t.dim for n, t in teachers.items()}, head_hidden=config.model.head_hidden,
                         rngs=nnx.Rngs(config.seed))
    tx, schedules, _, routing = transform_from_config(student, config.optim, config.total_steps)
    if routing:
        (workdir / "routing.txt").write_text(routing + "\n")
    standardizers = {n: FeatureStandardizer(t.dim, config.mim.standardize, momentum=config.mim.stats_momentum)
                     for n, t in teachers.items()}
    state = MIMState(student, nnx.Optimizer(student, tx, wrt=nnx.Param), standardizers)
    teacher_modules = nnx.Dict({n: t.module for n, t in teachers.items()})

    batch_cfg = ImageBatchConfig(batch_size=config.data.batch_size, patch_size=spec.patch_size,
                                 max_patches=spec.max_patches, merge=spec.merge_size, seed=config.seed,
                                 num_workers=config.data.num_workers)
    train_iter = make_image_batch_iterator(sources.train, batch_cfg)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    start_step = 0
    restored = ckpt.restore_latest(nnx.state(state))
    if restored is not None:
        start_step, saved, data_state, _ = restored
        nnx.update(state, saved)
        train_iter.set_state(data_state)
        log.info("resuming at step %d", start_step)

    encode = nnx.jit(lambda enc, b: CogViT.pool(enc(*(b[k] for k in IMAGE_KEYS)), b["valid"]))
    knn_sets = None
    if sources.eval is not None and config.eval_every:
        bs = config.data.batch_size
        knn_sets = (_batches(sources.knn_train, config, config.data.knn_train_images, bs),
                    _batches(sources.eval, config, config.data.eval_images, bs))

    def evaluate() -> dict:
        if knn_sets is None:
            return {}
        enc = state.student.encoder
        return {f"eval/{k}": v for k, v in knn_report(lambda b: encode(enc, {k: b[k] for k in IMAGE_KEYS}),
                                                       *knn_sets, k=config.data.knn_k).items()}

    writer = MultiWriter([TensorBoardWriter(workdir / "tensorboard"), JsonlWriter(workdir / "metrics.jsonl")])
    train_step = make_train_step(config)
    base_key = jax.random.key(config.seed)
    last: dict = {}
    if start_step == 0 and knn_sets is not None:
        last = evaluate()  # the random-init student: the baseline training must beat
        writer.write_scalars(0, last)
        log.info("step 0 (random init): %s", last)
    acc: dict = {}
    t0, window = time.time(), 0
    step = start_step
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = {k: jnp.asarray(v) for k, v in next(train_iter).items() if k in IMAGE_KEYS}
            metrics = train_step(state, teacher_modules, batch, jax.random.fold_in(base_key, step))
            for k, v in metrics.items():
                acc.setdefault(k, []).append(v)
            window += 1
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = {f"train/{k}" if k != "loss" else k: float(np.mean(jax.device_get(v)))
                           for k, v in acc.items()}
                elapsed = time.time() - t0
                scalars["perf/steps_per_s"] = window / max(elapsed, 1e-9)
                scalars["perf/images_per_s"] = window * config.data.batch_size / max(elapsed, 1e-9)
                scalars.update({f"lr/{k}": float(s(step - 1)) for k, s in schedules.items()})
                scalars.update({f"data/{k}": float(v) for k, v in train_iter.stats.items()})
                writer.write_scalars(step, scalars)
                log.info("step %d/%d  loss %.4f  %.2f steps/s", step, config.total_steps, scalars["loss"],
                         scalars["perf/steps_per_s"])
                last.update(scalars)
                acc, t0, window = {}, time.time(), 0
            if knn_sets is not None and (step % config.eval_every == 0 or step == config.total_steps):
                ev = evaluate()
                writer.write_scalars(step, ev)
                log.info("step %d eval: %s", step, ev)
                last.update(ev)
                t0 = time.time()
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                ckpt.save(step, nnx.state(state), train_iter.get_state(), json.loads(config.to_json_best_effort()),
                          force=True)
            writer.flush()
    finally:
        ckpt.close()
        writer.close()
    if knn_sets is not None and step == config.total_steps:
        table = write_eval_table(workdir, step)
        log.info("k-NN, random init vs trained:\n%s", table)
    plot_curves(workdir / "metrics.jsonl", workdir / "loss_curves.png")
    return dict(last, step=step)
