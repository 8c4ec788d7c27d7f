"""Sampling with per-request parameters as arrays, and the two logprobs of every sampled token.

`SamplingParams` holds one value per row (temperature, top-k, top-p, seed), so a batch mixes requests
freely and changing a parameter compiles nothing: the parameters are data, never compile-time
constants. Each token comes back with two logprobs:

  logp_raw      under the model's own distribution, log_softmax(logits): what the trainer computes
                (RL's importance ratios and KL terms are taken against it);
  logp_sampled  under the distribution the token was actually drawn from: logits / temperature,
                restricted to the top-k tokens and to the top-p nucleus, renormalised (0 for greedy).

Conventions: temperature 0 is greedy (argmax); top_k 0 keeps every token; top_p 1 keeps every token
(the most likely token is always kept). A row's randomness is `fold_in(key(seed), counter)`, so a
request samples the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30


class SamplingParams(NamedTuple):
    """Per-row sampling parameters `[B]` (use `sampling_params` to build them from scalars)."""

    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32; 0: no limit
    top_p: jax.Array  # float32 in (0, 1]
    seed: jax.Array  # int32 (uint32 bits): the request's stream


def sampling_params(rows: int, *, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> SamplingParams:
    """`SamplingParams` for `rows` rows from scalars or per-row sequences, checked: ValueError naming
    the parameter when one is out of range."""
    t = np.broadcast_to(np.asarray(temperature, np.float32), (rows,))
    k = np.broadcast_to(np.asarray(top_k, np.int32), (rows,))
    p = np.broadcast_to(np.asarray(top_p, np.float32), (rows,))
    s = np.broadcast_to(np.asarray(seed, np.int64), (rows,))
    if (t < 0).any() or not np.isfinite(t).all():
        raise ValueError(f"temperature must be finite and >= 0, got {t.tolist()}")
    if (k < 0).any():
        raise ValueError(f"top_k must be >= 0 (0: no limit), got {k.tolist()}")
    if ((p <= 0) | (p > 1)).any():
        raise ValueError(f"top_p must be in (0, 1], got {p.tolist()}")
    arrays = (t, k, p, (s & 0xFFFFFFFF).astype(np.uint32).view(np.int32))
    return SamplingParams(*(jax.device_put(np.array(a)) for a in arrays))  # (jnp.asarray may compile a copy)


def sampling_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(the logits of the distribution sampled from, sorted descending `[B, V]` with the tokens cut
    by top-k / top-p at -1e30; the token ids in that order `[B, V]`). Greedy rows keep the raw order."""
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = ranked / temperature
    v = logits.shape[-1]
    rank = jnp.arange(v)[None, :]
    keep = rank < jnp.where(params.top_k > 0, params.top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, scaled, _NEG), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep = keep & ((before < params.top_p[:, None]) | (rank == 0))
    return jnp.where(keep, scaled, _NEG), order


def sample(logits: jax.Array, params: SamplingParams, counter: jax.Array,
           banned: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from logits `[B, V]`: (tokens `[B]` int32, logp_raw `[B]`, logp_sampled `[B]`).
    `counter [B]`: the row's position in its request's stream (e.g. its token index). `banned`: ids never
    sampled (the `<|image|>` placeholder, which only an image may fill); logp_raw still uses every logit."""
    logits = logits.astype(jnp.float32)
    allowed = logits.at[:, list(banned)].set(_NEG) if banned else logits
    cut, order = sampling_logits(allowed, params)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(params.seed, counter)
    drawn = jax.vmap(jax.random.categorical)(keys, cut)  # an index into the sorted order
    greedy = params.temperature <= 0
    drawn = jnp.where(greedy, 0, drawn)
    tokens = jnp.take_along_axis(order, drawn[:, None], axis=-1)[:, 0].astype(jnp.int32)
    logp_raw = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    logp_cut = jnp.take_along_axis(jax.nn.log_softmax(cut, axis=-1), drawn[:, None], axis=-1)[:, 0]
    return tokens, logp_raw, jnp.where(greedy, 0.0, logp_cut)


def sampled_logprobs(logits: jax.Array, params: SamplingParams, banned: tuple[int, ...] = ()) -> jax.Array:
    """The log-probabilities `[B, V]` (token order) of the distribution `sample` draws from: logits /
    temperature, cut by top-k / top-p and `banned`, renormalised (-1e30 where cut). For greedy rows this is
    the temperature-1 distribution; callers take its argmax."""
    logits = logits.astype(jnp.float32)
    allowed = logits.at[:, list(banned)].set(_NEG) if banned else logits
    cut, order = sampling_logits(allowed, params)
    logp = jnp.where(cut > _NEG / 2, jax.nn.log_softmax(cut, axis=-1), _NEG)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(logp).at[rows, order].set(logp)
