"""The backbone over a paged KV cache: a prefill chunk, then chunked extends and one-token decode steps,
give the logits of a full forward of the whole sequence (f32, 1e-5), for rows of mixed lengths, with
random page tables and bucket padding that is never written."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.generate.kv_cache import StackCache
from glm5v_jax.layers.attention import CachePages
from glm5v_jax.models.backbone import GLMBackbone
from helpers import small_spec

PAGE, PAGES_PER_ROW = 4, 6  # a row holds up to 24 tokens


def _positions(index: np.ndarray) -> jnp.ndarray:
    """Text tokens: the M-RoPE (t, h, w) positions all equal the token's index."""
    return jnp.asarray(np.repeat(index[..., None], 3, axis=-1), jnp.int32)


def _cache(spec, num_pages: int) -> dict:
    return {name: StackCache(n, spec.num_kv_heads, spec.head_dim).init(num_pages, PAGE)
            for name, n in (("dense_layers", spec.first_k_dense), ("moe_layers", spec.num_moe_layers)) if n}


def test_cached_chunks_and_decode_equal_the_full_forward():
    spec = small_spec().backbone
    model = GLMBackbone(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.array([19, 11])  # two rows of different lengths
    b, total = len(lengths), int(lengths.max())
    tokens = rng.integers(5, spec.vocab_size, size=(b, total)).astype(np.int32)
    index = np.broadcast_to(np.arange(total), (b, total))
    segments = (index < lengths[:, None]).astype(np.int32)
    full_logits, _, _ = model(jnp.asarray(tokens), _positions(index), jnp.asarray(segments))

    num_pages = b * PAGES_PER_ROW + 2
    table = jnp.asarray(rng.permutation(num_pages)[:b * PAGES_PER_ROW].reshape(b, PAGES_PER_ROW), jnp.int32)
    cache = _cache(spec, num_pages)

    @nnx.jit
    def step(model, cache, tokens, index, valid, lengths):
        pages = CachePages(table, lengths, index, valid)
        positions = jnp.repeat(index[..., None], 3, axis=-1)  # text: t = h = w = index
        h, cache, _ = model.run_layers_cached(model.embed_tokens(tokens), positions, cache, pages)
        return model.logits(h), cache

    # prefill 7 tokens (row 1 pads nothing), extend 5 (a bucket of 6: one padded slot), then decode
    chunks = [(0, 7, 7), (7, 5, 6)] + [(s, 1, 1) for s in range(12, total)]
    got = np.zeros_like(np.asarray(full_logits))
    for start, n, bucket in chunks:
        idx = start + np.arange(bucket)[None].repeat(b, 0)
        valid = (np.arange(bucket)[None] < n) & (idx < lengths[:, None])
        toks = np.where(valid, np.take_along_axis(tokens, np.minimum(idx, total - 1), axis=1), 0)
        row_len = np.minimum(lengths, start + n)
        logits, cache = step(model, cache, jnp.asarray(toks), jnp.asarray(idx, jnp.int32), jnp.asarray(valid),
                             jnp.asarray(row_len, jnp.int32))
        for r in range(b):
            for s in range(bucket):
                if valid[r, s]:
                    got[r, idx[r, s]] = np.asarray(logits[r, s])
    for r in range(b):
        np.testing.assert_allclose(got[r, :lengths[r]], np.asarray(full_logits)[r, :lengths[r]], rtol=1e-5,
                                   atol=1e-5)
