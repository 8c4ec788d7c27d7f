"""Parameter creation with logical axis names.

Every parameter carries its logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `exp`, ...) as flax `out_sharding` metadata; the sharding rules of a run
map them to mesh axes. Outside a mesh the names are only recorded; inside one
(with `jax.set_mesh`) the value is sharded as it is created.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

DEFAULT_INIT_STD = 0.02


class RouterBias(nnx.Variable):
    """The MoE correction bias: used for top-k selection only and updated from the
    expert load by `glm5v_jax.layers.moe.update_router_bias`, never by the optimizer
    (optimizers are built with `wrt=nnx.Param`, which excludes this type)."""


def _mesh_is_set() -> bool:
    try:
        return not jax.sharding.get_abstract_mesh().empty
    except Exception:  # noqa: BLE001 - older/newer jax without abstract meshes
        return False


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An `nnx.Param` of `shape` initialised by `init`, annotated with `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(key, tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=_mesh_is_set())


def normal(std: float = DEFAULT_INIT_STD) -> Initializer:
    return nnx.initializers.normal(std)


def zeros() -> Initializer:
    return nnx.initializers.zeros


def ones() -> Initializer:
    return nnx.initializers.ones
