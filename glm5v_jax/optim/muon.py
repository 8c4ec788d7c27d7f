"""Muon as an optax gradient transformation, built from small transforms.

    muon = chain(
        {muon:  momentum (Nesterov, lerp, f32) -> orthogonalise (Newton-Schulz per matrix,
                sharded layout from optim.sharded_ns) -> shape scale,
         adamw: Adam moments (own betas and eps, no Nesterov)},
        {(group, muon|adamw): decoupled weight decay -> -learning_rate},
        cast to param dtype)

Which leaves take which branch, and how each is viewed as matrices, comes from a
routing table (`glm5v_jax.optim.routing.route(model)`), keyed by parameter path.
Scale modes: `rms` = 0.2 * sqrt(max(fan_in, fan_out)) (Moonlight: update RMS 0.2 so
AdamW hyper-parameters carry over; the default), `spectral` = sqrt(max(1, fan_out /
fan_in)), `none` = 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from glm5v_jax.errors import ConfigError
from glm5v_jax.optim.newton_schulz import newton_schulz
from glm5v_jax.optim.routing import MatrixSpec, path_key, tree_of_specs
from glm5v_jax.optim.sharded_ns import LAYOUTS, orthogonalize_matrices

SCALE_MODES = {
    "rms": lambda fan_in, fan_out: 0.2 * math.sqrt(max(fan_in, fan_out)),
    "spectral": lambda fan_in, fan_out: math.sqrt(max(1.0, fan_out / fan_in)),
    "none": lambda fan_in, fan_out: 1.0,
}

Table = Mapping[tuple[str, ...], MatrixSpec | None]


def matrices_only(params: Any) -> Any:
    """Weight-decay mask: decay matrices, not norms, biases or other vectors."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


class MomentumState(NamedTuple):
    mu: Any


def muon_momentum(beta: float = 0.95, nesterov: bool = True) -> optax.GradientTransformation:
    """mu <- lerp(mu, g, 1 - beta); update = lerp(g, mu, beta) (Nesterov) or mu. Float32, no bias correction."""
    def init(params):
        return MomentumState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (1 - beta) * (g.astype(jnp.float32) - m), state.mu, updates)
        out = jax.tree.map(lambda g, m: g.astype(jnp.float32) + beta * (m - g.astype(jnp.float32)), updates, mu) \
            if nesterov else mu
        return out, MomentumState(mu)

    return optax.GradientTransformation(init, update)


def _as_matrices(x: jax.Array, spec: MatrixSpec):
    """x -> ([prod(batch), fan_in, fan_out], inverse function)."""
    order = spec.batch + spec.reduction + spec.output
    moved = jnp.transpose(x, order)
    batch_shape = [x.shape[a] for a in spec.batch]
    fan_in, fan_out = spec.fans(x.shape)
    mats = moved.reshape((math.prod(batch_shape), fan_in, fan_out))
    inverse_order = np.argsort(order)

    def back(m):
        return jnp.transpose(m.reshape(moved.shape), inverse_order)
    return mats, back


class OrthogonalizeState(NamedTuple):
    count: jax.Array  # steps taken, picks the sampled matrix
    ortho_error: jax.Array  # `orthogonality_error` of one sampled matrix, refreshed every `error_every` steps


def orthogonality_error(x: jax.Array, o: jax.Array, rel_tol: float = 1e-2) -> jax.Array:
    """How far `o` (Newton-Schulz of `x [m, n]`) is from the exact polar factor U V^T of `x`,
    on the directions that carry signal: |o - U_r V_r^T|_F / sqrt(r), r = #{sigma_i > rel_tol
    sigma_max}. (A gradient is often low-rank; Newton-Schulz rightly leaves its null
    directions near 0, so |o o^T - I| would mostly measure the rank, not the iteration.)"""
    u, sigma, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    keep = (sigma > rel_tol * sigma[0]).astype(jnp.float32)
    polar = (u * keep) @ vt
    return jnp.linalg.norm(o.astype(jnp.float32) - polar) / jnp.sqrt(jnp.maximum(keep.sum(), 1.0))


def orthogonalize(table: Table, ns_fn: Callable[[jax.Array], jax.Array] = newton_schulz,
                  scale_mode: str = "rms", *, layout: str = "stack", mesh: Mesh | None = None,
                  shardings: Mapping[tuple[str, ...], Any] | None = None,
                  error_every: int = 10) -> optax.GradientTransformation:
    """Replace each routed update by its (Newton-Schulz) orthogonalisation, times the shape scale.

    `layout` decides where the matrices live during Newton-Schulz (see
    `glm5v_jax.optim.sharded_ns`): `stack` groups same-shape matrices of all leaves and gives
    each device whole matrices, `replicate` runs every matrix on every device, `auto` leaves
    it to the compiler. `shardings` (optional, {parameter path: NamedSharding}) is where each
    update is resharded back to. Every `error_every` steps one sampled matrix's
    `orthogonality_error` is measured (an SVD of one matrix) and kept in the state.
    """
    if scale_mode not in SCALE_MODES:
        raise ConfigError("scale_mode", f"unknown scale_mode {scale_mode!r}; expected one of {sorted(SCALE_MODES)}")
    scale_fn = SCALE_MODES[scale_mode]

    def init_fn(params):
        del params
        return OrthogonalizeState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        specs = tree_of_specs(updates, table)
        leaves, treedef = jax.tree.flatten(updates)
        spec_leaves = treedef.flatten_up_to(specs)
        if any(spec is None for spec in spec_leaves):
            raise ValueError("a leaf routed to AdamW reached the Muon branch")
        if not leaves:
            return updates, state
        mats, backs = zip(*(_as_matrices(u, spec) for u, spec in zip(leaves, spec_leaves)))
        ortho = orthogonalize_matrices(mats, ns_fn, layout=layout, mesh=mesh)
        sample = _sample_error(mats, ortho, state, error_every)
        out = [back(o) * scale_fn(*spec.fans(u.shape)) for back, o, u, spec in zip(backs, ortho, leaves, spec_leaves)]
        out = jax.tree.unflatten(treedef, out)
        if shardings is not None:  # back to each parameter's own layout
            out = jax.tree_util.tree_map_with_path(
                lambda path, u: jax.lax.with_sharding_constraint(u, shardings[path_key(path)])
                if path_key(path) in shardings else u, out)
        return out, OrthogonalizeState(state.count + 1, sample)

    return optax.GradientTransformation(init_fn, update_fn)


