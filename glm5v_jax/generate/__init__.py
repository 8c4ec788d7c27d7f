"""Generation: a paged KV cache and the pieces of a batched engine (layered above `models/`).

  pages.py     host page pool: free list, reference counts, fork with copy-on-write of the last page
  kv_cache.py  the device cache (pages per layer stack) and page copies (copy-on-write of forks)
  sampling.py  per-request sampling parameters as arrays; tokens with logp_raw and logp_sampled
  decode.py    jitted prefill and on-device multi-step decode (cache donated, per-row stop), and the
               offline `generate(model, prompts, images=..., ...)` built on them
  run_loader.py  `load_run(workdir, step=None)` -> (model, tokenizer, config) of a VLM run; the chat
               prompt of a turn; an image preprocessed as in training
  __main__.py  `python -m glm5v_jax.generate --workdir=RUN --prompt=... [--image=PATH]`

The backbone runs over the cache with `GLMBackbone.run_layers_cached` (`layers.attention.CachePages`
says where the new tokens go).

Attention over the cache is `glm5v_jax.kernels.paged_attention_reference` (pure jnp; the Pallas TPU
paged-attention kernel uses the same `[KV, P, page, D]` layout).
"""
