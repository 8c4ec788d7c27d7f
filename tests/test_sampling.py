"""Sampling: logp_raw is the trainer's log-softmax, sampled frequencies follow the renormalised
top-k/top-p/temperature distribution (chi-squared), greedy is argmax, a request's tokens do not
depend on its batch, and changing the parameters compiles nothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from glm5v_jax.generate.sampling import sample, sampling_params

LOGITS = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)


def _expected(logits, temperature, top_k, top_p) -> np.ndarray:
    """The renormalised distribution, computed independently in numpy (float64)."""
    order = np.argsort(-logits, kind="stable")
    z = logits[order].astype(np.float64) / temperature
    keep = np.arange(len(z)) < (top_k or len(z))
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    before = np.cumsum(p) - p
    keep &= (before < top_p) | (np.arange(len(z)) == 0)
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    out = np.zeros(len(z))
    out[order] = q / q.sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.5, 3, 1.0), (0.5, 0, 0.8)])
def test_sampled_frequencies_follow_the_renormalised_distribution(temperature, top_k, top_p):
    n = 20000
    logits = jnp.asarray(np.broadcast_to(LOGITS, (n, len(LOGITS))))
    params = sampling_params(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=7)
    tokens, logp_raw, logp_sampled = jax.jit(sample)(logits, params, jnp.arange(n))
    tokens = np.asarray(tokens)
    want = _expected(LOGITS, temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=len(LOGITS))
    assert not counts[want == 0].any()  # nothing outside top-k / top-p
    kept = want > 0
    assert stats.chisquare(counts[kept], want[kept] * n).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(logp_sampled), np.log(want[tokens]), rtol=1e-5, atol=1e-6)
    raw = jax.nn.log_softmax(jnp.asarray(LOGITS))
    np.testing.assert_allclose(np.asarray(logp_raw), np.asarray(raw)[tokens], rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_with_logp_sampled_zero():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    tokens, logp_raw, logp_sampled = sample(logits, sampling_params(4, temperature=0.0), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(logits.argmax(-1)))
    assert not np.asarray(logp_sampled).any()
    np.testing.assert_allclose(np.asarray(logp_raw), np.asarray(jax.nn.log_softmax(logits).max(-1)), rtol=1e-6)


def test_a_request_samples_the_same_tokens_in_any_batch():
    rng = np.random.default_rng(1)
    row = rng.normal(size=(1, 64)).astype(np.float32)
    others = rng.normal(size=(3, 64)).astype(np.float32)
    alone = sample(jnp.asarray(row), sampling_params(1, temperature=0.9, seed=123), jnp.asarray([5]))[0]
    batch = jnp.asarray(np.concatenate([others[:2], row, others[2:]]))
    mixed = sample(batch, sampling_params(4, temperature=[1.0, 0.3, 0.9, 2.0], seed=[1, 2, 123, 4]),
                   jnp.asarray([0, 9, 5, 3]))[0]
    assert int(mixed[2]) == int(alone[0])


def test_changing_sampling_parameters_compiles_nothing():
    jitted = jax.jit(sample)
    logits = jnp.zeros((3, 16))
    sizes = []
    for t, k, p, s in [(1.0, 0, 1.0, 0), (0.0, 2, 0.5, 1), (0.3, [1, 2, 3], [0.2, 0.9, 1.0], [5, 6, 7])]:
        jitted(logits, sampling_params(3, temperature=t, top_k=k, top_p=p, seed=s), jnp.arange(3))
        sizes.append(jitted._cache_size())  # jit wrappers of one function share a cache: count the change
    assert sizes[1] == sizes[2] == sizes[0]


@pytest.mark.parametrize("bad,name", [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_parameters_name_themselves(bad, name):
    with pytest.raises(ValueError, match=name):
        sampling_params(2, **bad)
