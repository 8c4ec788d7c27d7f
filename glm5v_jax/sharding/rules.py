"""Logical axis names -> mesh axes, and the parameter shardings they give.

Every parameter carries logical axis names (`glm5v_jax.layers.params.param`); a rule
table maps each name to a mesh axis, a tuple of mesh axes, or None (replicated).
`DEFAULT_RULES` is FSDP over `fsdp` (and `data` for activations), tensor parallelism
over `tensor` (heads, MLP width, vocabulary) and expert parallelism over `expert`; the
expert axis also shards the non-expert weights FSDP-style (as MaxText's defaults do),
so a mesh with experts spread over it does not replicate the rest of the model.
A config may replace any rule (`config.mesh.rules`). Within one parameter a mesh axis
is used at most once: a later dimension that asks for an axis already taken stays
unsharded along it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm5v_jax.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "embed": ("fsdp", "expert"),  # the expert axis doubles as FSDP for non-expert weights
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "exp": "expert",
    "exp_router": None,
    "layers": None,
    "norm": None,
    "patch": "tensor",
    "mtp_concat": "tensor",
    "proj": "tensor",  # the contrastive towers' output projection width (stage 2)
    # activations
    "activation_batch": ("data", "fsdp", "expert"),
    "activation_length": None,
    "activation_embed": "tensor",
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_kv": None,
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    "activation_exp": "expert",
}


def check_rules(rules: Rules, mesh_axes: Iterable[str], field: str = "config.mesh.rules") -> dict[str, tuple[str, ...]]:
    """Rules normalised to tuples; a rule naming an unknown mesh axis is a ConfigError."""
    mesh_axes = tuple(mesh_axes)
    out = {}
    for name, target in rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for a in axes:
            if a not in mesh_axes:
                raise ConfigError(f"{field}.{name}", f"names mesh axis {a!r}, which the mesh does not have "
                                                     f"(axes: {mesh_axes})")
        out[name] = axes
    return out


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, tuple[str, ...]], *,
                    where: str = "parameter") -> P:
    """PartitionSpec for one array with logical axis `names` (each mesh axis used once)."""
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError("config.mesh.rules", f"{where} uses logical axis {name!r}, which has no rule; "
                                                   f"known: {sorted(rules)}")
        axes = tuple(a for a in rules[name] if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def parameter_specs(model: nnx.Module, rules: Mapping[str, tuple[str, ...]]) -> dict[tuple[str, ...], P]:
    """{parameter path: PartitionSpec} for every `nnx.Param` of `model` (abstract models work)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(p) for p in path)
        names = var.get_metadata().get("out_sharding")
        if names is None:
            names = (None,) * len(var.shape)
        out[key] = logical_to_spec(tuple(names), rules, where="/".join(key))
    return out


def parameter_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> dict[
        tuple[str, ...], NamedSharding]:
    """{parameter path: NamedSharding} on `mesh`."""
    return {k: NamedSharding(mesh, s) for k, s in parameter_specs(model, rules).items()}


def mesh_config(**extra: Any):
    """The `config.mesh` block every trainer config starts from: sizes of (data, fsdp, tensor,
    expert) within a slice, one -1 taking the rest of the devices (default: FSDP over all);
    `dcn_shape` the same axes across slices, () for one slice; `rules` logical axis -> mesh
    axis / axes / None (DEFAULT_RULES); the replicated-parameter tolerance and what exceeding it
    does (error | warn). `extra`: trainer-specific fields."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        shape=(1, -1, 1, 1), dcn_shape=(), rules=ml_collections.ConfigDict(dict(DEFAULT_RULES)),
        replication_tolerance=0.02,  # fraction of parameter bytes allowed unsharded over a non-data axis
        replication_action="error", **extra))


def rules_from_config(cfg: Any, mesh_axes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES updated by `config.mesh.rules` (a mapping name -> axis/axes/None)."""
    rules: dict[str, MeshAxes] = dict(DEFAULT_RULES)
    overrides = cfg.get("rules") if hasattr(cfg, "get") else None
    if overrides:
        rules.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(overrides).items()})
    return check_rules(rules, mesh_axes)
