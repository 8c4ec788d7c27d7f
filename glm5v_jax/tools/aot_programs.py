"""Each trainer's sharded train step as abstract values, for ahead-of-time compiles
(`glm5v_jax.tools.aot`): nothing is allocated, every argument is a ShapeDtypeStruct carrying its
sharding. `PROGRAMS` maps `config.trainer` to the builder, like `glm5v_jax.main.TRAINERS`.

A builder follows its trainer's own setup (mesh plan, preflight checks that raise ConfigError,
parameter shardings, optimizer placed on the mesh, the trainer's jitted step) and also returns
what the report should say about the batch (`facts`, `summary`) and an analytic FLOP count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class TrainProgram:
    """Everything needed to lower one train step without allocating anything."""

    plan: Any  # MeshPlan
    step: Callable  # the trainer's jitted step, explicit shardings
    args: tuple  # its abstract arguments (ShapeDtypeStructs with shardings)
    replicated_fraction: float
    facts: dict  # report fields: global_batch, optimizer, ... (JSON types)
    summary: str  # one line on the batch and settings
    analytic_flops_per_step: float


def vlm_program(config: Any, devices: Sequence[Any], *, update_rms: bool = True) -> TrainProgram:
    """`vlm_pretrain`: model, optimizer and packed batch as the trainer builds them. The model keeps
    the preset's vocabulary size (the trainer pads the tokenizer's; there is no tokenizer here)."""
    from flax import nnx

    from glm5v_jax.models.build import vlm_spec_from_config
    from glm5v_jax.sharding.partition import state_shardings
    from glm5v_jax.train.flops import train_flops_per_step
    from glm5v_jax.train.parallel import abstract_state, batch_shardings, jit_step, plan_from_config
    from glm5v_jax.train.vlm_pretrain import batch_contract, sharded_setup, train_step_fn

    spec = vlm_spec_from_config(config.model)
    plan = plan_from_config(config.mesh, devices)
    setup = sharded_setup(config, spec, plan)
    graphdef, state = nnx.split(nnx.eval_shape(setup.make))
    state_sh = state_shardings(state, plan.mesh, setup.param_shardings)
    pure_train_step = train_step_fn(graphdef, config, setup.update_labels if update_rms else None)
    batch = batch_contract(spec, config.data)
    batch_sh = batch_shardings(batch, plan)
    step = jit_step(pure_train_step, plan, state_sh, batch_sh)
    d, m = config.data, config.model
    facts = dict(global_batch=int(d.batch_size), seq_len=int(d.seq_len), max_images_per_row=int(d.max_images_per_row),
                 vocab_size=int(m.backbone.vocab_size), remat=bool(m.remat), attention_impl=str(m.attention_impl),
                 moe_impl=str(m.moe_impl), optimizer=str(config.optim.name), update_rms=update_rms)
    summary = (f"{d.batch_size} rows x {d.seq_len} tokens, {d.max_images_per_row} image slots per row (global); "
               f"remat={m.remat}, attention_impl={m.attention_impl}, moe_impl={m.moe_impl}, "
               f"optimizer={config.optim.name}; vocab {m.backbone.vocab_size} (the preset's)")
    flops = train_flops_per_step(spec, rows=d.batch_size, seq_len=d.seq_len, images=d.batch_size * d.max_images_per_row,
                                 patches_per_image=spec.vision.max_patches)
    return TrainProgram(plan, step, (abstract_state(state, state_sh), abstract_state(batch, batch_sh)),
                        setup.replicated, facts, summary, flops)


def _matmul_params(tree: Any) -> int:
    """Parameters in arrays of rank >= 2 (the matmul weights; norms and biases left out)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def mim_program(config: Any, devices: Sequence[Any], *, update_rms: bool = True) -> TrainProgram:
    """`cogvit_mim` (stage 1): student, optimizer, standardisers and the frozen teachers (built
    abstractly: no checkpoint is read, only the architecture of each `config.teachers` entry), with
    the batch of the student's NaFlex view plus each teacher's own view. Analytic FLOPs: 6 x student
    matmul parameters x patches + 2 x teacher matmul parameters x their patches (attention left out)."""
    del update_rms  # stage 1 logs no per-group update RMS
    from flax import nnx

    from glm5v_jax.data.image_batches import view_key
    from glm5v_jax.models.build import vision_spec_from_config
    from glm5v_jax.models.teachers.registry import build_teacher
    from glm5v_jax.train import cogvit_mim
    from glm5v_jax.train.parallel import batch_shardings, plan_from_config
    from glm5v_jax.train.teacher_cache import STUDENT_KEYS, distinct_views, teacher_views

    spec = vision_spec_from_config(config.model.vision, dtype=config.model.dtype,
                                   attention_impl=config.model.attention_impl, remat=config.model.remat)
    modules, dims, patch_sizes = {}, {}, {}
    for name, t in config.teachers.items():
        def make(name=name, t=t):
            teacher = build_teacher(name, t.kind, t.variant, overrides=t.overrides.to_dict(), seed=int(t.seed))
            dims[name], patch_sizes[name] = teacher.dim, teacher.patch_size
            return teacher.module
        modules[name] = nnx.eval_shape(make)
    views = teacher_views(config, patch_sizes)
    plan = plan_from_config(config.mesh, devices)
    placed = cogvit_mim.place_on_mesh(config, spec, dims, modules, plan, abstract=True)

    b, n, p = int(config.data.batch_size), spec.max_patches, spec.patch_size
    sds = jax.ShapeDtypeStruct
    batch = dict(patches=sds((b, n, p * p * 3), jnp.float32), patch_yx=sds((b, n, 2), jnp.int32),
                 valid=sds((b, n), jnp.bool_))
    for vp, vn in distinct_views(views):
        batch.update({view_key(k, vp, vn): v for k, v in zip(STUDENT_KEYS, (
            sds((b, vn, vp * vp * 3), jnp.float32), sds((b, vn, 2), jnp.int32), sds((b, vn), jnp.bool_)))})
    batch_sh = batch_shardings(batch, plan)
    step = cogvit_mim.sharded_train_step(cogvit_mim.make_train_step(config, views, jit=False), placed, plan, batch_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    args = (placed.state, placed.teacher_state,
            {k: sds(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()},
            sds(key.shape, key.dtype, sharding=replicated))

    flops = 6.0 * _matmul_params(placed.state["student"]) * b * n
    for name, module in modules.items():
        flops += 2.0 * _matmul_params(nnx.state(module, nnx.Param)) * b * (views[name][1] if views[name] else n)
    teachers = {name: " ".join(filter(None, (t.kind, t.variant, f"(patch {patch_sizes[name]})")))
                for name, t in config.teachers.items()}
    facts = dict(global_batch=b, max_patches=n, patch_size=p, teachers=teachers, remat=bool(config.model.remat),
                 attention_impl=str(config.model.attention_impl), optimizer=str(config.optim.name))
    summary = (f"{b} images x {n} patches of {p}px (global); teachers {teachers}; remat={config.model.remat}, "
               f"attention_impl={config.model.attention_impl}, optimizer={config.optim.name}")
    return TrainProgram(plan, step, args, placed.replicated, facts, summary, flops)


PROGRAMS: dict[str, Callable[..., TrainProgram]] = {"vlm_pretrain": vlm_program, "cogvit_mim": mim_program}


def build_train_program(config: Any, devices: Sequence[Any], *, update_rms: bool = True) -> TrainProgram:
    """The program of `config.trainer` (default vlm_pretrain) on `devices`."""
    from glm5v_jax.errors import ConfigError

    trainer = config.get("trainer", "vlm_pretrain")
    if trainer not in PROGRAMS:
        raise ConfigError("config.trainer", f"{trainer!r} has no ahead-of-time program; known: {sorted(PROGRAMS)}")
    return PROGRAMS[trainer](config, devices, update_rms=update_rms)
