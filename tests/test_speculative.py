"""MTP speculative decoding: the acceptance rule emits tokens distributed as the target (chi-squared),
greedy speculation gives exactly the tokens of plain decoding (text and images, all three MMTP modes,
groups and stops), after rollbacks the main cache equals plain decoding's on the valid prefix, logp_raw is
the trainer's log-softmax, and after warm-up speculation compiles nothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Request, Sampling
from glm5v_jax.generate.speculative import accept_drafts
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.tools.compiles import count_compiles
from helpers import small_spec
from test_engine import _image_prompt, _naive_greedy

PROMPTS = [[5, 17, 33, 8, 91, 12, 40], [7, 64, 3], [9] * 11]


def _expected(logp, rows: int) -> np.ndarray:
    probs = np.exp(np.asarray(logp, np.float64))
    return probs / probs.sum() * rows


def test_accepted_and_resampled_tokens_are_distributed_as_the_target():
    """k = 2 drafts from q over 6 tokens; the first emitted token follows p[0], and the second (there when
    the first draft was accepted) p[1] (which here does not depend on the first token)."""
    rng = np.random.default_rng(0)
    rows, vocab, k = 40000, 6, 2
    p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(k + 1, vocab)) * 1.5, jnp.float32))
    q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(k, vocab)) * 1.5, jnp.float32))
    keys = jax.random.split(jax.random.key(1), (2, rows))
    drafts = jnp.stack([jax.random.categorical(jax.random.key(10 + j), q[j], shape=(rows,)) for j in range(k)],
                       axis=1)
    tokens, ok = accept_drafts(jnp.broadcast_to(p, (rows, k + 1, vocab)), jnp.broadcast_to(q, (rows, k, vocab)),
                               drafts.astype(jnp.int32), jnp.zeros((rows,), bool), keys[0], keys[1])
    assert 0 < float(ok[:, 0].mean()) < 1  # some drafts rejected, some accepted
    for j, there in ((0, np.ones(rows, bool)), (1, np.asarray(ok[:, 0]))):
        counts = np.bincount(np.asarray(tokens[:, j])[there], minlength=vocab)
        assert stats.chisquare(counts, _expected(p[j], int(there.sum()))).pvalue > 1e-3
    # without the residual (a rejected draft resampled from p itself) the test fails: the check can fail
    wrong = jnp.where(ok[:, 0], drafts[:, 0], jax.random.categorical(jax.random.key(20), p[0], shape=(rows,)))
    counts = np.bincount(np.asarray(wrong), minlength=vocab)
    assert stats.chisquare(counts, _expected(p[0], rows)).pvalue < 1e-6


def test_greedy_accepts_the_targets_argmax_only():
    p = jnp.log(jnp.asarray([[[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]))
    q = jnp.log(jnp.full((1, 2, 3), 1 / 3))
    key = jax.random.split(jax.random.key(0), 1)
    tokens, ok = accept_drafts(p, q, jnp.asarray([[1, 1]]), jnp.asarray([True]), key, key)
    assert ok.tolist() == [[True, False]] and tokens.tolist() == [[1, 0, 0]]
    tokens, ok = accept_drafts(p, q, jnp.asarray([[1, 0]]), jnp.asarray([True]), key, key)
    assert ok.tolist() == [[True, True]] and tokens.tolist() == [[1, 0, 2]]


def _run(model, requests, **kw):
    engine = Engine(model, max_slots=6, max_seq_len=48, page_size=4, steps=3, **kw)
    for r in requests:
        engine.submit(r)
    done = sorted(engine.run(), key=lambda c: c.id)
    assert engine.pool.free_pages == engine.pool.num_pages
    return done, engine.metrics()


@pytest.mark.parametrize("mode,drafts", [("image_token", (1, 3)), ("visual_embed", (2,)), ("mask", (2,))])
def test_greedy_speculation_gives_plain_decodings_tokens(mode, drafts):
    model = GLM5V(small_spec(mode=mode), rngs=nnx.Rngs(0))
    image_prompt, images = _image_prompt(model)
    plain, _ = _run(model, [Request(p, max_new_tokens=10) for p in PROMPTS])
    stop = plain[1].samples[0].tokens[4]
    requests = [Request(p, max_new_tokens=10) for p in PROMPTS] + [
        Request(image_prompt, images, max_new_tokens=6), Request(PROMPTS[1], n=2, max_new_tokens=10, stop=[stop])]
    want = [c.samples[0].tokens for c in plain] + [_naive_greedy(model, image_prompt, 6, images)[0]]
    for k in drafts:
        done, m = _run(model, requests, speculate=k)
        assert [c.samples[0].tokens for c in done[:4]] == want
        for s in done[4].samples:  # a group, with a stop id: both samples end at it
            assert s.tokens == want[1][:want[1].index(stop) + 1] and s.finish == "stop"
        assert m["spec_rounds"] > 0 and 1 <= m["spec_tau"] <= k + 1


def test_after_rollbacks_the_cache_equals_plain_decodings():
    """A model whose MTP head is the main model's own next-token guess often enough to accept some drafts:
    depth 1 fed the main model's hidden state; whatever it drafts, the main cache on the valid prefix equals
    plain decoding's, and the held sequences have the same length."""
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    caches = []
    for k in (0, 3):
        engine = Engine(model, max_slots=1, max_seq_len=48, page_size=4, steps=2, speculate=k)
        engine.submit(Request(PROMPTS[2], max_new_tokens=14, keep=True))
        (done,) = engine.run()
        seq = engine._jobs[0].seqs[0]
        pages = np.asarray(seq.pages)
        keys = {name: np.asarray(c["k"])[:, :, pages].reshape(c["k"].shape[0], c["k"].shape[1], -1,
                                                                c["k"].shape[-1])[:, :, :seq.length]
                for name, c in engine.cache.items() if not name.startswith("mtp")}
        caches.append((done.samples[0].tokens, seq.length, keys))
        if k:
            assert engine.metrics()["spec_rounds"] < 14  # fewer rounds than tokens: drafts were accepted
    (plain_tokens, plain_len, plain), (spec_tokens, spec_len, spec) = caches
    assert plain_tokens == spec_tokens and plain_len == spec_len
    for name in plain:
        np.testing.assert_allclose(spec[name], plain[name], rtol=1e-5, atol=1e-6)


