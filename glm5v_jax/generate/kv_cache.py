"""The device side of the paged KV cache: one K and one V array per layer stack, and jittable writes.

Layout per stack: `[L, KV, P, page, D]` (layers, KV heads, pages, tokens per page, head dim); one
layer's slice `[KV, P, page, D]` is what `glm5v_jax.kernels.paged_attention_reference` and jax's
Pallas TPU paged-attention kernel read. Writes and copies are pure functions of the arrays, meant to
run inside the jitted engine steps with the cache donated (updated in place).
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


def write_tokens(pages: jax.Array, new: jax.Array, page_table: jax.Array, positions: jax.Array,
                 valid: jax.Array) -> jax.Array:
    """Store K or V of new tokens: pages `[KV, P, page, D]`, new `[B, S, KV, D]` at token indices
    `positions [B, S]` of rows with tables `page_table [B, N]`; tokens where `valid [B, S]` is False
    (padding of a bucket) are dropped, never written."""
    _, num_pages, page_size, _ = pages.shape
    slot = jnp.take_along_axis(page_table, jnp.clip(positions // page_size, 0, page_table.shape[1] - 1), axis=1)
    slot = jnp.where(valid, slot, num_pages)  # out of range: dropped
    offset = positions % page_size
    values = new.transpose(2, 0, 1, 3).astype(pages.dtype)  # [KV, B, S, D]
    return pages.at[:, slot, offset].set(values, mode="drop")


def copy_pages(cache: dict[str, jax.Array], src: jax.Array, dst: jax.Array) -> dict[str, jax.Array]:
    """Copy pages `src[i]` to `dst[i]` in every layer of a stack's cache (a fork's copy-on-write)."""
    return {name: a.at[:, :, dst].set(a[:, :, src]) for name, a in cache.items()}
