"""The active (mesh, logical rules) pair, and activation annotations by logical name.

Layers call `constrain(x, ("activation_batch", "activation_length", "activation_embed"))`
on their main activations. Outside `use_mesh_rules(...)` that is the identity, so a
model runs unchanged on one device or in a notebook. Inside, it becomes
`jax.lax.with_sharding_constraint` with the spec the rules give; a mesh axis that does
not divide the dimension is dropped from that dimension (a tiny test batch on a big
mesh still compiles), like MaxText's handling of indivisible activation shapes.

This module imports only jax and `glm5v_jax.sharding.rules`, so layers may use it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm5v_jax.sharding.rules import logical_to_spec


# Logical names of the residual stream `[B, S, E]` (text tokens or image patches).
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and the normalised logical rules ({name: tuple of mesh axes})."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]]

    def axis_size(self, logical: str) -> int:
        """Number of devices the logical axis `logical` is split over (1 if it has no rule)."""
        return math.prod(self.mesh.shape[a] for a in self.rules.get(logical, ()))

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return tuple(self.rules.get(logical, ()))


_ACTIVE: contextvars.ContextVar[MeshRules | None] = contextvars.ContextVar("glm5v_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> Iterator[MeshRules]:
    """Make (mesh, rules) active for `constrain` and the expert-parallel MoE while tracing."""
    token = _ACTIVE.set(MeshRules(mesh, dict(rules)))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active() -> MeshRules | None:
    """The active (mesh, rules), or None outside `use_mesh_rules`."""
    return _ACTIVE.get()


def axes_entry(axes: Sequence[str]):
    """A PartitionSpec entry for mesh `axes`: None, one name, or a tuple of names."""
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def dividing_axes(axes: Sequence[str], sizes: Sequence[int], mesh: Mesh) -> tuple[str, ...]:
    """The longest prefix of mesh `axes` whose device count divides every size in `sizes`."""
    kept: list[str] = []
    for a in axes:
        n = math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]
        if any(s % n for s in sizes):
            break
        kept.append(a)
    return tuple(kept)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with, per dimension, the longest prefix of its mesh axes that divides the size."""
    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(axes_entry(dividing_axes(axes, (size,), mesh)))
    return P(*out)


def logical_sharding(shape: Sequence[int], names: Sequence[str | None], ctx: MeshRules | None = None
                     ) -> NamedSharding | None:
    """The NamedSharding of an array of `shape` with logical axis `names` under the active
    rules (None outside `use_mesh_rules`)."""
    ctx = ctx or active()
    if ctx is None:
        return None
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    spec = logical_to_spec(tuple(names), ctx.rules, where="activation")
    return NamedSharding(ctx.mesh, _fit(spec, tuple(shape), ctx.mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding its logical axis `names` map to (identity outside
    `use_mesh_rules`)."""
    sharding = logical_sharding(x.shape, names)
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding)
