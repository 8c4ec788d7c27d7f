"""Generation: a paged KV cache and the pieces of a batched engine (layered above `models/`).

  pages.py     host page pool: free list, reference counts, fork with copy-on-write of the last page
  kv_cache.py  the device cache (pages per layer stack) and its jittable writes and page copies

Attention over the cache is `glm5v_jax.kernels.paged_attention_reference` (pure jnp; the Pallas TPU
paged-attention kernel uses the same `[KV, P, page, D]` layout).
"""
