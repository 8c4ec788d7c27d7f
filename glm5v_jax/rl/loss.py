"""The RL policy loss on the VLM's outputs (what `glm5v_jax.train.step.train_step` takes as `loss_fn`).

The batch is `rl.batch.build_batch`'s (token-aligned `loss_mask`, `rollout_logp`, `advantages`) plus
`ref_logp` when a reference model runs (`reference_logprobs`: already on the predicting positions).
Position i predicts token i+1: the objective reads, at i, the model's log-probability of token i+1,
and token i+1's advantage, rollout log-probability and mask (`losses.lm.target_weights`: same
document, not a visual position, an answer token).

With one optimizer update per batch the "old" policy is the current one: `old_logp = sg(logp)`, so the
ratio is 1 in value and its gradient is the policy gradient; truncated importance sampling
(`ObjectiveSpec.tis_cap`) corrects for the rollout engine's (stale or numerically different)
log-probabilities. The MTP depths may keep learning the policy's own answers
(`mtp_loss_weight` x their cross-entropy on answer tokens; slime's MTP training during RL is opt-in too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glm5v_jax.losses.lm import moe_balance_loss, target_weights, token_cross_entropy, vlm_loss
from glm5v_jax.models.mmtp import shift_left
from glm5v_jax.rl.objectives import ObjectiveSpec, finalize, policy_loss


def next_token_logprobs(outputs, batch) -> jax.Array:
    """`[B, S]` f32: at position i, the main head's log-probability of token i+1 (0 at the last position)."""
    return -token_cross_entropy(outputs["logits"], shift_left(batch["tokens"], 1))


def rl_loss(outputs, batch, *, objective: ObjectiveSpec, mtp_loss_weight: float = 0.0,
            balance_loss_weight: float = 0.0, num_segments: int | None = None):
    """(loss, metrics) of `objective` on one batch; `metrics` are values (`rl/...`, `loss/...`)."""
    seg = batch["segment_ids"]
    w = target_weights(seg, outputs["is_visual"], 1, batch["loss_mask"]) > 0
    logp = next_token_logprobs(outputs, batch)
    ahead = {k: shift_left(batch[k], 1) for k in ("advantages", "rollout_logp", "version_lag")}
    loss_sum, count, parts = policy_loss(objective, logp, jax.lax.stop_gradient(logp), ahead["advantages"], w,
                                         seq_ids=seg, ref_logp=batch.get("ref_logp"),
                                         rollout_logp=ahead["rollout_logp"], num_segments=num_segments)
    loss = loss_sum / jnp.maximum(count, 1.0)
    metrics = {f"rl/{k}": v for k, v in finalize(parts).items()}
    n = jnp.maximum(jnp.sum(w), 1.0)
    metrics.update({"loss/policy": loss, "tokens/targets": jnp.sum(w),
                    "rl/entropy_proxy": -jnp.sum(jnp.where(w, logp, 0.0)) / n,  # mean NLL of the sampled tokens
                    "rl/version_lag": jnp.sum(jnp.where(w, ahead["version_lag"], 0.0)) / n})
    total = loss
    if mtp_loss_weight and outputs.get("mtp_logits"):
        _, lm = vlm_loss(outputs, batch, mtp_loss_weight=0.0)  # MTP cross-entropy on the answer tokens
        metrics["loss/mtp"] = lm["loss/mtp"]
        total = total + mtp_loss_weight * lm["loss/mtp"]
    balance, balance_metrics = moe_balance_loss(outputs)
    if balance is not None:
        metrics.update(balance_metrics)
        if balance_loss_weight:
            total = total + balance_loss_weight * balance
    metrics["loss/total"] = total
    return total, metrics
