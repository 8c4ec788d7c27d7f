"""MTP speculative decoding: the MTP head drafts k tokens, the main model checks them in one step.

One round per live slot (all on device, `speculative_steps` runs up to `rounds` of them):

  catch-up  the depth-1 MTP cache takes the entries whose next token became known since the last round
            (`Draft`: h^0 from the main model, position, token, next token); the last one's logits draft d1
  draft     depth 1, reused, drafts d2..dk one entry at a time (EAGLE-style: h^1 stands in for h^0)
  verify    the main model extends [t_n, d1..dk] (k+1 tokens) over its cache: the target distributions
  accept    greedy: the longest prefix of drafts equal to the target argmax; sampling: draft j is accepted
            with probability min(1, p(dj) / q(dj)), the first rejected position resamples from the residual
            max(p - q, 0) renormalised, all accepted adds a token from p (so the output is distributed as
            plain sampling from p); then stop ids and limits cut the emitted tokens
  rollback  the main cache's length and the MTP stream's committed length move to the accepted prefix;
            entries written past them are masked by the lengths and overwritten later

`extend_speculative` is `decode.extend` plus the MTP stream of the chunk (so a prompt leaves one entry,
its last position, waiting for the first sampled token). Emitted tokens carry logp_raw (the main model's
log-softmax, what the trainer computes) and logp_sampled (under the processed target distribution, which
is the distribution of each emitted token). Depth 1 is the one that drafts (GLM checkpoints ship one).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.generate.decode import Emitted, Slots, routing_shape
from glm5v_jax.generate.sampling import SamplingParams, sampled_logprobs
from glm5v_jax.layers.attention import CachePages
from glm5v_jax.models.mmtp import shift_left


class Draft(NamedTuple):
    """Per slot: MTP-stream entries whose next token is known but which are not in the depth-1 cache yet
    (at the front, `count` of them, at most k+1), and the depth-1 stream's committed length."""

    h: jax.Array  # [B, K1, H] the main model's h^0 (before the final norm)
    positions: jax.Array  # [B, K1, 3] M-RoPE positions
    tokens: jax.Array  # [B, K1] t_i
    next_tokens: jax.Array  # [B, K1] t_{i+1}
    count: jax.Array  # [B]
    stream_length: jax.Array  # [B]


class Acceptance(NamedTuple):
    """Counts over the live slot-rounds of a call: drafts accepted at each position `[k]`, rounds, tokens."""

    accepted: jax.Array  # [k]
    rounds: jax.Array  # [] live slot-rounds
    emitted: jax.Array  # []
    ran: jax.Array  # [] rounds the loop ran


def _keys(seed, start, index, tag: int):
    """Per row a key for (the round starting at cached length `start`, draw `index`, purpose `tag`): never
    reused, since a row's start grows every round."""
    index = jnp.broadcast_to(index, start.shape)
    fold = jax.random.fold_in
    return jax.vmap(lambda s, n, i: fold(fold(fold(jax.random.key(s.astype(jnp.uint32)), n), i), tag))(
        seed, start, index)


def _draw(logits, params: SamplingParams, start, index: int, banned):
    """A token from each row's processed distribution (argmax for greedy rows), and that distribution."""
    logp = sampled_logprobs(logits, params, banned)
    drawn = jax.vmap(jax.random.categorical)(_keys(params.seed, start, index, 1), logp)
    return jnp.where(params.temperature > 0, drawn, jnp.argmax(logp, axis=-1)).astype(jnp.int32), logp


