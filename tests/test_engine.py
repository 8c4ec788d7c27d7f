"""The continuous-batching engine: more requests than slots (slots refilled as rows finish) give the tokens
of a naive loop of full forwards, with images too; requests wait for pages instead of failing; abort
returns every partial; new weights stamp later tokens and compile nothing; a held conversation continues
with an image appended mid-conversation; bad input gets a clear error without disturbing other requests;
after warm-up, 200 mixed requests compile nothing; on 8 fake devices the engine gives one device's output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import IMAGE_KEYS, Request, Sampling
from glm5v_jax.generate.chat import image_inputs
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.tools.compiles import count_compiles
from helpers import small_spec

WIDTH = 64  # the naive loop's padded sequence length


@pytest.fixture(scope="module")
def model():
    return GLM5V(small_spec(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, batch):
    return model(batch)["logits"]


def _image(seed: int, height: int, width: int, spec) -> tuple[dict, int]:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return image_inputs(pixels, spec)


def _join(*images: dict | None) -> dict | None:
    images = [im for im in images if im is not None]
    return {k: np.concatenate([im[k] for im in images]) for k in IMAGE_KEYS} if images else None


def _naive_greedy(model, prompt, n, images=None):
    """Argmax at the end of a full forward of the growing sequence, n times: (tokens, log-softmax)."""
    seq, out, logps = list(prompt), [], []
    extra = {k: jnp.asarray(v) for k, v in (images or {}).items()}
    for _ in range(n):
        tokens = np.zeros((1, WIDTH), np.int32)
        tokens[0, :len(seq)] = seq
        segments = (np.arange(WIDTH) < len(seq)).astype(np.int32)[None]
        logits = _forward(model, {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments), **extra})
        logits = logits[0, len(seq) - 1]
        t = int(jnp.argmax(logits.at[model.spec.image_token_id].set(-jnp.inf)))  # never the <|image|> id
        out.append(t)
        logps.append(float(jax.nn.log_softmax(logits)[t]))
        seq.append(t)
    return out, logps


def _image_prompt(model, seed=0, size=(24, 40), before=(5, 9), after=(12, 40, 7)):
    images, k = _image(seed, *size, model.spec)
    return [*before, *([model.spec.image_token_id] * k), *after], images


def test_more_requests_than_slots_give_the_full_forwards_tokens(model):
    prompts = [[5, 17, 33, 8, 91, 12, 40], [7, 64, 3], [9] * 11, [8, 8, 21], [30, 31, 32, 33, 34]]
    budgets = [6, 3, 9, 2, 5]
    image_prompt, images = _image_prompt(model)
    engine = Engine(model, max_slots=2, max_seq_len=48, page_size=4, prefill_rows=2, max_chunk=16, steps=3)
    done = {}
    def on_done(c):
        done[c.id] = c

    ids = [engine.submit(Request(p, max_new_tokens=m, on_done=on_done)) for p, m in zip(prompts, budgets)]
    ids.append(engine.submit(Request(image_prompt, images, max_new_tokens=4, on_done=on_done)))
    returned = engine.run()
    assert sorted(c.id for c in returned) == sorted(ids) == sorted(done)
    for rid, p, m in zip(ids, prompts + [image_prompt], budgets + [4]):
        want, logps = _naive_greedy(model, p, m, images if p is image_prompt else None)
        sample = done[rid].samples[0]
        assert sample.tokens == want and sample.finish == "length" and sample.remaining == 0
        np.testing.assert_allclose(sample.logp_raw, logps, rtol=1e-5, atol=1e-5)
    m = engine.metrics()
    assert m["completed"] == 6 and m["images_encoded"] == 1 and m["free_pages"] == m["num_pages"]
    assert m["admission_waits"] > 0  # six requests, two slots: the rest waited their turn
    assert 0 < m["useful_slot_fraction"] <= 1


def test_requests_wait_for_pages_instead_of_failing(model):
    """Pages for one request at a time: the others queue (never OutOfPages), in order, and finish."""
    engine = Engine(model, max_slots=4, max_seq_len=16, page_size=4, num_pages=4, max_chunk=16, steps=2)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14]]
    ids = [engine.submit(Request(p, max_new_tokens=8)) for p in prompts]  # each needs 3 or 4 pages
    engine.step()
    assert engine.metrics()["queued"] == 2 and engine.metrics()["running_slots"] == 1
    done = {c.id: c for c in engine.run()}
    for rid, p in zip(ids, prompts):
        assert done[rid].samples[0].tokens == _naive_greedy(model, p, 8)[0]
    assert engine.pool.free_pages == 4


def test_abort_returns_every_partial_and_frees_its_pages(model):
    engine = Engine(model, max_slots=2, max_seq_len=32, page_size=4, steps=2)
    running = engine.submit(Request([5, 17, 33], n=2, max_new_tokens=12, sampling=Sampling(1.0, seed=4)))
    queued = engine.submit(Request([7, 64, 3], max_new_tokens=5))  # no slot free until the group ends
    survivor_budget = 3
    engine.step()  # the group's first tokens and two decode steps
    aborted = {c.id: c for c in engine.abort([running, queued])}
    group, waiting = aborted[running], aborted[queued]
    assert group.finish == ["abort", "abort"] and waiting.finish == ["abort"]
    for s in group.samples:
        assert len(s.tokens) == 3 and s.remaining == 12 - 3 and len(s.logp_raw) == len(s.logp_sampled) == 3
    assert waiting.samples[0].tokens == [] and waiting.samples[0].remaining == 5
    assert engine.pool.free_pages == engine.pool.num_pages and engine.idle
    # the partials are the prefix of what the request would have produced
    full = Engine(model, max_slots=2, max_seq_len=32, page_size=4, steps=2)
    full.submit(Request([5, 17, 33], n=2, max_new_tokens=12, sampling=Sampling(1.0, seed=4)))
    (whole,) = full.run()
    for part, s in zip(group.samples, whole.samples):
        assert s.tokens[:3] == part.tokens
    assert engine.abort([running]) == []  # already over: nothing more
    with pytest.raises(KeyError, match="unknown request id 99"):
        engine.abort([99])
    rid = engine.submit(Request([6, 5], max_new_tokens=survivor_budget))
    assert engine.run()[0].id == rid


def test_new_weights_stamp_later_tokens_and_compile_nothing(model):
    other = GLM5V(small_spec(), rngs=nnx.Rngs(1))
    engine = Engine(model, max_slots=1, max_seq_len=32, page_size=4, steps=2)
    engine.warmup()
    engine.submit(Request([5, 17, 33], max_new_tokens=7))
    engine.step()  # first token + 2 decode steps under version 0
    sizes = [f._cache_size() for f in _jitted()]
    engine.update_weights(other, version=1)
    (done,) = engine.run()
    assert [f._cache_size() for f in _jitted()] == sizes
    s = done.samples[0]
    assert s.versions == [0, 0, 0, 1, 1, 1, 1]
    # the cache keeps the old weights' keys and values; the steps after the update use the new weights
    assert s.tokens[:3] == _naive_greedy(model, [5, 17, 33], 3)[0]
    assert s.tokens != _naive_greedy(model, [5, 17, 33], 7)[0]
    engine.submit(Request([5, 17, 33], max_new_tokens=7))  # a request after the update: the new model's
    (after,) = engine.run()
    assert after.samples[0].tokens == _naive_greedy(other, [5, 17, 33], 7)[0]
    assert after.samples[0].versions == [1] * 7
    with pytest.raises(ValueError, match="structure, shape or dtype"):
        engine.update_weights(GLM5V(small_spec(depths=2), rngs=nnx.Rngs(0)), version=2)


def _jitted():
    from glm5v_jax.generate import decode
    return decode.extend, decode.decode_steps, decode.sample_rows


def test_a_held_conversation_continues_with_an_image_appended(model):
    """Turn 1 (text), then an extend with an image block and more text: the second turn's tokens are the
    full forward's greedy continuation of the whole conversation (M-RoPE positions continued)."""
    engine = Engine(model, max_slots=1, max_seq_len=64, page_size=4, max_chunk=16)
    first = [5, 17, 33, 8]
    rid = engine.submit(Request(first, max_new_tokens=3, keep=True))
    (turn1,) = engine.run()
    assert turn1.samples[0].tokens == _naive_greedy(model, first, 3)[0]
    assert engine.metrics()["held"] == 1
    appended, images = _image_prompt(model, seed=2, size=(40, 24), before=(6,), after=(9, 10))
    engine.extend(rid, appended, images, max_new_tokens=4)
    (turn2,) = engine.run()
    conversation = first + turn1.samples[0].tokens + appended
    assert turn2.samples[0].tokens[3:] == _naive_greedy(model, conversation, 4, images)[0]
    engine.release(rid)
    assert engine.pool.free_pages == engine.pool.num_pages
    with pytest.raises(ValueError, match="done"):
        engine.extend(rid, [5])


