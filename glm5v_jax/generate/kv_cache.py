"""The device side of the paged KV cache: one K and one V array per layer stack, and jittable writes.

Layout per stack: `[L, KV, P, page, D]` (layers, KV heads, pages, tokens per page, head dim); one
layer's slice `[KV, P, page, D]` is what `glm5v_jax.kernels.paged_attention_reference` and jax's
Pallas TPU paged-attention kernel read; `glm5v_jax.kernels.paged_write` stores new tokens into it.
Copies are pure functions of the arrays, meant to run inside the jitted engine steps with the cache
donated (updated in place).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StackCache:
    """Shapes of one layer stack's cache (dense layers, MoE layers, or one MTP depth)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def init(self, num_pages: int, page_size: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        shape = (self.num_layers, self.num_kv_heads, num_pages, page_size, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def copy_pages(cache: dict[str, jax.Array], src: jax.Array, dst: jax.Array) -> dict[str, jax.Array]:
    """Copy pages `src[i]` to `dst[i]` in every layer of a stack's cache (a fork's copy-on-write)."""
    return {name: a.at[:, :, dst].set(a[:, :, src]) for name, a in cache.items()}


def cache_sharding(mesh: jax.sharding.Mesh, num_kv_heads: int) -> jax.sharding.NamedSharding:
    """A stack's cache on a mesh: KV heads over `tensor` when they divide, every other axis replicated."""
    axis = "tensor" if "tensor" in mesh.axis_names and num_kv_heads % mesh.shape["tensor"] == 0 else None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axis, None, None, None))
