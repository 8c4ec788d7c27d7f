"""Generation: a paged KV cache and a continuous-batching engine (layered above `models/`).

  pages.py       host page pool: free list, reference counts, fork with copy-on-write of the last page
  kv_cache.py    the device cache (pages per layer stack) and page copies (copy-on-write of forks)
  sampling.py    per-request sampling parameters as arrays; tokens with logp_raw and logp_sampled
  requests.py    Request / Sample / Completion, image-block checks, prompt chunking
  decode.py      jitted extend (prefill, chunks, appended turns), first-token sampling, the on-device
                 multi-step decode loop over slots (cache donated, per-slot stop), fork page copies
  speculative.py MTP speculative decoding: draft with depth 1, verify k+1 tokens, accept, roll back
  engine.py      the host scheduler: queue, admission by free slots and pages, batched prefill, groups,
                 abort, multi-turn extend, versioned weight updates, metrics, warm-up
  chat.py        chat messages (text and image parts) in the GLM chat template; an image preprocessed
                 as in training; the ids that end an assistant turn
  offline.py     `generate(model, prompts, images=..., n=...)` -> arrays, through the engine
  run_loader.py  `load_run(workdir, step=None)` -> (model, tokenizer, config) of a VLM run
  __main__.py    `python -m glm5v_jax.generate --workdir=RUN --prompt=... [--image=PATH]`

The model runs over the cache with `GLM5V.extend_cached` (main head) and `GLM5V.extend_mtp_cached`
(MTP depths); `layers.attention.CachePages` says where new tokens go, and `kernels.paged_attention`
attends over the pages (reference or jax's Pallas TPU kernel).
"""