def test_bad_input_gets_a_clear_error_and_leaves_other_requests_alone(model):
    engine = Engine(model, max_slots=2, max_seq_len=16, page_size=4)
    ok = engine.submit(Request([5, 6, 7], max_new_tokens=4))
    image_prompt, images = _image_prompt(model)
    with pytest.raises(ValueError, match="no room to generate in max_seq_len=16"):
        engine.submit(Request(list(range(5, 21))))
    with pytest.raises(ValueError, match="1 <\\|image\\|> blocks but no images"):
        engine.submit(Request(image_prompt[:12]))
    with pytest.raises(ValueError, match="2 images for 1"):
        engine.submit(Request(image_prompt, _join(images, images)))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.submit(Request([5, 1000]))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([5], sampling=Sampling(1.0, top_p=0.0)))
    with pytest.raises(ValueError, match="keep=True needs n=1"):
        engine.submit(Request([5], n=2, keep=True))
    with pytest.raises(KeyError, match="unknown request id 7"):
        engine.extend(7, [5])
    with pytest.raises(ValueError, match="cannot be used"):
        image_inputs(b"not an image", model.spec)
    (done,) = engine.run()
    assert done.id == ok and done.samples[0].tokens == _naive_greedy(model, [5, 6, 7], 4)[0]


