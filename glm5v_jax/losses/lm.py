"""Next-token and multi-token-prediction losses over packed, multimodal rows.

A target at position i is token i+shift (shift 1 for the main head, k+1 for MTP
depth k). It counts only when position i is in the stream (non-padding, or in
the MTP stream of that depth), token i+shift is in the same document, is not a
visual position, and is marked in `loss_mask` (when given). Losses are means
over counted targets.

    total = L_main + loss_weight / D * sum_k L_mtp^k  (+ balance_weight * balance_loss)

balance_loss is the DeepSeek-V3 sequence-wise balance loss averaged over every MoE
layer of the model: the backbone's MoE layers and the MoE blocks of the MTP depths
(`moe_balance_loss`).
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


def moe_balance_loss(outputs) -> tuple[jax.Array | None, dict]:
    """(balance loss of all MoE layers, metrics) from `GLM5V.__call__` outputs; None without MoE.

    Every MoE layer counts once, whether in the backbone or in an MTP depth's block: as in
    Megatron-Core, where an MTP layer's MoE router adds its auxiliary loss with the same
    coefficient as a decoder layer's (its aux-loss tracker has num_layers + mtp_num_layers
    slots), and not scaled by the MTP loss weight. Megatron sums the layers' losses; this
    averages them (the backbone reports its mean over `L` layers), so `balance_loss_weight`
    keeps the meaning it has without MTP:
        (L * mean_backbone + sum_k balance_mtp_k) / (L + number of MoE MTP blocks).
    """
    parts, counts, metrics = [], [], {}
    aux = outputs["aux"]
    if aux.get("balance_loss") is not None:
        layers = aux["expert_load"].shape[0]  # [L_moe, E]
        parts.append(aux["balance_loss"] * layers)
        counts.append(layers)
        metrics["loss/balance_backbone"] = aux["balance_loss"]
    for k, depth_aux in enumerate(outputs.get("mtp_aux") or (), start=1):
        if depth_aux.get("balance_loss") is not None:
            parts.append(depth_aux["balance_loss"])
            counts.append(1)
            metrics[f"loss/balance_mtp_{k}"] = depth_aux["balance_loss"]
    if not parts:
        return None, metrics
    return sum(parts) / sum(counts), metrics


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
    balance, balance_metrics = moe_balance_loss(outputs)
    if balance is not None:
        metrics.update(balance_metrics)
        metrics["loss/balance"] = balance
        if balance_loss_weight:
            total = total + balance_loss_weight * balance
    if outputs["aux"].get("dropped_fraction") is not None:  # token-expert slots over the MoE capacity
        metrics["moe/dropped_fraction"] = outputs["aux"]["dropped_fraction"]
    metrics["loss/total"] = total
    return total, metrics
