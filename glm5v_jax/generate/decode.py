"""Jitted generation steps over the paged cache, and an offline `generate` built on them.

  prefill(state, cache, chunk, table, ...)    one extend of every row's prompt (a padded bucket), then a
                                              sampled first token per row
  decode(state, cache, ..., steps)            a multi-step decode loop on device (`lax.fori_loop`) with a
                                              per-row stop: a stop id, `max_new` tokens, or the row's capacity

Both take the model as an `nnx.State` (`nnx.split(model)`), so new weights need no recompile, and
donate the cache. Sampling parameters are arrays (`sampling.SamplingParams`): changing them compiles
nothing. Rows are independent: a finished row writes nothing more into the cache.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.generate.kv_cache import StackCache, copy_pages
from glm5v_jax.generate.pages import PagePool, pages_needed
from glm5v_jax.generate.sampling import SamplingParams, sample, sampling_params
from glm5v_jax.layers.attention import CachePages


class Generated(NamedTuple):
    """Per row: the new tokens, their logprobs (raw and as sampled) and how many are real."""

    tokens: np.ndarray  # [B, max_new] int32 (after `count`: padding)
    logp_raw: np.ndarray  # [B, max_new]
    logp_sampled: np.ndarray  # [B, max_new]
    count: np.ndarray  # [B]
    finish: list[str]  # "stop" | "length" | "capacity"


def _bucket(n: int) -> int:
    """The padded length a prompt of n tokens is compiled for: the next power of two (at least 8)."""
    return max(8, 1 << (int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def prefill(graphdef, state, cache, chunk, table, lengths):
    """Every row's prompt in one extend; returns (cache, offsets, the logits after each prompt `[B, V]`)."""
    model = nnx.merge(graphdef, state)
    b, s = chunk["tokens"].shape
    index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    out = model.extend_cached(chunk, jnp.zeros((b,), jnp.int32), cache, CachePages(table, lengths, index,
                                                                                     chunk["valid"]))
    last = jnp.take_along_axis(out["logits"], (lengths - 1)[:, None, None], axis=1)[:, 0]
    return out["cache"], out["offsets"], last