def test_after_warmup_two_hundred_mixed_requests_compile_nothing(model):
    engine = Engine(model, max_slots=8, max_seq_len=96, page_size=16, prefill_rows=4, max_chunk=32, min_chunk=8,
                    steps=4, decode_row_buckets=2)
    engine.warmup(max_images=2)
    with count_compiles() as probe:  # the counter sees compiles
        jax.jit(lambda x: x * 3 + 1)(np.ones(5, np.float32))
    assert len(probe) == 1
    rng = np.random.default_rng(0)
    image_prompt, images = _image_prompt(model)
    with count_compiles() as compiles:
        for i in range(200):
            if i % 10 == 3:
                request = Request(image_prompt, images, max_new_tokens=int(rng.integers(1, 6)))
            else:
                prompt = rng.integers(5, 120, size=int(rng.integers(1, 70))).tolist()  # up to three chunks
                request = Request(prompt, n=int(rng.integers(1, 3)), max_new_tokens=int(rng.integers(1, 12)),
                                  stop=rng.integers(1, 120, size=int(rng.integers(0, 3))).tolist(),
                                  sampling=Sampling(float(rng.choice([0.0, 0.7, 1.3])), int(rng.integers(0, 9)),
                                                    float(rng.uniform(0.5, 1.0)), seed=i))
            engine.submit(request)
            if i % 7 == 0:
                engine.step()
        done = engine.run()
    m = engine.metrics()
    assert m["completed"] == 200 and len(done) > 0
    assert compiles == [], f"{len(compiles)} compiles after warm-up"
    assert engine.pool.free_pages == engine.pool.num_pages


