"""Pure-jnp reference implementations: attention with GQA/segments, paged attention over a KV
cache, and grouped matmul.

These are the twins of the Pallas kernels (issue: kernels) and the `xla` path of
the model. Conventions shared with the kernels:

* q `[B, S, H, D]`, k and v `[B, T, KV, D]` with H a multiple of KV (GQA: each
  group of H // KV query heads reads one K/V head; K/V are never repeated).
* segment ids `[B, S]` / `[B, T]` int32; 0 marks padding. A query attends to a key
  only when both have the same non-zero segment id. Padding query rows, and rows
  with no visible key, produce zeros.
* causal masking compares the index within the row (packed rows restart their
  documents through segment ids, so index order is enough).
* the per-head maximum logit (for QK-Clip) is taken over visible pairs only.
* paged K/V (the generation cache) `[KV, P, page, D]`: P pages of `page` tokens per KV head,
  the layout of jax's Pallas TPU paged-attention kernel; a row's page table `[N]` lists its
  pages in order, so its token t lives in page `table[t // page]` at slot `t % page`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> jax.Array | None:
    """Boolean mask `[B or 1, S, T]`: True where query s may attend to key t."""
    mask = None
    if causal:
        mask = (jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :])[None]
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
            q_segment_ids[:, :, None] != 0
        )
        mask = seg if mask is None else (mask & seg)
    return mask


def _masked_logits(q, k, *, causal, q_segment_ids, kv_segment_ids, scale):
    """Scaled float32 logits `[B, KV, G, S, T]` and the mask `[B or 1, 1, 1, S, T]` (or None).

    Query head h is (kv head h // G, member h % G) with G = H // KV.
    """
    b, s, h, d = q.shape
    _, t, kv, _ = k.shape
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kv})")
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, s, kv, h // kv, d).astype(jnp.float32)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32)) * scale
    mask = attention_mask(
        s, t, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids
    )
    return logits, (None if mask is None else mask[:, None, None])


def _head_max(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Per-head max `[H]` of logits `[B, KV, G, S, T]` over visible pairs; -inf if none."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=(0, 3, 4))  # [KV, G]
    return jax.lax.stop_gradient(m.reshape(-1))


def attention_max_logits(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Per-head maximum of `scale * q.k` over visible (query, key) pairs: float32 `[H]`.

    The statistic QK-Clip (Kimi K2) reads. Masking as in `attention_reference`
    (causal, segments, padding); a head with no visible pair gets -inf. No gradient
    flows through it. Standalone it materialises the `[B, H, S, T]` logits once, so it
    is the fallback for attention cores that cannot report the maximum themselves.
    """
    logits, mask = _masked_logits(q, k, causal=causal, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, scale=scale)
    return _head_max(logits, mask)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    return_probs: bool = False,
    return_max_logits: bool = False,
):
    """Softmax attention in float32; returns `[B, S, H, D]` in q's dtype.

    With `return_probs=True` also returns the probabilities `[B, H, S, T]` (used by
    tests that check which keys a query can see); with `return_max_logits=True` also
    the per-head maximum logit `[H]` (see `attention_max_logits`), taken from the same
    logits. Extra results follow `out` in that order.
    """
    b, s, h, d = q.shape
    logits, mask = _masked_logits(q, k, causal=causal, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, scale=scale)
    max_logits = _head_max(logits, mask) if return_max_logits else None
    out, probs = _attend(logits, mask, v, q.dtype)
    extras = []
    if return_probs:
        extras.append(probs.reshape(b, h, s, probs.shape[-1]))
    if return_max_logits:
        extras.append(max_logits)
    return (out, *extras) if extras else out