def test_sampled_speculation_reports_the_trainers_logprobs():
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    done, m = _run(model, [Request(PROMPTS[0], n=3, max_new_tokens=8, sampling=Sampling(1.0, top_k=20, seed=5))],
                   speculate=2)
    from test_engine import _forward
    for s in done[0].samples:
        seq = PROMPTS[0] + s.tokens
        tokens = np.zeros((1, 64), np.int32)
        tokens[0, :len(seq)] = seq
        segments = (np.arange(64) < len(seq)).astype(np.int32)[None]
        logp = jax.nn.log_softmax(_forward(model, {"tokens": jnp.asarray(tokens),
                                                   "segment_ids": jnp.asarray(segments)})[0], axis=-1)
        want = [float(logp[len(PROMPTS[0]) - 1 + i, t]) for i, t in enumerate(s.tokens)]
        np.testing.assert_allclose(s.logp_raw, want, rtol=1e-5, atol=1e-5)
        assert all(b <= 1e-6 and b >= a - 1e-5 for a, b in zip(s.logp_raw, s.logp_sampled))
    assert len({tuple(s.tokens) for s in done[0].samples}) > 1


def test_after_warmup_speculation_compiles_nothing():
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    # 14 shapes: 4 prompt chunks (8 and 16 tokens, 0 or 1 image), sampling, page forks and 8 decodes (page-table
    # widths 1, 2, 4 and 5 -- a verify writes k = 2 past max_seq_len's 4 pages -- for 2 and 4 rows); the longer
    # requests end at the capacity, a path too. test_engine's warm-up test has more widths and row buckets.
    engine = Engine(model, max_slots=4, max_seq_len=32, page_size=8, prefill_rows=2, max_chunk=16, min_chunk=8,
                    steps=2, speculate=2, decode_row_buckets=2)
    assert engine.warmup(max_images=1) == 14
    rng = np.random.default_rng(0)
    image_prompt, images = _image_prompt(model)
    with count_compiles() as compiles:
        for i in range(24):
            if i % 6 == 2:
                engine.submit(Request(image_prompt, images, max_new_tokens=4))
            else:
                engine.submit(Request(rng.integers(5, 120, size=int(rng.integers(1, 30))).tolist(),
                                      n=int(rng.integers(1, 3)), max_new_tokens=int(rng.integers(1, 10)),
                                      sampling=Sampling(float(rng.choice([0.0, 1.0])), seed=i)))
        engine.run()
    assert compiles == [] and engine.metrics()["completed"] == 24
