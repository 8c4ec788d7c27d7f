"""Model and optimizer state created already sharded, and the shardings of a train state.

`create_sharded(make, mesh, param_shardings)` runs the constructor `make()` (which builds
an nnx object, e.g. `(model, optimizer)`) inside `jax.jit` with explicit output
shardings, so no device ever holds a full replica. Parameters take the sharding the
logical rules give them (`rules.parameter_shardings`); an optimizer leaf whose path ends
with a parameter's path and has its shape (Adam moments, Muon momentum) takes that
parameter's sharding; everything else (step counters, RNG state, the router
correction bias, scalars) is replicated.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm5v_jax.optim.routing import path_key


def state_shardings(abstract_state: Any, mesh: Mesh,
                    param_shardings: Mapping[tuple[str, ...], NamedSharding]) -> Any:
    """A tree like `abstract_state` of NamedShardings (see the module docstring)."""
    by_len: dict[int, dict[tuple[str, ...], NamedSharding]] = {}
    for path, s in param_shardings.items():
        by_len.setdefault(len(path), {})[path] = s
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = path_key(path)
        for n, table in by_len.items():
            if len(key) >= n and key[-n:] in table:
                return table[key[-n:]]
        return replicated

    shardings = jax.tree_util.tree_map_with_path(pick, abstract_state)
    # A sharding whose mesh axes do not divide the leaf (e.g. a scalar that matched) is replicated.
    return jax.tree.map(lambda leaf, s: s if _fits(leaf, s) else replicated, abstract_state, shardings)


def _fits(leaf, sharding: NamedSharding) -> bool:
    shape = getattr(leaf, "shape", ())
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for size, entry in zip(shape, spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        parts = 1
        for a in axes:
            parts *= sharding.mesh.shape[a]
        if size % parts:
            return False
    return True


def create_sharded(make: Callable[[], Any], mesh: Mesh,
                   param_shardings: Mapping[tuple[str, ...], NamedSharding]) -> tuple[Any, Any, Any]:
    """(graphdef, state, state shardings) of `make()`, its state created sharded on `mesh`."""
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, param_shardings)

    def init():
        return nnx.split(make())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def bytes_per_device(state: Any) -> dict[Any, int]:
    """{device: bytes of `state` (a tree of jax.Arrays) that device holds}, from the shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(state):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
