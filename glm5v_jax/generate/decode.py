"""The jitted generation steps over the paged cache (the engine's device side).

  extend(graphdef, state, cache, chunk, table, start, offsets)
        new tokens of some sequences (a prompt, a chunk of a long prompt, a tool result or an image
        appended mid-conversation) written at each row's `start`; returns the logits after each row's
        last new token
  sample_rows(last, rows, params, counter)
        a first token for each of a fixed number of slots from the extend's logits (a group's n samples
        read the same row)
  decode_steps(graphdef, state, steps, cache, rows, params)
        up to `steps` decode steps of every live slot, on device (`lax.while_loop`, left early when no
        slot is live), with a per-slot stop (stop ids, token limit)
  copy_forked_pages(cache, src, dst)
        a group's copy-on-write page copies

All take the model as an `nnx.State` (`nnx.split(model)`), so new weights compile nothing, and donate
the cache. Sampling parameters are arrays (`sampling.SamplingParams`): changing them compiles nothing.
A slot that is not live writes nothing into the cache.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.generate.kv_cache import copy_pages
from glm5v_jax.generate.sampling import SamplingParams, sample
from glm5v_jax.layers.attention import CachePages


class Slots(NamedTuple):
    """The device view of the engine's decode slots, one row each `[B]` (table `[B, N]`, stop ids `[B, K]`)."""

    table: jax.Array  # int32 [B, N]: the slot's pages (the first N of its table)
    pending: jax.Array  # int32: the last emitted token, not yet in the cache
    length: jax.Array  # int32: tokens in the cache
    offset: jax.Array  # int32: the next M-RoPE position
    live: jax.Array  # bool: still generating
    count: jax.Array  # int32: tokens emitted in this turn
    limit: jax.Array  # int32: the most tokens this turn may emit
    stop_ids: jax.Array  # int32 [B, K]: -1 pads


class Emitted(NamedTuple):
    """What `decode_steps` emitted: per slot and step the token (-1: none) and its two logprobs."""

    tokens: jax.Array  # int32 [B, steps]
    logp_raw: jax.Array  # float32 [B, steps]
    logp_sampled: jax.Array  # float32 [B, steps]
    stopped: jax.Array  # bool [B]: ended on a stop id
    expert_ids: jax.Array  # int32 [B, steps, L_moe, top_k]: the routing of the token fed to emit each token


def routing_shape(graphdef, state) -> tuple[int, int]:
    """(MoE layers, experts per token) of a model's routing record ((0, 0) without MoE layers)."""
    spec = nnx.merge(graphdef, state).spec.backbone
    return (spec.num_moe_layers, spec.experts_per_token) if spec.num_moe_layers else (0, 0)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def extend(graphdef, state, cache, chunk, table, start, offsets):
    """Append `chunk` (`tokens [R, S]`, `valid [R, S]` with the real tokens first, and its images) to rows
    holding `start [R]` cached tokens at M-RoPE offsets `offsets [R]`. Returns (cache, the offsets after the
    chunk `[R]`, the logits after each row's last real token `[R, V]`). A row with no valid token writes
    nothing (its logits are meaningless)."""
    model = nnx.merge(graphdef, state)
    r, s = chunk["tokens"].shape
    n = jnp.sum(chunk["valid"], axis=1).astype(jnp.int32)
    index = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
    out = model.extend_cached(chunk, offsets, cache, CachePages(table, start + n, index, chunk["valid"]))
    last = jnp.take_along_axis(out["logits"], jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
    return out["cache"], out["offsets"], last, out["expert_ids"]


@functools.partial(jax.jit, static_argnums=(4,))
def sample_rows(last, rows, params: SamplingParams, counter, banned: tuple[int, ...] = ()):
    """Slot i's first token from `last[rows[i]]` (`last [R, V]`, rows `[B]`): (tokens, logp_raw, logp_sampled)."""
    return sample(last[rows], params, counter, banned)


@functools.partial(jax.jit, static_argnums=(0, 2, 6), donate_argnums=(3,))
def decode_steps(graphdef, state, steps: int, cache, slots: Slots, params: SamplingParams,
                 banned: tuple[int, ...] = ()):
    """Up to `steps` decode steps of the live slots. Each step feeds a slot's pending token, samples the
    next (stream counter: its token index; never a `banned` id) and ends the slot after a stop id or at its
    limit. Returns (cache, slots after the steps, Emitted)."""
    b = slots.pending.shape[0]
    layers, top_k = routing_shape(graphdef, state)

    def cond(carry):
        i, _, _, slots, *_ = carry
        return (i < steps) & jnp.any(slots.live)

    def body(carry):
        i, weights, cache, slots, toks, raw, smp, stopped, ids = carry
        model = nnx.merge(graphdef, weights)  # the weights ride in the carry: nnx modules cannot close over
                                              # the outer trace's values
        live = slots.live
        pages = CachePages(slots.table, slots.length + live, slots.length[:, None], live[:, None])
        out = model.extend_cached({"tokens": slots.pending[:, None], "valid": live[:, None]}, slots.offset,
                                  cache, pages)
        nxt, lr, ls = sample(out["logits"][:, 0], params, slots.length + 1, banned)
        count = slots.count + live
        hit = live & jnp.any(nxt[:, None] == slots.stop_ids, axis=1)
        toks = toks.at[:, i].set(jnp.where(live, nxt, -1))
        raw = raw.at[:, i].set(jnp.where(live, lr, 0.0))
        smp = smp.at[:, i].set(jnp.where(live, ls, 0.0))
        ids = ids.at[:, i].set(out["expert_ids"][:, 0])
        slots = slots._replace(pending=jnp.where(live, nxt, slots.pending), length=slots.length + live,
                               offset=out["offsets"], count=count, live=live & ~hit & (count < slots.limit))
        return i + 1, weights, out["cache"], slots, toks, raw, smp, stopped | hit, ids

    zeros = jnp.zeros((b, steps), jnp.float32)
    carry = (jnp.int32(0), state, cache, slots, jnp.full((b, steps), -1, jnp.int32), zeros, zeros,
             jnp.zeros((b,), bool), jnp.zeros((b, steps, layers, top_k), jnp.int32))
    _, _, cache, slots, toks, raw, smp, stopped, ids = jax.lax.while_loop(cond, body, carry)
    return cache, slots, Emitted(toks, raw, smp, stopped, ids)


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_forked_pages(cache, src, dst):
    """Every stack's copy-on-write page copies of a group's forks (`src[i]` -> `dst[i]`)."""
    return {name: copy_pages(c, src, dst) for name, c in cache.items()}
