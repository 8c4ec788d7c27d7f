"""The MTP depths over their paged caches (generation): with the main model extended chunk by chunk
(a prompt, an extend, one-token steps) and each depth k fed the entries whose token t_{i+k} is known
(the MTP stream lags the main one by k), every in-stream entry's logits equal the full forward's
`mtp_logits` (f32, 1e-5), for text rows of different lengths and for a conversation with images (two
appended in a later chunk), in all three MMTP modes, at depths 1 and 2; `mask` mode's compacted cache
holds exactly the training forward's stream. A wrong next token is caught."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.layers.attention import CachePages
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.generate.requests import IMAGE_KEYS
from helpers import IMAGE_ID, image_blocks, one_sequence_batch, paged_cache, small_spec

PAGE = 4


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _main_step(graphdef, state, cache, chunk, table, index, lengths, offsets):
    model = nnx.merge(graphdef, state)
    out = model.extend_cached(chunk, offsets, cache, CachePages(table, lengths, index, chunk["valid"]))
    return out["h"], out["positions"], out["embeds"], out["cache"], out["offsets"]


def _mtp_step_fn():
    """A fresh jitted MTP step per run, so its compile count is that run's."""

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
    def step(graphdef, depth_index, state, cache, table, stream_lengths, h_prev, tokens, next_tokens, next_merged,
             positions, known):
        model = nnx.merge(graphdef, state)
        in_stream = model.mtp_in_stream(tokens, next_tokens, known)
        next_embeds = model.mtp_stream_embeds(next_tokens, next_merged)
        out = model.extend_mtp_cached(depth_index, h_prev, next_embeds, positions, in_stream, cache, table,
                                      stream_lengths)
        return out["logits"], out["h"], out["cache"], out["stream_lengths"], in_stream

    return step


def _wrong(tokens: np.ndarray) -> np.ndarray:
    """Another text token for every text token (>= 5); image tokens unchanged."""
    return np.where(tokens >= 5, 5 + (tokens - 4) % (128 - 5), tokens)


def _generate(model: GLM5V, tokens: np.ndarray, lengths: np.ndarray, spans, table, num_pages: int, *,
              images: dict | None = None, wrong_next: bool = False):
    """Teacher-forced generation, as an engine would run it. `spans`: main chunks (start, n, bucket, image
    slice or None). After each chunk the next token is known (sampled) unless it is an image token (its
    features come with the next chunk); then each depth k takes the positions i whose h^{k-1}_i and t_{i+k}
    are known and that it has not taken yet. Returns per depth (logits `[B, T, V]`, in-stream `[B, T]`)."""
    graphdef, state = nnx.split(model)
    step = _mtp_step_fn()
    b, total = tokens.shape
    depths, hidden, vocab = len(model.mtp.depths), model.spec.backbone.embed_dim, model.spec.backbone.vocab_size
    cache = paged_cache(model.cache_stacks(), model.spec.backbone, num_pages, PAGE)
    hs = np.zeros((depths + 1, b, total, hidden), np.float32)  # h^0 (the main h) .. h^D per position
    merged = np.zeros((b, total, hidden), np.float32)  # the backbone's input embeddings
    positions = np.zeros((b, total, 3), np.int32)
    done = np.zeros((depths + 1, b), np.int64)  # [0]: tokens in the main cache; [k]: depth-k entries taken
    stream_lengths = [jnp.zeros((b,), jnp.int32) for _ in range(depths)]
    logits = np.zeros((depths, b, total, vocab), np.float32)
    in_stream = np.zeros((depths, b, total), bool)
    offsets, shapes, rows = jnp.zeros((b,), jnp.int32), set(), np.arange(b)[:, None]
    for start, n, bucket, image_slice in spans:
        idx = start + np.arange(bucket)[None].repeat(b, 0)
        valid = (np.arange(bucket)[None] < n) & (idx < lengths[:, None])
        chunk = {"tokens": jnp.asarray(np.where(valid, np.take_along_axis(tokens, np.minimum(idx, total - 1), 1), 0)),
                 "valid": jnp.asarray(valid)}
        if image_slice is not None:
            chunk.update({k: jnp.asarray(images[k][image_slice]) for k in IMAGE_KEYS})
        end = np.minimum(lengths, start + n)
        h, pos, emb, cache, offsets = _main_step(graphdef, state, cache, chunk, table, jnp.asarray(idx, jnp.int32),
                                                 jnp.asarray(end, jnp.int32), offsets)
        r_, s_ = np.nonzero(valid)
        hs[0][r_, idx[r_, s_]] = np.asarray(h)[r_, s_]
        positions[r_, idx[r_, s_]] = np.asarray(pos)[r_, s_]
        merged[r_, idx[r_, s_]] = np.asarray(emb)[r_, s_]
        done[0] = end
        known = end.copy()  # tokens known: those in the main cache, and the sampled next one unless an image
        for r in range(b):
            if end[r] < lengths[r] and tokens[r, end[r]] != IMAGE_ID:
                merged[r, end[r]] = np.asarray(model.backbone.embed_tokens(jnp.asarray(tokens[r:r + 1, end[r]])))[0]
                known[r] += 1
        for k in range(1, depths + 1):
            hi = np.maximum(np.minimum(known - k, done[k - 1]), done[k])
            count = hi - done[k]
            if count.max() <= 0:
                continue
            size = 1 << (int(count.max()) - 1).bit_length()
            at = done[k][:, None] + np.arange(size)[None]
            real = np.arange(size)[None] < count[:, None]
            here, nxt = np.minimum(at, total - 1), np.minimum(at + k, total - 1)
            next_tokens = tokens[rows, nxt]
            if wrong_next:
                next_tokens = _wrong(next_tokens)
            out, h_k, cache, stream_lengths[k - 1], ins = step(
                graphdef, k - 1, state, cache, table, stream_lengths[k - 1], jnp.asarray(hs[k - 1][rows, here]),
                jnp.asarray(tokens[rows, here]), jnp.asarray(next_tokens), jnp.asarray(merged[rows, nxt]),
                jnp.asarray(positions[rows, here]), jnp.asarray(real))
            r_, s_ = np.nonzero(real)
            hs[k][r_, at[r_, s_]] = np.asarray(h_k)[r_, s_]
            logits[k - 1][r_, at[r_, s_]] = np.asarray(out)[r_, s_]
            in_stream[k - 1][r_, at[r_, s_]] = np.asarray(ins)[r_, s_]
            done[k] = hi
            shapes.add((k, size))
    assert step._cache_size() == len(shapes)  # one compile per (depth, bucket): the data never recompiles
    for k in range(depths):  # the compacted caches hold exactly the in-stream entries
        np.testing.assert_array_equal(np.asarray(stream_lengths[k]), in_stream[k].sum(axis=1))
    return logits, in_stream