def _mtp(model, h_prev, tokens, next_tokens, positions, known, cache, table, stream_length, next_embeds=None):
    in_stream = model.mtp_in_stream(tokens, next_tokens, known)
    if next_embeds is None:
        next_embeds = model.mtp_stream_embeds(next_tokens)
    return model.extend_mtp_cached(0, h_prev, next_embeds, positions, in_stream, cache, table, stream_length)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def extend_speculative(graphdef, state, cache, chunk, table, start, offsets, draft: Draft):
    """`decode.extend` and the MTP stream: the waiting entries of `draft` (the last one's next token is the
    chunk's first) and the chunk's positions but its last go into the depth-1 cache. Returns (cache, offsets,
    last logits `[R, V]`, the draft left: the chunk's last position, its next token still unknown, the
    chunk's routing `[R, S, L_moe, top_k]`)."""
    model = nnx.merge(graphdef, state)
    r, s = chunk["tokens"].shape
    valid = chunk["valid"]
    n = jnp.sum(valid, axis=1).astype(jnp.int32)
    index = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
    out = model.extend_cached(chunk, offsets, cache, CachePages(table, start + n, index, valid))
    k1 = draft.tokens.shape[1]
    chunk_embeds = model.mtp_stream_embeds(chunk["tokens"], out["embeds"])
    has = n > 0
    last_waiting = jnp.arange(k1)[None] == draft.count[:, None] - 1  # its next token is the chunk's first
    next_waiting = jnp.where(last_waiting, chunk["tokens"][:, :1], draft.next_tokens)
    waiting = jnp.where(last_waiting[..., None], chunk_embeds[:, :1], model.mtp_stream_embeds(next_waiting))
    mtp = _mtp(model, jnp.concatenate([draft.h, out["h"]], axis=1),
               jnp.concatenate([draft.tokens, chunk["tokens"]], axis=1),
               jnp.concatenate([next_waiting, shift_left(chunk["tokens"], 1)], axis=1),
               jnp.concatenate([draft.positions, out["positions"]], axis=1),
               jnp.concatenate([(jnp.arange(k1)[None] < draft.count[:, None]) & has[:, None],
                                valid & shift_left(valid, 1)], axis=1),
               out["cache"], table, draft.stream_length,
               next_embeds=jnp.concatenate([waiting, shift_left(chunk_embeds, 1)], axis=1))
    at = jnp.maximum(n - 1, 0)[:, None]
    take = functools.partial(jnp.take_along_axis, axis=1)

    def first_is(old, new):  # entry 0 <- the chunk's last position, in rows that had tokens
        return jnp.where(has.reshape((-1,) + (1,) * (old.ndim - 1)), old.at[:, 0].set(new), old)

    left = Draft(first_is(draft.h, take(out["h"], at[..., None])[:, 0]),
                 first_is(draft.positions, take(out["positions"], at[..., None])[:, 0]),
                 first_is(draft.tokens, take(chunk["tokens"], at)[:, 0]),
                 draft.next_tokens, jnp.where(has, 1, draft.count), mtp["stream_lengths"])
    last = take(out["logits"], at[..., None])[:, 0]
    return mtp["cache"], out["offsets"], last, left, out["expert_ids"]


def accept_drafts(p: jax.Array, q: jax.Array, drafts: jax.Array, greedy: jax.Array, accept_keys, next_keys
                  ) -> tuple[jax.Array, jax.Array]:
    """Speculative acceptance. p `[B, k+1, V]`: the target's log-probabilities after each verified token
    (p[:, j] is the distribution of the token after draft j); q `[B, k, V]`: the distributions drafts `[B, k]`
    were drawn from. Sampling rows accept draft j with probability min(1, p(dj) / q(dj)) until the first
    rejection, which resamples from max(p - q, 0) renormalised; all accepted draws one more token from
    p[:, k]. Greedy rows accept drafts equal to the target's argmax, then take its argmax. Returns (the
    tokens `[B, k+1]`: accepted drafts, then the next token, then copies of it; the accepted mask `[B, k]`).
    Each emitted token is distributed as a draw from p (Leviathan et al. 2023; Chen et al. 2023)."""
    b, k = drafts.shape
    rows = jnp.arange(b)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=2)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_keys)
    ok = jnp.where(greedy[:, None], drafts == jnp.argmax(p[:, :k], axis=-1), jnp.log(u) < p_d - q_d)
    ok = jnp.cumprod(ok.astype(jnp.int32), axis=1).astype(bool)
    a = jnp.sum(ok, axis=1)
    p_a = jnp.exp(p[rows, a])
    residual = jnp.where((a < k)[:, None], jnp.maximum(p_a - jnp.exp(q[rows, jnp.minimum(a, k - 1)]), 0.0), p_a)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
    nxt = jax.vmap(jax.random.categorical)(next_keys, jnp.log(residual))
    nxt = jnp.where(greedy, jnp.argmax(p[rows, a], axis=-1), nxt).astype(jnp.int32)
    j = jnp.arange(k + 1)[None]
    return jnp.where(j < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None]), ok