def test_the_engine_on_eight_devices_gives_one_devices_tokens(model):
    """The model sharded as the trainer shards it; the engine's cache with KV heads over `tensor`, its
    slots over the batch axes: the tokens of one device, and the same requests again compile nothing (the
    warm-up of every bucket is tested on one device; on eight it would cost a minute of CI)."""
    from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
    from glm5v_jax.sharding.partition import create_sharded
    from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules, parameter_shardings

    mesh = make_mesh(MeshSpec(shape=(1, 4, 2, 1)), jax.devices()[:8])
    rules = check_rules(DEFAULT_RULES, mesh.axis_names)

    def make():
        return GLM5V(small_spec(), rngs=nnx.Rngs(0))

    graphdef, state, _ = create_sharded(make, mesh, parameter_shardings(nnx.eval_shape(make), mesh, rules))
    image_prompt, images = _image_prompt(model)
    outs = []
    for m, kw in ((model, {}), (nnx.merge(graphdef, state), {"mesh": mesh})):
        engine = Engine(m, max_slots=4, max_seq_len=48, page_size=4, prefill_rows=4, max_chunk=32, steps=3, **kw)
        if kw:
            k = engine.cache["dense_layers"]["k"]
            assert k.sharding.spec[1] == "tensor" and len(k.sharding.device_set) == 8
            rows = engine._rows(np.zeros((4, 3), np.int32))
            assert rows.sharding.spec[0] == ("data", "fsdp")  # slots split over the batch axes

        def run():
            engine.submit(Request([5, 17, 33, 8, 91], n=2, max_new_tokens=5, sampling=Sampling(1.0, seed=3)))
            engine.submit(Request(image_prompt, images, max_new_tokens=4))
            return sorted(engine.run(), key=lambda c: c.id)

        outs.append(run())
        if kw:
            with count_compiles() as compiles:
                again = run()
            assert compiles == []
            assert [s.tokens for c in again for s in c.samples] == [s.tokens for c in outs[-1] for s in c.samples]
    for one, eight in zip(*outs):
        for a, b in zip(one.samples, eight.samples):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logp_raw, b.logp_raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speculate", [0, 2])
def test_recorded_routing_is_the_routing_of_the_whole_sequence(model, speculate):
    """Engine(record_routing=True): every fed token's routed experts (prompt chunks, decode steps or verify
    steps) equal those of one extend of the whole sequence over a fresh cache."""
    from glm5v_jax.generate import decode
    from glm5v_jax.generate.kv_cache import StackCache

    image_prompt, images = _image_prompt(model)
    engine = Engine(model, max_slots=2, max_seq_len=48, page_size=4, max_chunk=8, steps=3, speculate=speculate,
                    record_routing=True)
    engine.submit(Request(image_prompt, images, max_new_tokens=9))
    (done,) = engine.run()
    s = done.samples[0]
    seq = image_prompt + s.tokens[:-1]
    assert len(s.expert_ids) == len(seq)
    spec = model.spec.backbone
    cache = {name: StackCache(n, spec.num_kv_heads, spec.head_dim).init(16, 4)
             for name, n in model.cache_stacks().items()}
    chunk = {"tokens": jnp.asarray([seq], jnp.int32), "valid": jnp.ones((1, len(seq)), bool),
             **{k: jnp.asarray(v) for k, v in images.items()}}
    graphdef, state = nnx.split(model)
    zero = jnp.zeros((1,), jnp.int32)
    *_, routing = decode.extend(graphdef, state, cache, chunk, jnp.arange(16, dtype=jnp.int32)[None], zero, zero)
    want = np.asarray(routing)[0]  # [S, L_moe, top_k]
    assert want.shape == (len(seq), spec.num_moe_layers, spec.experts_per_token)
    np.testing.assert_array_equal(np.sort(np.stack(s.expert_ids), -1), np.sort(want, -1))


