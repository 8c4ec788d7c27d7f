"""Next-token and multi-token-prediction losses over packed, multimodal rows.

A target at position i is token i+shift (shift 1 for the main head, k+1 for MTP
depth k). It counts only when position i is in the stream (non-padding, or in
the MTP stream of that depth), token i+shift is in the same document, is not a
visual position, and is marked in `loss_mask` (when given). Losses are means
over counted targets.

    total = L_main + loss_weight / D * sum_k L_mtp^k  (+ balance_weight * balance_loss)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glm5v_jax.models.mmtp import shift_left


def target_weights(segment_ids, is_visual, shift, loss_mask=None, stream_segments=None):
    """(targets-aligned weights `[B, S]` float32) for predicting token i+shift at i."""
    seg = segment_ids if stream_segments is None else stream_segments
    w = (seg != 0) & (shift_left(segment_ids, shift) == seg)
    w &= ~shift_left(is_visual, shift, fill=True)
    if loss_mask is not None:
        w &= shift_left(loss_mask.astype(bool), shift, fill=False)
    return w.astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy `[B, S]` in float32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def per_segment_mean(values: jax.Array, weights: jax.Array, segment_ids: jax.Array, num_segments: int):
    """Mean of `values` over each row's segments 1..num_segments: `[B, num_segments]`."""
    onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # seg 0 -> zeros
    sums = jnp.einsum("bs,bsn->bn", values * weights, onehot)
    counts = jnp.einsum("bs,bsn->bn", weights, onehot)
    return sums / jnp.maximum(counts, 1.0)


def vlm_loss(outputs, batch, *, mtp_loss_weight: float = 0.3, balance_loss_weight: float = 0.0):
    """(total loss, metrics) from `GLM5V.__call__` outputs and the batch."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    is_visual, loss_mask = outputs["is_visual"], batch.get("loss_mask")
    w = target_weights(seg, is_visual, 1, loss_mask)
    main = masked_mean(token_cross_entropy(outputs["logits"], shift_left(tokens, 1)), w)
    metrics = {"loss/main": main, "tokens/targets": jnp.sum(w)}
    total = main
    mtp_logits = outputs.get("mtp_logits") or []
    if mtp_logits:
        mtp_losses = []
        for k, (lg, seg_k) in enumerate(zip(mtp_logits, outputs["mtp_segments"]), start=1):
            wk = target_weights(seg, is_visual, k + 1, loss_mask, stream_segments=seg_k)
            lk = masked_mean(token_cross_entropy(lg, shift_left(tokens, k + 1)), wk)
            metrics[f"loss/mtp_{k}"] = lk
            mtp_losses.append(lk)
        mtp = sum(mtp_losses) / len(mtp_losses)
        metrics["loss/mtp"] = mtp
        total = total + mtp_loss_weight * mtp
    balance = outputs["aux"].get("balance_loss")
    if balance is not None:
        metrics["loss/balance"] = balance
        if balance_loss_weight:
            total = total + balance_loss_weight * balance
    metrics["loss/total"] = total
    return total, metrics
