"""Putting a training run on a mesh, shared by the trainer, the benchmarks and the AOT tool.

    plan = plan_from_config(config.mesh, devices)                  # mesh + rules, refused early
    preflight(abstract_model, plan, global_batch=..., mesh_cfg=...)  # checks before compiling
    graphdef, state, state_sh = create_sharded(make, plan.mesh, parameter_shardings(...))
    batch_sh = batch_shardings(batch_shapes, plan)
    step = jit_step(fn, plan, state_sh, batch_sh)                    # explicit in/out shardings
    batch = global_batch(host_batch, batch_sh)                       # per-host shards -> global arrays

Every batch array's leading dimension is rows (tokens, segment_ids, loss_mask) or image
slots (rows x max_images_per_row: patches, patch_yx, ...), and a host's slots belong to
its own rows, so every array is split along its leading dimension over the mesh axes of
`activation_batch`. Each host passes its own rows to `global_batch`, which assembles the
global arrays with `jax.make_array_from_process_local_data`; on one host that is a
plain sharded `device_put`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.errors import ConfigError
from glm5v_jax.train.nonfinite import guard_step
from glm5v_jax.sharding.checks import check_batch, check_divisibility, check_replication
from glm5v_jax.sharding.context import MeshRules, logical_sharding, use_mesh_rules
from glm5v_jax.sharding.mesh import make_mesh, mesh_spec_from_config
from glm5v_jax.sharding.rules import rules_from_config

REPLICATION_ACTIONS = ("error", "warn")


@dataclasses.dataclass
class TrainProgram:
    """A stage's train step with abstract arguments: everything needed to lower it for a topology
    without allocating anything (each stage module's `abstract_program`, used by `glm5v_jax.tools.aot`)."""

    plan: Any  # MeshPlan
    step: Callable  # the stage's jitted step, explicit shardings
    args: tuple  # its abstract arguments (ShapeDtypeStructs with shardings)
    replicated_fraction: float
    facts: dict  # report fields: global_batch, optimizer, ... (JSON types)
    summary: str  # one line on the batch and settings
    analytic_flops_per_step: float


@dataclasses.dataclass(frozen=True)
class MeshPlan(MeshRules):
    """The run's mesh and normalised logical rules."""

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return self.mesh_axes("activation_batch")

    def describe(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        return f"mesh ({shape}) over {self.mesh.devices.size} devices; batch split over {self.batch_axes}"


def plan_from_config(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> MeshPlan:
    """Mesh (`config.mesh.shape`, `dcn_shape`) and rules (`config.mesh.rules`) for `devices`."""
    mesh = make_mesh(mesh_spec_from_config(mesh_cfg), devices)
    return MeshPlan(mesh, rules_from_config(mesh_cfg, mesh.axis_names))


def preflight(abstract_model: nnx.Module, plan: MeshPlan, *, global_batch: int, mesh_cfg: Any = None,
              batch_field: str = "config.data.batch_size") -> float:
    """Every check that can fail before compiling; returns the replicated parameter fraction.

    Divisibility of every sharded parameter dimension (heads, KV heads, experts,
    vocabulary, widths), of the global batch over the batch axes, and the replicated
    fraction (`config.mesh.replication_tolerance`, `replication_action`: error | warn).
    """
    get = (lambda k, d: mesh_cfg.get(k, d)) if mesh_cfg is not None else (lambda k, d: d)
    action = get("replication_action", "error")
    if action not in REPLICATION_ACTIONS:
        raise ConfigError("config.mesh.replication_action", f"expected one of {REPLICATION_ACTIONS}, got {action!r}")
    check_divisibility(abstract_model, plan.mesh, plan.rules)
    check_batch(global_batch, plan.mesh, plan.rules, field=batch_field)
    if global_batch % jax.process_count():
        raise ConfigError(batch_field, f"{global_batch} rows do not split over {jax.process_count()} hosts")
    return check_replication(abstract_model, plan.mesh, plan.rules,
                             tolerance=float(get("replication_tolerance", 0.02)), action=action)


def batch_sharding(shape: Sequence[int], plan: MeshPlan) -> NamedSharding:
    """Leading dimension over the batch axes (the prefix of them that divides it); rest replicated."""
    if not shape:
        return NamedSharding(plan.mesh, P())
    return logical_sharding(shape, ("activation_batch",) + (None,) * (len(shape) - 1), plan)


def batch_shardings(batch: Mapping[str, Any], plan: MeshPlan) -> dict[str, NamedSharding]:
    """{key: NamedSharding} for a (global-shape) batch of arrays or ShapeDtypeStructs."""
    return {k: batch_sharding(tuple(np.shape(v)), plan) for k, v in batch.items()}


def host_batch_shardings(host: Mapping[str, np.ndarray], plan: MeshPlan) -> dict[str, NamedSharding]:
    """Shardings of the global batch whose per-host rows are `host` (for batches whose keys or
    shapes are known only from the first batch: teacher views, patch budgets)."""
    n = jax.process_count()
    return batch_shardings({k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype)
                            for k, v in host.items()}, plan)


def local_row_shards(tokens_sharding: NamedSharding, global_rows: int, seq_len: int) -> int:
    """How many data-parallel shards this host's rows of a `[global_rows, seq_len]` batch are split into (the
    ranks a packer balances its rows over: each shard is a contiguous slice of the host's rows)."""
    per_device = tokens_sharding.shard_shape((global_rows, seq_len))[0]
    return max(1, global_rows // jax.process_count() // per_device)


def global_batch(host_batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Global arrays from this host's rows (every host calls this with its own shard)."""
    out = {}
    n = jax.process_count()
    for k, v in host_batch.items():
        if k not in shardings:
            continue
        v = np.asarray(v)
        global_shape = (v.shape[0] * n,) + v.shape[1:] if v.ndim else v.shape
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, global_shape)
    return out


def abstract_state(graphdef_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`, for lowering without allocating anything."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), graphdef_state, shardings)


def under_rules(fn: Callable, plan: MeshPlan) -> Callable:
    """`fn` traced with `plan`'s mesh and rules active (activation constraints, expert parallelism)."""

    def traced(*args):
        with use_mesh_rules(plan.mesh, plan.rules):
            return fn(*args)

    return traced


def jit_step(fn: Callable, plan: MeshPlan, state_shardings: Any, batch_shardings_: Mapping[str, NamedSharding], *,
             donate: bool = True, nonfinite: str | None = None) -> Callable:
    """`fn(state, batch) -> (state, metrics)` jitted with explicit shardings and traced under
    `use_mesh_rules(plan)`. The state is donated and comes back with the shardings it went
    in with; metrics are replicated. `nonfinite` ("stop" | "skip", what stages pass from their config):
    the metrics (a dict) carry the `nonfinite` flag, and "skip" keeps the old state on a non-finite step
    (`glm5v_jax.train.nonfinite.guard_step`)."""
    step = fn if nonfinite is None else guard_step(fn, nonfinite)
    return jax.jit(under_rules(step, plan), in_shardings=(state_shardings, dict(batch_shardings_)),
                   out_shardings=(state_shardings, NamedSharding(plan.mesh, P())),
                   donate_argnums=(0,) if donate else ())


def jit_eval(fn: Callable, plan: MeshPlan, state_shardings: Any, batch_shardings_: Mapping[str, NamedSharding]):
    """`fn(state, batch) -> metrics` jitted like `jit_step`, nothing donated."""
    return jax.jit(under_rules(fn, plan), in_shardings=(state_shardings, dict(batch_shardings_)),
                   out_shardings=NamedSharding(plan.mesh, P()))