def test_a_draining_batch_decodes_only_the_rows_it_needs(model):
    """With few slots live, decode runs them packed into the smallest row bucket (8 slots: 8, 4 or 2
    rows), so a long request finishing alone is not charged for seven empty slots; tokens unchanged."""
    engine = Engine(model, max_slots=8, max_seq_len=48, page_size=4, steps=4)
    assert engine.decode_rows == [2, 4, 8]
    engine.submit(Request(PROMPTS_LONG, max_new_tokens=12))
    (done,) = engine.run()
    m = engine.metrics()
    assert m["slot_steps"] == 2 * m["decode_steps"] and m["useful_slot_fraction"] == 0.5
    assert done.samples[0].tokens == _naive_greedy(model, PROMPTS_LONG, 12)[0]


PROMPTS_LONG = [5, 17, 33, 8, 91, 12, 40]


def test_admission_lookahead_lets_a_request_that_fits_pass_a_waiting_group(model):
    """FIFO by default: a group needing more free slots than there are holds the queue. With admit_lookahead=1
    the request behind it that fits goes first. Greedy tokens are the same either way."""
    def run(lookahead):
        engine = Engine(model, max_slots=3, max_seq_len=48, page_size=4, steps=2, admit_lookahead=lookahead)
        ids = [engine.submit(Request([5, 17, 33], max_new_tokens=12)),  # holds one slot for a while
               engine.submit(Request([7, 8], n=3, max_new_tokens=3)),  # needs all three slots
               engine.submit(Request([9, 10, 11], max_new_tokens=3))]  # fits beside the first
        done = engine.run()
        assert engine.pool.free_pages == engine.pool.num_pages
        return [c.id for c in done], {c.id: [s.tokens for s in c.samples] for c in done}, ids

    fifo, fifo_tokens, (_, group, single) = run(0)
    ahead, ahead_tokens, _ = run(1)
    assert fifo.index(single) > fifo.index(group) and ahead.index(single) < ahead.index(group)
    assert fifo_tokens == ahead_tokens


def test_a_group_admitted_in_parts_gives_each_sample_its_own_tokens(model):
    """With admit_partial, a group of four that finds two free slots starts two samples now and two later
    (each part prefills the prompt): every sample's sampled tokens are the unsplit run's (each keeps its
    random stream), the request completes once with its four samples in order, and an abort of a group
    split across the queue and the slots returns every partial and frees every page."""
    group = Request([7, 8, 9], n=4, max_new_tokens=6, sampling=Sampling(1.0, seed=11))

    def run(partial):
        engine = Engine(model, max_slots=4, max_seq_len=48, page_size=4, steps=2, admit_partial=partial)
        engine.submit(Request([5, 17, 33], n=2, max_new_tokens=10))  # holds two slots for a while
        rid = engine.submit(group)
        engine.step()
        running = engine.metrics()["running_slots"]
        done = {c.id: c for c in engine.run()}
        assert engine.pool.free_pages == engine.pool.num_pages
        return running, done[rid], engine.metrics()

    whole_running, whole, _ = run(False)
    part_running, parts, m = run(True)
    assert whole_running == 2 and part_running == 4 and m["partial_admissions"] == 1
    assert [s.tokens for s in parts.samples] == [s.tokens for s in whole.samples]
    np.testing.assert_allclose([s.logp_raw for s in parts.samples], [s.logp_raw for s in whole.samples], atol=1e-4)

    engine = Engine(model, max_slots=4, max_seq_len=48, page_size=4, steps=2, admit_partial=True)
    engine.submit(Request([5, 17, 33], n=3, max_new_tokens=10))
    rid = engine.submit(group)
    engine.step()  # one sample of the group runs, three wait
    assert engine.metrics()["running_slots"] == 4 and engine.metrics()["queued"] == 1
    (partial,) = engine.abort([rid])
    assert [s.finish for s in partial.samples] == ["abort"] * 4 and len(partial.samples[0].tokens) >= 1
    assert partial.samples[0].remaining == 6 - len(partial.samples[0].tokens) and not partial.samples[3].tokens
    assert engine.metrics()["queued"] == 0
    engine.run()
    assert engine.pool.free_pages == engine.pool.num_pages
