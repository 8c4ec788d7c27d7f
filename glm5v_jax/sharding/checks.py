"""Checks of a (model, mesh, rules, batch) combination before anything is compiled.

Each failure is a `ConfigError` naming the config field to change:
* a parameter dimension not divisible by the mesh axes its logical name maps to
  (heads, KV heads, experts, vocabulary, widths), named after the model field;
* a global batch not divisible by the data-parallel axes (`config.data.batch_size`);
* too much of the parameter bytes replicated over a mesh axis of size > 1 (more than
  `tolerance`, default 2%): the message lists the largest offenders.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

from flax import nnx
from jax.sharding import Mesh

from glm5v_jax.errors import ConfigError
from glm5v_jax.sharding.rules import parameter_specs

# (top-level module, logical axis) -> the model config field that sets that size
_SECTION = {"vision": "vision", "projector": "vision", "backbone": "backbone", "mtp": "backbone"}
_FIELD = {"heads": "num_heads", "kv_heads": "num_kv_heads", "exp": "num_experts", "vocab": "vocab_size",
          "embed": "embed_dim", "mlp": "mlp_dim", "layers": "num_layers", "kv": "head_dim"}


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def field_for(path: tuple[str, ...], logical: str) -> str:
    """The config field behind dimension `logical` of the parameter at `path`."""
    section = _SECTION.get(path[0], path[0])
    name = _FIELD.get(logical, logical)
    if logical == "mlp" and "moe_layers" in path and path[-1] in ("gate", "up", "down") and "shared" not in path:
        name = "moe_mlp_dim"
    return f"config.model.{section}.{name}"


def check_divisibility(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> None:
    """Every sharded parameter dimension divides evenly over its mesh axes."""
    specs = parameter_specs(model, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(p) for p in path)
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        for dim, (size, entry, logical) in enumerate(zip(var.shape, specs[key], names)):
            parts = math.prod(mesh.shape[a] for a in _axes_of(entry))
            if size % parts:
                raise ConfigError(field_for(key, logical),
                                  f"{size} is not divisible by the {parts} devices of mesh axes {_axes_of(entry)} "
                                  f"that logical axis {logical!r} maps to (parameter {'/'.join(key)}, dim {dim}); "
                                  "change the size, the mesh (config.mesh.shape) or the rule (config.mesh.rules)")


def check_batch(global_batch: int, mesh: Mesh, rules: Mapping[str, tuple[str, ...]],
                field: str = "config.data.batch_size") -> None:
    """The global batch divides over the mesh axes of `activation_batch`."""
    axes = rules.get("activation_batch", ())
    parts = math.prod(mesh.shape[a] for a in axes)
    if global_batch % parts:
        raise ConfigError(field, f"{global_batch} rows do not divide over the {parts} devices of the batch axes "
                                 f"{axes} (config.mesh.shape {tuple(mesh.shape.values())})")


def replicated_fraction(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple[str, ...]],
                        ignore_axes: tuple[str, ...] = ()):
    """(fraction of parameter bytes replicated over some mesh axis of size > 1 not in
    `ignore_axes`, [(bytes, path, shape, those axes)] largest first)."""
    specs = parameter_specs(model, rules)
    big_axes = [a for a, n in mesh.shape.items() if n > 1 and a not in ignore_axes]
    total, replicated, offenders = 0, 0, []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(p) for p in path)
        nbytes = math.prod(var.shape) * var.dtype.itemsize
        total += nbytes
        used = {a for e in specs[key] for a in _axes_of(e)}
        unused = tuple(a for a in big_axes if a not in used)
        if unused:
            replicated += nbytes
            offenders.append((nbytes, "/".join(key), tuple(var.shape), unused))
    offenders.sort(reverse=True)
    return (replicated / total if total else 0.0), offenders


def check_replication(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple[str, ...]], *,
                      tolerance: float = 0.02, action: str = "error", ignore_axes: tuple[str, ...] = ("data",),
                      field: str = "config.mesh.replication_tolerance") -> float:
    """Fail (or warn, action='warn') when more than `tolerance` of the parameter bytes are
    replicated over a mesh axis of size > 1 other than `ignore_axes` (pure data
    parallelism replicates by design). Returns the fraction."""
    if action not in ("error", "warn"):
        raise ConfigError("config.mesh.replication_action", f"expected 'error' or 'warn', got {action!r}")
    frac, offenders = replicated_fraction(model, mesh, rules, ignore_axes)
    if frac > tolerance:
        top = "; ".join(f"{p} {list(s)} {b / 2**20:.2f} MiB not sharded over {u}" for b, p, s, u in offenders[:5])
        message = (f"{100 * frac:.1f}% of parameter bytes are replicated over a mesh axis of size > 1 "
                   f"(tolerance {100 * tolerance:.1f}%). Largest: {top}. Change config.mesh.rules or the mesh.")
        if action == "warn":
            warnings.warn(f"{field}: {message}", stacklevel=2)
        else:
            raise ConfigError(field, message)
    return frac
