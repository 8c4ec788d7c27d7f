"""Where Newton-Schulz runs when the matrices are sharded over a mesh.

Left to itself, the compiler keeps an FSDP/TP-sharded matrix sharded through the
iterations and inserts all-gathers and all-reduces inside every Newton-Schulz step
(`../shared/reference/muon.md` section 5). Instead, with the `stack` layout:

  1. matrices of the same shape `[fan_in, fan_out]` from all leaves (scanned layers,
     experts, separate parameters) are concatenated into one batch `[N, fan_in, fan_out]`;
  2. a batch with at least one matrix per device is padded to a multiple of the device
     count and its batch axis sharded over every mesh axis, so each device holds whole
     matrices (the compiler moves them with all-to-alls, once, before the loop);
     `shard_map` runs the iterations on each device's block, so the compiler cannot
     re-shard them (a sharding constraint alone does not stop it);
  3. a batch with fewer matrices than devices is replicated (one all-gather before the
     loop, redundant compute, no traffic afterwards): the fallback for leftovers;
  4. Newton-Schulz runs locally; the results are split back per leaf. The caller reshards
     each update to its parameter's layout.

`replicate` replicates every batch; `auto` adds no constraint (the compiler decides).
Without a mesh (none given and none set with `jax.set_mesh`) all layouts compute the
same thing on one device. Zero padding is harmless: Newton-Schulz maps 0 to 0.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from glm5v_jax.errors import ConfigError

LAYOUTS = ("stack", "replicate", "auto")


def _mesh_or_none(mesh: Mesh | None):
    if mesh is not None:
        return mesh
    try:
        abstract = jax.sharding.get_abstract_mesh()
    except Exception:  # noqa: BLE001 - jax without abstract meshes
        return None
    return None if abstract.empty else abstract


def _local(fn: Callable[[jax.Array], jax.Array], x: jax.Array, mesh, spec: P) -> jax.Array:
    """`fn` on each device's block of `x` laid out as `spec` (shard_map: the compiler cannot
    re-shard the iterations, so no collective runs inside them)."""
    kwargs = {"mesh": mesh} if isinstance(mesh, Mesh) else {}
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, **kwargs)(x)


def orthogonalize_matrices(mats: Sequence[jax.Array], ns_fn: Callable[[jax.Array], jax.Array], *,
                           layout: str = "stack", mesh: Mesh | None = None) -> list[jax.Array]:
    """`ns_fn` applied to every `[B_i, m_i, n_i]` of `mats`, laid out per `layout`."""
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"unknown Newton-Schulz layout {layout!r}; expected one of {LAYOUTS}")
    mesh = _mesh_or_none(mesh)
    if layout == "auto" or mesh is None:
        return [ns_fn(m) for m in mats]
    devices = math.prod(mesh.shape.values())
    every_axis = P(tuple(mesh.axis_names))
    groups: dict[tuple[int, int, object], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[1], m.shape[2], m.dtype), []).append(i)
    out: list[jax.Array | None] = [None] * len(mats)
    for members in groups.values():
        sizes = [mats[i].shape[0] for i in members]
        stacked = jnp.concatenate([mats[i] for i in members], axis=0) if len(members) > 1 else mats[members[0]]
        total = stacked.shape[0]
        if layout == "stack" and total >= devices:
            padded = -(-total // devices) * devices
            if padded != total:
                stacked = jnp.pad(stacked, ((0, padded - total), (0, 0), (0, 0)))
            result = _local(ns_fn, stacked, mesh, every_axis)[:total]
        else:
            result = _local(ns_fn, stacked, mesh, P())
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        for i, lo, hi in zip(members, offsets[:-1], offsets[1:]):
            out[i] = result[lo:hi]
    return out  # type: ignore[return-value]