@functools.partial(jax.jit, donate_argnums=(0,))
def fork_pages(cache, src, dst):
    """Every stack's copy-on-write page copies of the forks of a group."""
    return {name: copy_pages(c, src, dst) for name, c in cache.items()}


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(2,))
def decode(graphdef, state, cache, table, first, lengths, offsets, limits, stop_ids, steps: int,
           params: SamplingParams):
    """`steps` decode steps from each row's `first` token (already sampled, not yet in the cache) at
    cached `lengths`. A row stops after a token in `stop_ids [K]`, or when it has `limits [B]` new
    tokens (max_new_tokens or its capacity, the smaller). Returns (cache, tokens `[B, steps + 1]` (the
    first included), logp_raw, logp_sampled for steps, count `[B]`, stopped `[B]`)."""
    b = first.shape[0]

    def step(i, carry):
        weights, cache, token, length, offset, done, count, stopped, toks, raw, smp = carry
        model = nnx.merge(graphdef, weights)  # the weights ride in the carry: nnx modules cannot close over
                                              # the outer trace's values
        live = ~done
        pages = CachePages(table, length + live, length[:, None], live[:, None])
        chunk = {"tokens": token[:, None], "valid": live[:, None]}
        out = model.extend_cached(chunk, offset, cache, pages)
        nxt, lr, ls = sample(out["logits"][:, 0], params, length + 1)
        hit = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        stopped = stopped | (live & hit)
        done = done | hit | (count >= limits)
        write = ~done
        toks = toks.at[:, i + 1].set(jnp.where(write, nxt, 0))
        raw = raw.at[:, i + 1].set(jnp.where(write, lr, 0.0))
        smp = smp.at[:, i + 1].set(jnp.where(write, ls, 0.0))
        count = count + write
        return (weights, out["cache"], jnp.where(write, nxt, token), length + live, out["offsets"], done, count,
                stopped, toks, raw, smp)

    zeros = jnp.zeros((b, steps + 1), jnp.float32)
    toks = jnp.zeros((b, steps + 1), jnp.int32).at[:, 0].set(first)
    carry = (state, cache, first, lengths, offsets, jnp.zeros((b,), bool), jnp.ones((b,), jnp.int32),
             jnp.zeros((b,), bool), toks, zeros, zeros)
    _, cache, _, _, _, _, count, stopped, toks, raw, smp = jax.lax.fori_loop(0, steps, step, carry)
    return cache, toks, raw, smp, count, stopped


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, images: dict | None = None, n: int = 1,
             max_new_tokens: int = 32, stop_ids: Sequence[int] = (), page_size: int = 16,
             capacity: int | None = None, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> Generated:
    """Prompts (token ids; `images`: the image slots of their `<|image|>` blocks in order, as
    `run_loader.image_inputs` gives them, concatenated) -> `n` samples of up to `max_new_tokens` new
    tokens each (rows prompt-major: prompt i's samples are rows i*n .. i*n+n-1), with both logprobs.

    Each prompt is prefilled once (one extend padded to a power-of-two bucket; CogViT and the projector
    once per image); its other n-1 samples are forks sharing its full pages, with their own copy of the
    last partial page. Sampling parameters broadcast over the rows; a scalar `seed` gives row r the
    stream seed + r. Then one on-device decode loop.
    """
    graphdef, state = nnx.split(model)
    spec = model.backbone.spec
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise ValueError("generate: every prompt needs at least one token")
    capacity = int(capacity or lengths.max() + max_new_tokens)
    if lengths.max() >= capacity:
        raise ValueError(f"generate: a prompt of {lengths.max()} tokens leaves no room in capacity {capacity}")
    per_row = pages_needed(capacity, page_size)
    pool = PagePool(b * n * per_row, page_size)
    parents = [pool.allocate(per_row) for _ in range(b)]
    stacks = {name: StackCache(k, spec.num_kv_heads, spec.head_dim)
              for name, k in (("dense_layers", spec.first_k_dense), ("moe_layers", spec.num_moe_layers)) if k}
    cache = {name: st.init(pool.num_pages, page_size, spec.dtype) for name, st in stacks.items()}
    s = _bucket(lengths.max())
    tokens = np.zeros((b, s), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    chunk = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(np.arange(s)[None] < lengths[:, None])}
    chunk.update({k: jnp.asarray(v) for k, v in (images or {}).items()})
    cache, offsets, last = prefill(graphdef, state, cache, chunk, jnp.asarray(parents, jnp.int32),
                                   jnp.asarray(lengths))
    rows, copies = [], []
    for i, pages in enumerate(parents):
        rows.append(pages)
        for _ in range(n - 1):
            child = pool.fork(pages, int(lengths[i]))
            pool.grow(child.pages, capacity)
            rows.append(child.pages)
            copies += child.copies
    if copies:
        src, dst = (jnp.asarray(c, jnp.int32) for c in zip(*copies))
        cache = fork_pages(cache, src, dst)
    table = jnp.asarray(rows, jnp.int32)
    lengths = np.repeat(lengths, n)
    seeds = np.asarray(seed) + (np.arange(b * n) if np.ndim(seed) == 0 else 0)
    params = sampling_params(b * n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds)
    lengths_j = jnp.asarray(lengths)
    first, raw0, smp0 = _sample(jnp.repeat(last, n, axis=0), params, lengths_j)
    limits = np.minimum(max_new_tokens, capacity - lengths)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    cache, toks, raw, smp, count, stopped = decode(graphdef, state, cache, table, first, lengths_j,
                                                   jnp.repeat(offsets, n), jnp.asarray(limits, jnp.int32), stops,
                                                   max_new_tokens - 1, params)
    raw, smp = np.array(raw), np.array(smp)  # writable copies
    raw[:, 0], smp[:, 0] = np.asarray(raw0), np.asarray(smp0)
    count, stopped = np.asarray(count), np.asarray(stopped)
    finish = ["stop" if st else "capacity" if capacity - ln < max_new_tokens and k >= capacity - ln else "length"
              for st, k, ln in zip(stopped, count, lengths)]
    for pages in rows:
        pool.release(list(pages))
    if pool.free_pages != pool.num_pages:  # every page handed out is freed exactly once
        raise RuntimeError(f"generate: {pool.num_pages - pool.free_pages} pages leaked")
    return Generated(np.asarray(toks), raw, smp, count, finish)


_sample = jax.jit(sample)