def _sample_error(mats: Sequence[jax.Array], ortho: Sequence[jax.Array], state: OrthogonalizeState,
                  every: int) -> jax.Array:
    """Orthogonality error of one matrix of the largest leaf, a different one each time."""
    i = max(range(len(ortho)), key=lambda j: ortho[j].size)
    index = (state.count // every) % ortho[i].shape[0]

    def measure(_):
        pick = lambda m: jax.lax.dynamic_index_in_dim(m, index, keepdims=False)  # noqa: E731
        return orthogonality_error(pick(mats[i]), pick(ortho[i]))
    return jax.lax.cond(state.count % every == 0, measure, lambda _: state.ortho_error, None)


def cast_to_param_dtype() -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        if params is None:
            return updates, state
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@dataclasses.dataclass(frozen=True)
class GroupHyperparams:
    """One parameter group's step sizes: Muon and AdamW LRs (schedules allowed), decays."""

    muon_learning_rate: optax.ScalarOrSchedule
    adam_learning_rate: optax.ScalarOrSchedule
    weight_decay: float = 0.1
    adam_weight_decay: float = 0.1


def grouped_muon(
    table: Table,
    groups: Mapping[str, GroupHyperparams],
    group_of: Callable[[tuple[str, ...]], str],
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_preset: str = "polar_express",
    ns_steps: int = 5,
    ns_dtype=jnp.bfloat16,
    scale_mode: str = "rms",
    layout: str = "stack",
    mesh: Mesh | None = None,
    shardings: Mapping[tuple[str, ...], Any] | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Muon for routed matrices, AdamW for the rest, with per-group LRs and decays.

    direction: {muon: momentum -> orthogonalise (all groups' matrices together, so the
    sharded layout can stack them), adamw: Adam moments}; then per (group, optimizer):
    decoupled weight decay -> -learning_rate (decay is tied to the schedule); then a
    cast to the parameter dtype. `group_of(path)` names each parameter's group.
    """
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"unknown Newton-Schulz layout {layout!r}; expected one of {LAYOUTS}")

    def ns_fn(x):
        return newton_schulz(x, ns_preset, ns_steps, dtype=ns_dtype)

    def kind(path) -> str:
        key = path_key(path)
        if key not in table:
            raise KeyError(f"parameter {'/'.join(key)} is missing from the Muon routing table")
        return "muon" if table[key] is not None else "adamw"

    def group(path) -> str:
        name = group_of(path_key(path))
        if name not in groups:
            raise ValueError(f"parameter {'/'.join(path_key(path))} is in group {name!r}, which has no "
                             f"hyper-parameters; known groups: {sorted(groups)}")
        return name

    direction = optax.multi_transform(
        {"muon": optax.chain(muon_momentum(beta, nesterov),
                             orthogonalize(table, ns_fn, scale_mode, layout=layout, mesh=mesh,
                                           shardings=shardings)),
         "adamw": optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps)},
        lambda params: jax.tree_util.tree_map_with_path(lambda p, _: kind(p), params))
    steps = {}
    for name, h in groups.items():
        steps[f"{name}/muon"] = optax.chain(optax.add_decayed_weights(h.weight_decay),
                                            optax.scale_by_learning_rate(h.muon_learning_rate))
        steps[f"{name}/adamw"] = optax.chain(optax.add_decayed_weights(h.adam_weight_decay, mask=matrices_only),
                                             optax.scale_by_learning_rate(h.adam_learning_rate))
    step = optax.multi_transform(
        steps, lambda params: jax.tree_util.tree_map_with_path(lambda p, _: f"{group(p)}/{kind(p)}", params))
    return optax.chain(direction, step, cast_to_param_dtype())


def muon(
    learning_rate: optax.ScalarOrSchedule,
    table: Table,
    *,
    weight_decay: float = 0.1,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_weight_decay: float | None = None,
    **kwargs,
) -> optax.GradientTransformation:
    """Muon for routed matrices, AdamW for the rest (its LR and decay default to Muon's).

    One group; `kwargs` are those of `grouped_muon` (beta, nesterov, ns_preset, ns_steps,
    ns_dtype, scale_mode, layout, mesh, shardings, adam_b1, adam_b2, adam_eps).
    """
    hyper = GroupHyperparams(
        learning_rate, learning_rate if adam_learning_rate is None else adam_learning_rate,
        weight_decay, weight_decay if adam_weight_decay is None else adam_weight_decay)
    return grouped_muon(table, {"all": hyper}, lambda path: "all", **kwargs)