def _attend(logits: jax.Array, mask: jax.Array | None, v: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Softmax of masked logits `[B, KV, G, S, T]` times v `[B, T, KV, D]`: (`[B, S, H, D]` in `dtype`,
    probabilities). Rows that see no key at all (padding) give zeros, not a uniform average."""
    b, kv, g, s, _ = logits.shape
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32))
    return out.reshape(b, s, kv * g, v.shape[-1]).astype(dtype), probs


def gather_pages(pages: jax.Array, page_table: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """Paged K or V `[KV, P, page, D]` (or a stack `[L, KV, P, page, D]` read at `layer`) and page tables
    `[B, N]` -> contiguous `[B, N * page, KV, D]`. Reading a stack at a layer gathers from it directly (no
    copy of the layer: what a loop over layers carrying the whole stack needs)."""
    if layer is None:
        g = pages[:, page_table].transpose(1, 2, 0, 3, 4)  # [B, N, KV, page, D]
    else:
        g = pages[layer, :, page_table]  # [B, N, KV, page, D]
    b, n, kv, size, d = g.shape
    return g.transpose(0, 1, 3, 2, 4).reshape(b, n * size, kv, d)


def paged_write(pages: jax.Array, new: jax.Array, page_table: jax.Array, token_index: jax.Array,
                valid: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """Store K or V of new tokens: pages `[KV, P, page, D]` (or a stack `[L, KV, P, page, D]`, written at
    `layer`, in place), new `[B, S, KV, D]` at token indices `token_index [B, S]` of rows with tables
    `page_table [B, N]`; tokens where `valid [B, S]` is False (padding of a bucket) are dropped, never
    written."""
    num_pages, page_size = pages.shape[-3], pages.shape[-2]
    page_of = jnp.clip(token_index // page_size, 0, page_table.shape[1] - 1)
    slot = jnp.where(valid, jnp.take_along_axis(page_table, page_of, axis=1), num_pages)  # out of range: dropped
    if layer is not None:  # advanced indices around a slice: the update is [B, S, KV, D], new's own layout
        return pages.at[layer, :, slot, token_index % page_size].set(new.astype(pages.dtype), mode="drop")
    values = new.transpose(2, 0, 1, 3).astype(pages.dtype)  # [KV, B, S, D]
    return pages.at[:, slot, token_index % page_size].set(values, mode="drop")


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    scale: float | None = None,
    layer: jax.Array | None = None,
) -> jax.Array:
    """Attention of new queries over a paged KV cache, in float32; returns `[B, S, H, D]` in q's dtype.
    With `layer`, k_pages and v_pages are stacks `[L, KV, P, page, D]` read at that layer.

    q `[B, S, H, D]` (S = 1 for decode, a chunk for extend/verify); k_pages, v_pages `[KV, P, page, D]`;
    page_table `[B, N]` int32; lengths `[B]`: cached tokens of each row (the new ones included).
    Query s of row b sees key t when t < lengths[b] and, with `q_positions [B, S]` (the queries'
    token indices in their row), t <= q_positions[b, s] (causal). A row with lengths 0 gives zeros.
    """
    k = gather_pages(k_pages, page_table, layer)
    v = gather_pages(v_pages, page_table, layer)
    t = jnp.arange(k.shape[1])
    mask = jnp.broadcast_to(t[None, None, :] < lengths[:, None, None], (q.shape[0], q.shape[1], k.shape[1]))
    if q_positions is not None:
        mask = mask & (t[None, None, :] <= q_positions[:, :, None])
    logits, _ = _masked_logits(q, k, causal=False, q_segment_ids=None, kv_segment_ids=None, scale=scale)
    out, _ = _attend(logits, mask[:, None, None], v, q.dtype)
    return out


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul: rows of `lhs [m, k]` in consecutive groups times `rhs [G, k, n]`.

    Group g owns rows `[sum(sizes[:g]), sum(sizes[:g+1]))`; rows past the sum of the
    sizes are zero in the output. Float32 accumulation, output in lhs's dtype.
    """
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(m), side="right")  # [m]
    in_range = row_group < rhs.shape[0]
    w = rhs[jnp.clip(row_group, 0, rhs.shape[0] - 1)]  # [m, k, n]
    out = jnp.einsum("mk,mkn->mn", lhs.astype(jnp.float32), w.astype(jnp.float32))
    return jnp.where(in_range[:, None], out, 0.0).astype(lhs.dtype)
