"""Offline generation over the paged cache: greedy output equals a naive loop of full forwards, logp_raw
equals the trainer's log-softmax of the same tokens, stops and limits end rows independently, and a
change of sampling parameters compiles nothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.generate import decode as decode_lib
from glm5v_jax.generate.offline import generate
from glm5v_jax.models.vlm import GLM5V
from helpers import small_spec

PROMPTS = [[5, 17, 33, 8, 91, 12, 40], [7, 64, 3]]


@pytest.fixture(scope="module")
def model():
    return GLM5V(small_spec(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, segment_ids):
    return model({"tokens": tokens, "segment_ids": segment_ids})["logits"]


def _naive_greedy(model, prompt, n, width=16):
    """Full forward of the growing sequence (padded to `width`: causal, so the padding after it changes
    nothing), argmax at its end, n times: (tokens, their log-softmax)."""
    seq, out, logps = list(prompt), [], []
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        segments = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = _forward(model, jnp.asarray(tokens), jnp.asarray(segments))[0, len(seq) - 1]
        t = int(jnp.argmax(logits.at[model.spec.image_token_id].set(-jnp.inf)))  # never the <|image|> id
        out.append(t)
        logps.append(float(jax.nn.log_softmax(logits)[t]))
        seq.append(t)
    return out, logps


def test_greedy_equals_full_forwards_and_logp_raw_is_the_trainers(model):
    got = generate(model, PROMPTS, max_new_tokens=6, page_size=4)
    for r, prompt in enumerate(PROMPTS):
        want, logps = _naive_greedy(model, prompt, 6)
        assert got.count[r] == 6 and got.finish[r] == "length"
        assert got.tokens[r].tolist() == want
        np.testing.assert_allclose(got.logp_raw[r], logps, rtol=1e-5, atol=1e-5)
        assert not got.logp_sampled[r].any()  # greedy: sampled with probability 1


def test_rows_stop_on_their_own(model):
    """Sampled (seeded: reproducible), so that a row's tokens differ: a stop id ends that row only."""
    first = generate(model, PROMPTS, max_new_tokens=6, page_size=4, temperature=1.0, seed=3)
    row = first.tokens[0].tolist()
    j = next(j for j in range(1, 6) if row[j] not in row[:j])  # a token that first appears at j
    got = generate(model, PROMPTS, max_new_tokens=6, page_size=4, temperature=1.0, seed=3, stop_ids=[row[j]])
    assert got.finish[0] == "stop" and got.count[0] == j + 1 and got.tokens[0, :j + 1].tolist() == row[:j + 1]
    assert not got.tokens[0, j + 1:].any()
    stop = row[j]
    if stop not in first.tokens[1].tolist():
        assert got.tokens[1].tolist() == first.tokens[1].tolist() and got.finish[1] == "length"
    # capacity 10: row 0 (7 prompt tokens) has room for 3 new ones
    short = generate(model, PROMPTS, max_new_tokens=6, page_size=4, temperature=1.0, seed=3, capacity=10)
    assert short.count.tolist() == [3, 6] and short.finish == ["capacity", "length"]
    assert short.tokens[0, :3].tolist() == first.tokens[0, :3].tolist()


def test_sampling_parameter_changes_compile_nothing(model):
    generate(model, PROMPTS, max_new_tokens=4, page_size=4, temperature=1.0, seed=1)
    sizes = (decode_lib.extend._cache_size(), decode_lib.decode_steps._cache_size())
    a = generate(model, PROMPTS, max_new_tokens=4, page_size=4, temperature=0.7, top_k=5, top_p=0.9, seed=2)
    b = generate(model, PROMPTS, max_new_tokens=4, page_size=4, temperature=0.7, top_k=5, top_p=0.9, seed=2)
    assert (decode_lib.extend._cache_size(), decode_lib.decode_steps._cache_size()) == sizes
    assert a.tokens.tolist() == b.tokens.tolist()  # seeded: reproducible
    assert (a.logp_sampled[:, :4] <= 0).all() and (a.logp_sampled >= a.logp_raw - 1e-6).all()


def test_a_group_prefills_once_and_forks_equal_independent_samples(model, monkeypatch):
    """n=4 samples of a prompt: one prefill row per prompt, forks sharing its pages (the last partial
    page copied): the same tokens and logprobs as four independent copies of the prompt."""
    rows = []
    real = decode_lib.extend

    def counting(graphdef, state, cache, chunk, *args):
        rows.append(int(chunk["tokens"].shape[0]))
        return real(graphdef, state, cache, chunk, *args)

    monkeypatch.setattr(decode_lib, "extend", counting)
    kw = dict(max_new_tokens=5, page_size=4, temperature=1.0, seed=10)  # prompt 0: 7 tokens, a partial page
    group = generate(model, PROMPTS, n=4, **kw)
    assert rows == [2]  # one prefill of the two prompts, not eight
    copies = generate(model, [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4, **kw)
    np.testing.assert_array_equal(group.tokens, copies.tokens)
    np.testing.assert_allclose(group.logp_raw, copies.logp_raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group.logp_sampled, copies.logp_sampled, rtol=1e-5, atol=1e-6)
    assert len({tuple(t) for t in group.tokens[:4].tolist()}) > 1  # the samples differ


def test_a_model_sharded_over_eight_devices_generates_the_same(model):
    """The model's parameters FSDP- and tensor-sharded over 8 fake CPU devices (the trainer's rules):
    greedy tokens equal one device's, logprobs within f32 reassociation."""
    from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
    from glm5v_jax.sharding.partition import create_sharded
    from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules, parameter_shardings

    mesh = make_mesh(MeshSpec(shape=(1, 4, 2, 1)), jax.devices()[:8])
    rules = check_rules(DEFAULT_RULES, mesh.axis_names)

    def make():
        return GLM5V(small_spec(), rngs=nnx.Rngs(0))

    graphdef, state, _ = create_sharded(make, mesh, parameter_shardings(nnx.eval_shape(make), mesh, rules))
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))
    sharded = nnx.merge(graphdef, state)
    one, eight = (generate(m, PROMPTS, max_new_tokens=5, page_size=4) for m in (model, sharded))
    np.testing.assert_array_equal(one.tokens, eight.tokens)
    np.testing.assert_allclose(one.logp_raw, eight.logp_raw, rtol=1e-5, atol=1e-5)
