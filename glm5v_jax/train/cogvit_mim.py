"""Stage: CogViT stage 1, masked-image distillation from frozen teachers (report 2.1).

Reads top to bottom; the run layer (`glm5v_jax.train.run`) does the loop, checkpoints, resume
(resharded onto this run's mesh), `init_from`, preemption, writers and eval_table.md:
  image sources mixed by weight (config.data.sources, `glm5v_jax.data.source_registry`; shapes
     world built on first use) -> NaFlex batches, plus one
     extra view per other teacher patch size (e.g. So400m/14 with the /16 student; merge 1, about
     the student's pixel area unless config.teachers.<name>.max_patches says otherwise)
  -> teachers from config.teachers (checkpoints or random init), frozen, bfloat16, no gradients;
     tokens of a teacher with its own view resampled bilinearly onto the student's grid. Or, with
     config.teacher_cache, no teachers: their precomputed tokens come with each record
     (`glm5v_jax.train.teacher_cache`, which also holds the view helpers; records missing from
     the cache are skipped and counted as data/skipped/not_in_teacher_cache)
  -> student: CogViT + one adaptor head per teacher; per-teacher running standardisation
  -> Muon (or AdamW) with cosine decay
  -> on a mesh (config.mesh, as every stage: data / fsdp / tensor / expert axes and logical
     rules): student, optimizer and teachers created or placed sharded per the rules (FSDP by
     default), the global batch split over the batch axes, each host reading its own rows
  -> steps: mask 35% of each image's valid patches (block-wise or random), teacher features on
     the full image, student on the masked one, loss at masked positions only
  -> evaluate: k-NN accuracy (shape, colour) of the student's pooled features on single-object
     shapes-world images (config.data.eval_source; the run layer calls it at step 0, the
     random-init baseline, and every eval_every steps).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator, view_key
from glm5v_jax.data.source_registry import open_sources
from glm5v_jax.losses.distill import FeatureStandardizer, distill_loss
from glm5v_jax.models.build import teachers_from_config, vision_spec_from_config
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.cogvit_mim import MIMStudent
from glm5v_jax.models.masking import mim_mask
from glm5v_jax.sharding.checks import check_divisibility
from glm5v_jax.sharding.partition import state_shardings
from glm5v_jax.sharding.rules import parameter_shardings
from glm5v_jax.train.nonfinite import guard_step
from glm5v_jax.train.run import Job, PlacedState, TrainState, place_state
from glm5v_jax.train.parallel import (MeshPlan, TrainProgram, abstract_state, batch_shardings, global_batch,
                                       host_batch_shardings,
                                       plan_from_config, under_rules)
from glm5v_jax.train.teacher_cache import (STUDENT_KEYS, View, cached_tokens, distinct_views, open_cache, step_keys,
                                           student_grid_tokens, teacher_views)
from glm5v_jax.train.vision_eval import knn_report, labelled_eval_sets

log = logging.getLogger(__name__)
IMAGE_KEYS = ("patches", "patch_yx", "valid")


def make_train_step(config: ml_collections.ConfigDict, views: Mapping[str, View | None] | None = None, *,
                    jit: bool = True):
    """`train_step(state, teachers, batch, key) -> metrics`, jitted with `nnx.jit` (one device).
    `views[name]`: the teacher's own view (None or absent: the student's). A teacher not in the
    `teachers` argument reads its cached tokens from batch["teacher/<name>"]. `jit=False`: the plain
    function, for `sharded_train_step`, which jits it on a mesh."""
    m = config.mim
    weights = {name: float(t.weight) for name, t in config.teachers.items()}
    views = dict(views or {})

    def train_step(state: TrainState, teachers: nnx.Dict, batch, key):
        patches, yx, valid = (batch[k] for k in IMAGE_KEYS)
        mask = mim_mask(key, valid, yx, ratio=m.ratio, layout=m.layout, num_blocks=m.num_blocks)
        targets = {}
        for name in weights:  # on the student's grid [B, N, D]; frozen: outside the differentiated function
            if name in teachers:
                feats = jax.lax.stop_gradient(student_grid_tokens(teachers[name], batch, views.get(name)))
            else:
                feats = cached_tokens(batch, name)
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

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(state.model)
        state.optimizer.update(state.model, grads)
        metrics.update({"loss": loss, "grad_norm": optax.tree.norm(grads),
                        "masked_fraction": mask.sum() / jnp.maximum(valid.sum(), 1)})
        return metrics

    return nnx.jit(train_step) if jit else train_step


# ----------------------------------------------------------------------------- the run on a mesh
@dataclasses.dataclass
class ShardedMIM:
    """The student's TrainState on the run's mesh (`run.PlacedState`: student, optimizer,
    standardisers) and the frozen teachers placed by the same rules."""

    student: PlacedState
    teacher_graphdef: Any
    teacher_state: Any  # nnx.State of the teachers (frozen), sharded by the same rules
    teacher_shardings: Any

    def __getattr__(self, name):  # graphdef, state, shardings, schedules, routing, replicated
        return getattr(self.student, name)


def place_on_mesh(config: ml_collections.ConfigDict, spec, dims: Mapping[str, int],
                  teacher_modules: Mapping[str, nnx.Module], plan: MeshPlan, *, abstract: bool = False) -> ShardedMIM:
    """The student, its optimizer and the standardisers created sharded per the rules
    (`run.place_state`), and the teachers moved onto the mesh likewise (a frozen So400m is
    FSDP-sharded like the student, not copied to every device). `abstract=True` (ahead-of-time
    compiles, `glm5v_jax.tools.aot`): nothing is allocated; the states are ShapeDtypeStructs
    carrying their shardings (the teachers may be abstract too)."""
    def make_student():
        return MIMStudent(spec, dims, head_hidden=config.model.head_hidden, rngs=nnx.Rngs(config.seed))

    def standardizers():
        return {"standardizers": nnx.Dict({n: FeatureStandardizer(d, config.mim.standardize,
                                                                  momentum=config.mim.stats_momentum)
                                           for n, d in dims.items()})}

    student = place_state(config, plan, make_student, extras=standardizers, abstract=abstract)
    teachers = nnx.Dict(dict(teacher_modules))
    check_divisibility(teachers, plan.mesh, plan.rules)
    t_graphdef, t_state = nnx.split(teachers)
    t_sh = state_shardings(t_state, plan.mesh, parameter_shardings(teachers, plan.mesh, plan.rules))
    t_state = abstract_state(t_state, t_sh) if abstract else jax.device_put(t_state, t_sh)
    return ShardedMIM(student, t_graphdef, t_state, t_sh)


def sharded_train_step(step_fn, placed: ShardedMIM, plan: MeshPlan, batch_sh: Mapping[str, NamedSharding], *,
                       nonfinite: str = "stop"):
    """`(state, teacher_state, batch, key) -> (state, metrics)`: `step_fn` (make_train_step(...,
    jit=False)) jitted on the mesh with explicit shardings, traced under the mesh rules; the state
    is donated and keeps its shardings, metrics are replicated and carry the `nonfinite` flag
    (`glm5v_jax.train.nonfinite.guard_step`)."""
    replicated = NamedSharding(plan.mesh, P())

    def pure(state, teacher_state, batch, key):
        mim, teachers = nnx.merge(placed.graphdef, state), nnx.merge(placed.teacher_graphdef, teacher_state)
        metrics = step_fn(mim, teachers, batch, key)
        return nnx.state(mim), metrics

    return jax.jit(under_rules(guard_step(pure, nonfinite), plan),
                   in_shardings=(placed.shardings, placed.teacher_shardings, dict(batch_sh), replicated),
                   out_shardings=(placed.shardings, replicated), donate_argnums=(0,))


def _batches(source, config, batch_size: int):
    """The records of `source` in their order, as batches (the last one may be smaller)."""
    cfg = ImageBatchConfig(batch_size=batch_size, patch_size=config.model.vision.patch_size,
                           max_patches=config.model.vision.max_patches, merge=config.model.vision.merge_size,
                           shuffle=False, num_epochs=1)
    return list(make_image_batch_iterator(source, cfg))


def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> Job:
    spec = vision_spec_from_config(config.model.vision, dtype=config.model.dtype,
                                   attention_impl=config.model.attention_impl, remat=config.model.remat)
    data = open_sources(config.data, workdir)
    if config.get("teacher_cache", ""):  # no teachers run: their tokens come with the records
        cache = open_cache(config.teacher_cache, config)
        dims, views, modules, attach = cache.dims, {}, {}, cache.lookup()
        log.info("teacher cache %s: %s", cache.path, dims)
    else:
        teachers = teachers_from_config(config.teachers)
        for n, t in teachers.items():
            log.info("teacher %s: width %d, patch %d (student %d), %s", n, t.dim, t.patch_size, spec.patch_size,
                     t.source)
        dims, attach = {n: t.dim for n, t in teachers.items()}, None
        views = teacher_views(config, {n: t.patch_size for n, t in teachers.items()})
        modules = {n: t.module for n, t in teachers.items()}
    keys = step_keys(views, tuple(dims) if attach is not None else ())
    placed = place_on_mesh(config, spec, dims, modules, plan)

    hosts = jax.process_count()
    batch_cfg = ImageBatchConfig(batch_size=config.data.batch_size // hosts, patch_size=spec.patch_size,
                                 max_patches=spec.max_patches, merge=spec.merge_size, seed=config.seed,
                                 num_workers=config.data.num_workers, teacher_views=distinct_views(views),
                                 process_index=jax.process_index(), process_count=hosts)
    train_iter = make_image_batch_iterator(data.mixture("train", config.seed), batch_cfg, attach=attach)
    step_fn, base_key = make_train_step(config, views, jit=False), jax.random.key(config.seed)
    compiled: dict = {}

    def train_step(state, batch, step):
        host = {k: v for k, v in batch.items() if k in keys}
        if not compiled:  # batch keys are known from the first batch (views, cached features)
            compiled["sh"] = host_batch_shardings(host, plan)
            compiled["step"] = sharded_train_step(step_fn, placed, plan, compiled["sh"],
                                                  nonfinite=config.get("nonfinite", "stop"))
        return compiled["step"](state, placed.teacher_state, global_batch(host, compiled["sh"]),
                                jax.random.fold_in(base_key, step))

    evaluate = None
    if config.eval_every:  # single-object images: reference set (train part) and queries (eval part)
        encode = nnx.jit(lambda enc, b: CogViT.pool(enc(*(b[k] for k in IMAGE_KEYS)), b["valid"]))
        knn_sets = tuple(_batches(part, config, config.data.batch_size)
                         for part in labelled_eval_sets(config.data, workdir))

        def evaluate(state) -> dict:
            enc = nnx.merge(placed.graphdef, state).model.encoder
            return {f"eval/{k}": v for k, v in knn_report(lambda b: encode(enc, {k: b[k] for k in IMAGE_KEYS}),
                                                           *knn_sets, k=config.data.knn_k).items()}

    params = sum(x.size for x in jax.tree.leaves(placed.state["model"]))
    return Job(config=config, plan=plan, state=placed.state, shardings=placed.shardings, train_iter=train_iter,
               train_step=train_step, schedules=placed.schedules, evaluate=evaluate,
               work=lambda batch: {"examples": len(batch["valid"])}, routing=placed.routing,
               replicated=placed.replicated, hparams=dict(preset=config.get("preset", ""), student_values=params,
                                                          teachers=",".join(dims)))


# ----------------------------------------------------------------------------- ahead of time
def _matmul_params(tree: Any) -> int:
    """Parameters in arrays of rank >= 2 (the matmul weights; norms and biases left out)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True):
    """Student, optimizer, standardisers and the frozen teachers (built abstractly: no checkpoint is
    read, only each `config.teachers` entry's architecture), with the batch of the student's NaFlex
    view plus each teacher's own view. Analytic FLOPs: 6 x student matmul parameters x patches +
    2 x teacher matmul parameters x their patches (attention left out)."""
    del update_rms  # stage 1 logs no per-group update RMS
    spec = vision_spec_from_config(config.model.vision, dtype=config.model.dtype,
                                   attention_impl=config.model.attention_impl, remat=config.model.remat)
    teachers = teachers_from_config(config.teachers, abstract=True)
    modules = {n: t.module for n, t in teachers.items()}
    dims, patch_sizes = {n: t.dim for n, t in teachers.items()}, {n: t.patch_size for n, t in teachers.items()}
    views = teacher_views(config, patch_sizes)
    plan = plan_from_config(config.mesh, devices)
    placed = place_on_mesh(config, spec, dims, modules, plan, abstract=True)

    b, n, p = int(config.data.batch_size), spec.max_patches, spec.patch_size
    sds = jax.ShapeDtypeStruct
    batch = dict(patches=sds((b, n, p * p * 3), jnp.float32), patch_yx=sds((b, n, 2), jnp.int32),
                 valid=sds((b, n), jnp.bool_))
    for vp, vn in distinct_views(views):
        batch.update({view_key(k, vp, vn): v for k, v in zip(STUDENT_KEYS, (
            sds((b, vn, vp * vp * 3), jnp.float32), sds((b, vn, 2), jnp.int32), sds((b, vn), jnp.bool_)))})
    batch_sh = batch_shardings(batch, plan)
    step = sharded_train_step(make_train_step(config, views, jit=False), placed, plan, batch_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    replicated = NamedSharding(plan.mesh, P())
    args = (placed.state, placed.teacher_state,
            {k: sds(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()},
            sds(key.shape, key.dtype, sharding=replicated))

    flops = 6.0 * _matmul_params(placed.state["model"]) * b * n
    for name, module in modules.items():
        flops += 2.0 * _matmul_params(nnx.state(module, nnx.Param)) * b * (views[name][1] if views[name] else n)
    teachers = {name: " ".join(filter(None, (t.kind, t.variant, f"(patch {patch_sizes[name]})")))
                for name, t in config.teachers.items()}
    facts = dict(global_batch=b, max_patches=n, patch_size=p, teachers=teachers, remat=bool(config.model.remat),
                 attention_impl=str(config.model.attention_impl), optimizer=str(config.optim.name))
    summary = (f"{b} images x {n} patches of {p}px (global); teachers {teachers}; remat={config.model.remat}, "
               f"attention_impl={config.model.attention_impl}, optimizer={config.optim.name}")
    return TrainProgram(plan, step, args, placed.replicated, facts, summary, flops)