def _check(full, logits, in_stream, lengths, *, atol=1e-5):
    """Every depth's stream is the training forward's, and its logits equal it there."""
    for k in range(logits.shape[0]):
        segments = np.asarray(full["mtp_segments"][k]) != 0
        for r, n in enumerate(lengths):
            np.testing.assert_array_equal(in_stream[k, r, :n], segments[r, :n])
            assert not segments[r, n:].any()
        assert in_stream[k].any()
        np.testing.assert_allclose(logits[k][in_stream[k]], np.asarray(full["mtp_logits"][k])[segments], rtol=1e-5,
                                   atol=atol)


def _text_case(depths: int, mode: str = "image_token"):
    model = GLM5V(small_spec(mode=mode, depths=depths), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.array([19, 11])  # two rows of different lengths
    b, total = len(lengths), int(lengths.max())
    tokens = rng.integers(5, model.spec.backbone.vocab_size, size=(b, total)).astype(np.int32)
    segments = (np.arange(total)[None] < lengths[:, None]).astype(np.int32)
    full = model({"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)})
    per_row = 6
    num_pages = b * per_row + 2
    table = jnp.asarray(rng.permutation(num_pages)[:b * per_row].reshape(b, per_row), jnp.int32)
    # a prompt chunk, an extend in a bucket of 6 (one padded slot), then one-token steps
    spans = [(0, 7, 7, None), (7, 5, 6, None)] + [(s, 1, 1, None) for s in range(12, total)]
    return model, tokens, lengths, spans, table, num_pages, full


@pytest.mark.parametrize("depths", [1, 2])
def test_text_rows_chunked_then_decoded_equal_the_full_forward(depths):
    model, tokens, lengths, spans, table, num_pages, full = _text_case(depths)
    logits, in_stream = _generate(model, tokens, lengths, spans, table, num_pages)
    _check(full, logits, in_stream, lengths)
    for k in range(depths):  # text: every position whose token i+k+1 exists is in the stream
        assert in_stream[k].sum() == sum(max(int(n) - k - 1, 0) for n in lengths)


def test_a_wrong_next_token_is_caught():
    model, tokens, lengths, spans, table, num_pages, full = _text_case(1)
    logits, in_stream = _generate(model, tokens, lengths, spans, table, num_pages, wrong_next=True)
    with pytest.raises(AssertionError):
        _check(full, logits, in_stream, lengths)


@pytest.mark.parametrize("mode", ["visual_embed", "mask", "image_token"])
def test_vlm_with_images_appended_later_equals_the_full_forward(mode):
    """A prompt ending just before the second image (the depths wait for its features), an extend that
    appends the second and third images, then one-token steps; depths 1 and 2."""
    model = GLM5V(small_spec(mode=mode, depths=2), rngs=nnx.Rngs(0))
    batch, length = one_sequence_batch()
    full = model({k: jnp.asarray(v) for k, v in batch.items()})
    blocks = image_blocks(batch["tokens"][0, :length])
    assert len(blocks) == 3 and blocks[-1][1] < length - 2
    first, second = blocks[1][0], blocks[-1][1] + 1
    spans = [(0, first, first, slice(0, 1)), (first, second - first, second - first, slice(1, 3))]
    spans += [(s, 1, 1, None) for s in range(second, length)]
    num_pages = 20
    table = jnp.asarray(np.random.default_rng(1).permutation(num_pages)[None, :18], jnp.int32)
    logits, in_stream = _generate(model, batch["tokens"][:, :length], np.array([length]), spans, table, num_pages,
                                  images=batch)
    _check(full, logits, in_stream, [length])
    visual = batch["tokens"][0, :length] == IMAGE_ID
    if mode == "mask":  # visual positions, and those whose token i+k is visual, left the stream
        assert not (in_stream[:, 0] & visual).any()
        assert in_stream[1, 0].sum() < length - 2
    else:
        assert in_stream[1, 0, :length - 2].all()
