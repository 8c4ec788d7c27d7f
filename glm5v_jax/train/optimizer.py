"""The trainers' optimizer: Muon (default) or AdamW, with per-module groups and schedules.

Parameters are grouped by path prefix; the default groups are `vision` (CogViT),
`projector`, and `text` (backbone and MTP), and a config may add any other named group
(e.g. `experts` with prefix `backbone/moe_layers/mlp`): the longest matching prefix
wins; one prefix in two groups is an error. Each group has its own
Muon peak LR, AdamW peak LR, warmup, decay and weight decay. Weight decay applies to
matrices only (not norms, biases or vectors) and is tied to the schedule. Gradients are
clipped by global norm first.

With `name='muon'`, matrices routed by `glm5v_jax.optim.routing` take Muon and the rest
(embeddings, LM head, patch embedding, norms, biases, router) AdamW; with `name='adamw'`
everything takes AdamW at the group's `lr`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.optim.muon import SCALE_MODES, GroupHyperparams, grouped_muon, matrices_only
from glm5v_jax.optim.qk_clip import qk_clip, qk_clip_targets
from glm5v_jax.optim.routing import MatrixSpec, format_table, path_key, route

OPTIMIZERS = ("muon", "adamw")


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """One optimizer group: which parameters (path prefixes) and its schedule."""

    prefixes: tuple[str, ...]
    lr: float  # AdamW peak LR (and the only LR with name='adamw')
    muon_lr: float  # Muon peak LR; with rms scaling the AdamW LR carries over (Moonlight)
    warmup_steps: int = 0
    decay: str = "cosine"
    final_fraction: float = 0.1
    weight_decay: float = 0.1


def schedule(peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
             final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine (or constant) decay to final_fraction * peak."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if decay == "constant":
        main = optax.constant_schedule(peak)
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup_steps), alpha=final_fraction)
    else:
        raise ValueError(f"unknown decay {decay!r}; expected 'cosine' or 'constant'")
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), main], [warmup_steps])


def groups_from_config(cfg: Mapping[str, Mapping[str, Any]]) -> dict[str, GroupSettings]:
    """`config.optim.groups` -> {name: GroupSettings}; `prefixes` is a comma-separated string."""
    out = {}
    for name, g in cfg.items():
        fields = dict(g)
        prefixes = tuple(p.strip().strip("/") for p in str(fields.pop("prefixes", "")).split(",") if p.strip())
        if not prefixes:
            raise ConfigError(f"config.optim.groups.{name}.prefixes", "give the parameter path prefixes of the "
                             "group, comma-separated (e.g. 'backbone,mtp')")
        known = {f.name for f in dataclasses.fields(GroupSettings)} - {"prefixes"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"config.optim.groups.{name}", f"unknown field(s) {unknown}; expected {sorted(known)}")
        out[name] = GroupSettings(prefixes=prefixes, **fields)
    return out


def group_assigner(groups: Mapping[str, GroupSettings]):
    """path -> group name by the longest matching prefix; a path no group claims is an error."""
    owner: dict[str, str] = {}
    for name, g in groups.items():
        for p in g.prefixes:
            if p in owner and owner[p] != name:
                raise ConfigError("config.optim.groups", f"prefix {p!r} is claimed by both {owner[p]!r} and "
                                 f"{name!r}; remove it from one (a longer prefix may refine a group)")
            owner[p] = name
    prefixes = sorted(((tuple(p.split("/")), name) for p, name in owner.items()), key=lambda item: -len(item[0]))

    def group_of(path: tuple[str, ...]) -> str:
        for prefix, name in prefixes:
            if path[: len(prefix)] == prefix:
                return name
        raise ValueError(f"parameter {'/'.join(path)} belongs to no optimizer group; prefixes: "
                         f"{ {name: g.prefixes for name, g in groups.items()} }")
    return group_of


def make_tx(params: nnx.State, *, total_steps: int, groups: Mapping[str, GroupSettings], name: str = "muon",
            table: Mapping[tuple[str, ...], MatrixSpec | None] | None = None, clip_norm: float = 1.0,
            b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
            muon_kwargs: Mapping[str, Any] | None = None):
    """(optax transform, {"<group>/<muon|adamw>": schedule}).

    `table` (from `glm5v_jax.optim.routing.route`) is required for Muon. `muon_kwargs`
    go to `grouped_muon` (beta, nesterov, ns_preset, ns_steps, ns_dtype, scale_mode, layout,
    mesh, shardings).
    """
    if name not in OPTIMIZERS:
        raise ConfigError("config.optim.name", f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    group_of = group_assigner(groups)
    jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_key(path)), params)  # every leaf has a group
    schedules = {}
    for g_name, g in groups.items():
        for kind, peak in (("adamw", g.lr), ("muon", g.muon_lr)):
            if name == "adamw" and kind == "muon":
                continue
            schedules[f"{g_name}/{kind}"] = schedule(peak, total_steps, g.warmup_steps, g.decay, g.final_fraction)
    if name == "muon":
        if table is None:
            raise ValueError("Muon needs the routing table (glm5v_jax.optim.routing.route(model))")
        hyper = {g_name: GroupHyperparams(schedules[f"{g_name}/muon"], schedules[f"{g_name}/adamw"],
                                          g.weight_decay, g.weight_decay)
                 for g_name, g in groups.items()}
        inner = grouped_muon(table, hyper, group_of, adam_b1=b1, adam_b2=b2, adam_eps=eps, **(muon_kwargs or {}))
    else:
        inner = optax.multi_transform(
            {g_name: optax.adamw(schedules[f"{g_name}/adamw"], b1=b1, b2=b2, eps=eps,
                                 weight_decay=g.weight_decay, mask=matrices_only)
             for g_name, g in groups.items()},
            lambda p: jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_key(path)), p))
    return optax.chain(optax.clip_by_global_norm(clip_norm), inner), schedules


def transform_from_config(model: nnx.Module, cfg: Any, total_steps: int, *, mesh=None, shardings=None):
    """(optax transform, {"<group>/<kind>": schedule}, {param path: "<group>/<kind>"},
    Muon routing table as text or None) from `config.optim`.

    `model` may be abstract (`nnx.eval_shape`): only paths, shapes and axis names are read.
    `mesh` and `shardings` ({param path: NamedSharding}) place Muon's Newton-Schulz work
    (`config.optim.muon.layout`) and reshard its updates.
    """
    params = nnx.state(model, nnx.Param)
    groups = groups_from_config(cfg.groups)
    group_of = group_assigner(groups)
    muon_kwargs = dict(cfg.muon)
    table = route(model, split_heads=bool(muon_kwargs.pop("split_heads", False)))
    muon_kwargs["ns_dtype"] = jnp.dtype(muon_kwargs["ns_dtype"])
    if mesh is not None:
        muon_kwargs.update(mesh=mesh, shardings=shardings)
    tx, schedules = make_tx(params, total_steps=total_steps, groups=groups, name=cfg.name, table=table,
                            clip_norm=cfg.clip_norm, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, muon_kwargs=muon_kwargs)
    if cfg.qk_clip_tau > 0:  # MuonClip: cap per-head logits after each update
        if not model.spec.backbone.track_max_logits:
            raise ConfigError("config.optim.qk_clip_tau", "> 0 needs config.model.backbone.track_max_logits=True")
        if model.spec.backbone.qk_norm:
            raise ConfigError("config.optim.qk_clip_tau", "> 0 needs config.model.backbone.qk_norm=False "
                             "(with QK-Norm the projection scale does not reach the logits)")
        tx = optax.chain(tx, qk_clip(cfg.qk_clip_tau, targets=qk_clip_targets(model, prefixes=("backbone", "mtp"))))
    muon_on = cfg.name == "muon"
    labels = {path: f"{group_of(path)}/{'muon' if muon_on and spec is not None else 'adamw'}"
              for path, spec in table.items()}
    routing = None
    if muon_on:
        n_muon = sum(s is not None for s in table.values())
        routing = (f"{n_muon} Muon, {len(table) - n_muon} AdamW leaves\n"
                   + format_table(model, table, scale_fn=SCALE_MODES[cfg.muon.scale_mode]))
    return tx, schedules, labels, routing