def _round(model, k: int, cache, slots: Slots, draft: Draft, params: SamplingParams, banned):
    """One speculation round of every live slot: (cache, slots, draft, emitted tokens `[B, k+1]` (-1: none),
    logp_raw, logp_sampled, stop hit, accepted-draft mask `[B, k]`)."""
    b, k1 = slots.pending.shape[0], k + 1
    live, n = slots.live, slots.length
    rows = jnp.arange(b)
    # catch-up: the waiting entries into the depth-1 cache; the last one drafts d1
    known = (jnp.arange(k1)[None] < draft.count[:, None]) & live[:, None]
    out = _mtp(model, draft.h, draft.tokens, draft.next_tokens, draft.positions, known, cache, slots.table,
               draft.stream_length)
    cache, committed = out["cache"], out["stream_lengths"]
    last = jnp.maximum(draft.count - 1, 0)
    d, q = _draw(out["logits"][rows, last], params, n, 0, banned)
    drafts, qs, h_prev, prev, stream = [d], [q], out["h"][rows, last], slots.pending, committed
    for j in range(1, k):  # depth 1 again at the next position: its h^1 stands in for h^0
        pos = jnp.broadcast_to((slots.offset + j - 1)[:, None, None], (b, 1, 3))
        out = _mtp(model, h_prev[:, None], prev[:, None], drafts[-1][:, None], pos, live[:, None], cache,
                   slots.table, stream)
        cache, stream, h_prev, prev = out["cache"], out["stream_lengths"], out["h"][:, 0], drafts[-1]
        d, q = _draw(out["logits"][:, 0], params, n, j, banned)
        drafts.append(d)
        qs.append(q)
    # verify: [t_n, d1..dk] in one main step
    tokens = jnp.stack([slots.pending] + drafts, axis=1)  # [B, K1]
    valid = jnp.broadcast_to(live[:, None], (b, k1))
    pages = CachePages(slots.table, n + k1 * live, n[:, None] + jnp.arange(k1)[None], valid)
    main = model.extend_cached({"tokens": tokens, "valid": valid}, slots.offset, cache, pages)
    cache, logits = main["cache"], main["logits"]  # [B, K1, V]
    p = jax.vmap(lambda x: sampled_logprobs(x, params, banned), in_axes=1, out_axes=1)(logits)
    d = jnp.stack(drafts, axis=1)  # [B, k]
    emitted, ok = accept_drafts(p, jnp.stack(qs, axis=1), d, params.temperature <= 0,
                                _keys(params.seed, n, 0, 2), _keys(params.seed, n, 0, 3))
    a = jnp.sum(ok, axis=1)
    greedy = params.temperature <= 0
    j = jnp.arange(k1)[None]
    raw = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), emitted[..., None], axis=2)[..., 0]
    smp = jnp.where(greedy[:, None], 0.0, jnp.take_along_axis(p, emitted[..., None], axis=2)[..., 0])
    # stops and limits cut the round's tokens
    hit = jnp.any(emitted[..., None] == slots.stop_ids[:, None, :], axis=-1) & (j <= a[:, None])
    first_hit = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, k1 + 1)  # tokens up to the stop
    e = jnp.minimum(jnp.minimum(a + 1, first_hit), slots.limit - slots.count) * live  # tokens emitted
    keep = j < e[:, None]
    count = slots.count + e
    stopped = live & (first_hit <= e)
    new_slots = slots._replace(pending=jnp.where(live, emitted[rows, jnp.maximum(e - 1, 0)], slots.pending),
                               length=n + e, offset=slots.offset + e, count=count,
                               live=live & ~stopped & (count < slots.limit))
    nxt = jnp.where(keep, emitted, 0)
    new_draft = Draft(jnp.where(live[:, None, None], main["h"], draft.h),
                      jnp.where(live[:, None, None], main["positions"], draft.positions),
                      jnp.where(live[:, None], tokens, draft.tokens), jnp.where(live[:, None], nxt, draft.next_tokens),
                      jnp.where(live, e, draft.count), jnp.where(live, committed, draft.stream_length))
    return (cache, new_slots, new_draft, jnp.where(keep, emitted, -1), jnp.where(keep, raw, 0.0),
            jnp.where(keep, smp, 0.0), stopped, ok & live[:, None], main["expert_ids"])


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 8), donate_argnums=(4,))
def speculative_steps(graphdef, state, k: int, rounds: int, cache, slots: Slots, draft: Draft,
                      params: SamplingParams, banned: tuple[int, ...] = ()):
    """Up to `rounds` speculation rounds of the live slots with k drafts each. Returns (cache, slots, draft,
    Emitted with `rounds * (k + 1)` columns, Acceptance)."""
    b, k1 = slots.pending.shape[0], k + 1
    width = rounds * k1
    layers, top_k = routing_shape(graphdef, state)

    def cond(carry):
        return (carry[0] < rounds) & jnp.any(carry[3].live)

    def body(carry):
        i, weights, cache, slots, draft, filled, toks, raw, smp, stopped, acc, live_rounds, ids = carry
        model = nnx.merge(graphdef, weights)
        live = slots.live
        cache, slots, draft, t, lr, ls, hit, ok, fed = _round(model, k, cache, slots, draft, params, banned)
        cols = jnp.where(t >= 0, filled[:, None] + jnp.arange(k1)[None], width)  # out of range: dropped
        rows = jnp.arange(b)[:, None]
        toks = toks.at[rows, cols].set(t, mode="drop")
        raw = raw.at[rows, cols].set(lr, mode="drop")
        smp = smp.at[rows, cols].set(ls, mode="drop")
        ids = ids.at[rows, cols].set(fed, mode="drop")  # the routing of the tokens fed to emit them
        filled = filled + jnp.sum(t >= 0, axis=1)
        return (i + 1, weights, cache, slots, draft, filled, toks, raw, smp, stopped | hit,
                acc + jnp.sum(ok, axis=0), live_rounds + jnp.sum(live), ids)

    zeros = jnp.zeros((b, width), jnp.float32)
    carry = (jnp.int32(0), state, cache, slots, draft, jnp.zeros((b,), jnp.int32), jnp.full((b, width), -1, jnp.int32),
             zeros, zeros, jnp.zeros((b,), bool), jnp.zeros((k,), jnp.int32), jnp.int32(0),
             jnp.zeros((b, width, layers, top_k), jnp.int32))
    ran, _, cache, slots, draft, filled, toks, raw, smp, stopped, acc, live_rounds, ids = jax.lax.while_loop(
        cond, body, carry)
    return (cache, slots, draft, Emitted(toks, raw, smp, stopped, ids),
            Acceptance(acc, live_rounds, jnp.sum(filled), ran))


# ---------------------------------------------------------------- the host side of a slot's draft
def empty_draft(k1: int, hidden: int) -> dict[str, np.ndarray]:
    """A sequence's draft before its first extend: no waiting entry, an empty stream."""
    return {"h": np.zeros((k1, hidden), np.float32), "positions": np.zeros((k1, 3), np.int32),
            "tokens": np.zeros((k1,), np.int32), "next_tokens": np.zeros((k1,), np.int32),
            "count": np.zeros((), np.int32), "stream_length": np.zeros((), np.int32)}


def stack_drafts(drafts: list[dict | None], rows: int, k1: int, hidden: int) -> Draft:
    """Device `Draft` of `rows` slots from per-sequence drafts (None: an empty slot)."""
    empty = empty_draft(k1, hidden)
    filled = [d if d is not None else empty for d in drafts] + [empty] * (rows - len(drafts))
    return Draft(*(jax.device_put(np.stack([d[name] for d in filled])) for name in Draft._fields))


def row_draft(draft: Draft, i: int) -> dict[str, np.ndarray]:
    """Row i of a host copy (`jax.device_get`) of a `Draft`."""
    return {name: np.array(getattr(draft, name)[i]) for name in Draft._fields}
