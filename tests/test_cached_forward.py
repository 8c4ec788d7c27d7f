"""The backbone over a paged KV cache: a prefill chunk, then chunked extends and one-token decode steps,
give the logits of a full forward of the whole sequence (f32, 1e-5), for rows of mixed lengths, with
random page tables and bucket padding that is never written."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.layers.attention import CachePages
from glm5v_jax.models.backbone import GLMBackbone
from helpers import image_blocks, paged_cache, small_spec

PAGE, PAGES_PER_ROW = 4, 6  # a row holds up to 24 tokens


def _positions(index: np.ndarray) -> jnp.ndarray:
    """Text tokens: the M-RoPE (t, h, w) positions all equal the token's index."""
    return jnp.asarray(np.repeat(index[..., None], 3, axis=-1), jnp.int32)


def _backbone_stacks(spec) -> dict[str, int]:
    return {name: n for name, n in (("dense_layers", spec.first_k_dense), ("moe_layers", spec.num_moe_layers)) if n}


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
    cache = paged_cache(_backbone_stacks(spec), spec, num_pages, PAGE)

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



def test_vlm_extend_with_images_then_decode_equals_the_full_forward():
    """A prompt with one image, an extend that appends two more images mid-conversation (CogViT and the
    projector run on the chunk's images only), then one-token decode steps: the logits of the whole
    sequence's forward, and its M-RoPE positions."""
    from glm5v_jax.models.vlm import GLM5V
    from helpers import IMAGE_ID, small_batch

    spec = small_spec()
    model = GLM5V(spec, rngs=nnx.Rngs(0))
    batch = {k: np.asarray(v) for k, v in small_batch(rows=1, seq_len=64).items()}
    batch["segment_ids"] = (batch["segment_ids"] != 0).astype(np.int32)  # one sequence
    length = int(batch["segment_ids"].sum())
    full = model({k: jnp.asarray(v) for k, v in batch.items()})
    full_positions = np.asarray(model.positions({k: jnp.asarray(v) for k, v in batch.items()}))
    blocks = image_blocks(batch["tokens"][0, :length], IMAGE_ID)
    assert len(blocks) == 3 and blocks[-1][1] < length - 2
    image_keys = ("patches", "patch_yx", "patch_valid", "image_grid", "image_valid")

    num_pages = 20
    table = jnp.asarray(np.random.default_rng(1).permutation(num_pages)[None, :PAGES_PER_ROW * 3], jnp.int32)
    cache = paged_cache(_backbone_stacks(spec.backbone), spec.backbone, num_pages, PAGE)

    @nnx.jit
    def extend(model, cache, chunk, index, lengths, offsets):
        pages = CachePages(table, lengths, index, chunk["valid"])
        out = model.extend_cached(chunk, offsets, cache, pages)
        return out["logits"], out["positions"], out["cache"], out["offsets"]

    first = blocks[0][1] + 2  # the prompt: text, the first image, two more tokens
    second = blocks[-1][1] + 1  # the extend: up to just after the last image
    spans = [(0, first, slice(0, 1)), (first, second, slice(1, 3))] + [(s, s + 1, None) for s in range(second, length)]
    offsets = jnp.zeros((1,), jnp.int32)
    logits, positions = [], []
    for start, end, images in spans:
        chunk = {"tokens": jnp.asarray(batch["tokens"][:, start:end]), "valid": jnp.ones((1, end - start), bool)}
        if images is not None:
            chunk.update({k: jnp.asarray(batch[k][images]) for k in image_keys})
        out, pos, cache, offsets = extend(model, cache, chunk, jnp.arange(start, end, dtype=jnp.int32)[None],
                                          jnp.asarray([end], jnp.int32), offsets)
        logits.append(np.asarray(out)[0])
        positions.append(np.asarray(pos)[0])
    np.testing.assert_array_equal(np.concatenate(positions), full_positions[0, :length])
    np.testing.assert_allclose(np.concatenate(logits), np.asarray(full["logits"])[0, :length], rtol=1e-5, atol=1e-5)
