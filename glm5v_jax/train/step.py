"""The VLM pre-training step: loss, gradients, optimizer update, router-bias update.

Kept separate from the stage trainer so benchmarks, notebooks and the sharding
tools compile exactly the step that training runs.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm5v_jax.layers.moe import update_router_bias
from glm5v_jax.losses.lm import vlm_loss
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.muon import OrthogonalizeState
from glm5v_jax.optim.qk_clip import qk_clip_metrics
from glm5v_jax.optim.routing import path_key


def make_optimizer(model: GLM5V, learning_rate: float, weight_decay: float = 0.1) -> nnx.Optimizer:
    """AdamW over `nnx.Param` only (the router correction bias is not optimized)."""
    return nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=nnx.Param)


def update_router_biases(model: GLM5V, outputs, rate: float) -> None:
    """Aux-loss-free balancing for the backbone's MoE layers and the MTP MoE blocks."""
    load = outputs["aux"].get("expert_load")
    if load is not None:
        model.backbone.update_router_biases(load, rate)
    for depth, aux in zip(model.mtp.depths if model.mtp is not None else (), outputs.get("mtp_aux", ())):
        if "expert_load" in aux:
            bias = depth.block.mlp.correction_bias
            bias[...] = update_router_bias(bias[...], aux["expert_load"], rate)


def loss_and_outputs(model: GLM5V, batch, mtp_loss_weight: float, balance_loss_weight: float,
                     loss_fn: Callable | None = None):
    """(loss, (metrics, outputs)) of `model(batch)`: `loss_fn(outputs, batch) -> (loss, metrics)`, by default
    the pre-training objective (`vlm_loss` with the two weights)."""
    outputs = model(batch)
    if loss_fn is None:
        loss, metrics = vlm_loss(outputs, batch, mtp_loss_weight=mtp_loss_weight,
                                 balance_loss_weight=balance_loss_weight)
    else:
        loss, metrics = loss_fn(outputs, batch)
    return loss, (metrics, outputs)


def update_statistics(before, after, labels: Mapping[tuple[str, ...], str]) -> dict:
    """`optim/update_rms/<label>`: RMS of the parameter change per label (e.g. "text/muon")."""
    sums: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}

    def visit(path, b, a):
        label = labels[path_key(path)]
        d = (a - b).astype(jnp.float32)
        sums[label] = sums.get(label, 0.0) + jnp.sum(d * d)
        counts[label] = counts.get(label, 0) + d.size

    jax.tree_util.tree_map_with_path(visit, before, after)
    # float(count): a group of a 100B model has more elements than int32 holds
    return {f"optim/update_rms/{k}": jnp.sqrt(sums[k] / float(counts[k])) for k in sorted(sums)}


def optimizer_statistics(opt_state) -> dict:
    """`optim/ortho_error`: the sampled Newton-Schulz orthogonality error, when Muon runs."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, OrthogonalizeState))
             if isinstance(s, OrthogonalizeState)]
    if not found:
        return {}
    err = found[0].ortho_error
    return {"optim/ortho_error": err[...] if isinstance(err, nnx.Variable) else err}


def train_step(model: GLM5V, optimizer: nnx.Optimizer, batch, *, mtp_loss_weight: float = 0.3,
               balance_loss_weight: float = 0.0, router_bias_rate: float = 1e-3,
               update_labels: Mapping[tuple[str, ...], str] | None = None, qk_clip_tau: float = 0.0,
               loss_fn: Callable | None = None):
    """One optimisation step in place on (model, optimizer); returns metrics.

    `loss_fn(outputs, batch) -> (loss, metrics)` replaces the pre-training objective (the RL stage's
    policy loss); the weights above then only reach it through the caller.
    `update_labels` ({parameter path: label}) adds the update RMS per label.
    `qk_clip_tau` > 0: the optimizer ends with `glm5v_jax.optim.qk_clip.qk_clip` and gets
    this step's per-head max logits (the model must track them).
    """
    grad_fn = nnx.value_and_grad(loss_and_outputs, has_aux=True)
    (loss, (metrics, outputs)), grads = grad_fn(model, batch, mtp_loss_weight, balance_loss_weight, loss_fn)
    # Values (new Variable objects), not the live variables the update writes into.
    before = jax.tree.map(lambda v: v, nnx.state(model, nnx.Param)) if update_labels is not None else None
    extra = {}
    if "attn_max_logits" in outputs["aux"]:
        max_logits = jax.lax.stop_gradient(model.attention_max_logits(outputs))
        metrics.update(qk_clip_metrics(max_logits, qk_clip_tau or float("inf")))
        if qk_clip_tau > 0:
            extra["max_logits"] = max_logits
    elif qk_clip_tau > 0:
        raise ValueError("QK-Clip needs the per-head max logits: set config.model.backbone.track_max_logits")
    optimizer.update(model, grads, **extra)
    if update_labels is not None:
        metrics.update(update_statistics(before, nnx.state(model, nnx.Param), update_labels))
    metrics.update(optimizer_statistics(optimizer.opt_state))
    outputs = jax.lax.stop_gradient(outputs)
    update_router_biases(model, outputs, router_bias_rate)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics.update(moe_statistics(model, outputs))
    return metrics


def moe_statistics(model: GLM5V, outputs) -> dict:
    """Expert-load imbalance (max / mean slots per expert, averaged over MoE layers) and
    correction-bias statistics of the backbone's MoE layers."""
    load = outputs["aux"].get("expert_load")
    if load is None:
        return {}
    mean = jnp.maximum(load.mean(-1), 1e-9)
    bias = model.backbone.moe_layers.mlp.correction_bias[...]
    return {
        "moe/load_max_over_mean": jnp.mean(load.max(-1) / mean),
        "moe/load_min_over_mean": jnp.mean(load.min(-1) / mean),
        "moe/bias_abs_mean": jnp.mean(jnp.abs(bias)),
        "moe/bias_std": jnp.mean(jnp.std(bias, axis=-1)),
    }


jit_train_step = nnx.jit(train_step, static_argnames=("mtp_loss_weight", "balance_loss_weight", "router_bias_rate"))
