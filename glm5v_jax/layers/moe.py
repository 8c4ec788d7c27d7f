"""GLM-style mixture of experts: sigmoid router with auxiliary-loss-free balancing.

Routing (GLM-4.5 / DeepSeek-V3 `noaux_tc`):
  scores  = sigmoid(x W_router)                      (float32)
  chosen  = top_k(scores + correction_bias)          (bias used for selection only)
  weights = scores[chosen] / sum(scores[chosen]) * routed_scaling
  y       = sum_k weights_k * expert_k(x) + shared_expert(x)

The correction bias is a `RouterBias` variable (not an `nnx.Param`): the trainer
moves it with `update_router_bias` from the step's expert load, outside the
optimizer. The expert dispatch is picked by name from the table `MOE_IMPLS`
(`dense` computes every expert on every token, the exact reference; `ragged_dot`
sorts token slots by expert and runs grouped matmuls; both in `moe_dispatch.py`;
`expert_parallel`, in `moe_expert_parallel.py`, moves token slots to the devices
holding their experts with all_to_all under the active mesh; `pallas`, in
`moe_pallas.py`, runs the grouped matmuls with the Pallas kernel `glm5v_jax.kernels.gmm`).

Capacity: `capacity_factor` 0 is dropless. A factor f > 0 bounds the expert-parallel
exchange (`expert_parallel`, and `pallas` on a mesh with expert axes) at ceil(f * S / ep)
slots per destination; slots past it are dropped (they contribute zero). The dispatches
without an exchange drop nothing. The layer reports the dropped share of the T*k token-expert
slots (padding included) as `aux["dropped_fraction"]`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.mlp import SwiGLU
from glm5v_jax.layers.moe_dispatch import dense_dispatch, dropless, ragged_dot_dispatch
from glm5v_jax.layers.moe_expert_parallel import expert_parallel_dispatch
from glm5v_jax.layers.moe_pallas import pallas_dispatch
from glm5v_jax.layers.params import RouterBias, normal, param, zeros

# The expert dispatches, by `moe_impl` name:
# fn(x [T,H], idx [T,k], weights [T,k] f32, gate [E,H,I], up [E,H,I], down [E,I,H], *, capacity_factor)
#   -> (y [T,H], dropped token slots [] int32)
MOE_IMPLS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "dense": dropless(dense_dispatch),
    "ragged_dot": dropless(ragged_dot_dispatch),
    "expert_parallel": expert_parallel_dispatch,
    "pallas": pallas_dispatch,
}


def get_moe_impl(name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The dispatch listed as `name`; ConfigError naming `moe_impl` otherwise."""
    if name not in MOE_IMPLS:
        raise ConfigError("moe_impl", f"unknown implementation {name!r}; known: {sorted(MOE_IMPLS)}")
    return MOE_IMPLS[name]


def route(logits32: jax.Array, bias: jax.Array, top_k: int, routed_scaling: float):
    """(chosen experts [T,k], combine weights [T,k] f32, scores [T,E] f32)."""
    scores = jax.nn.sigmoid(logits32)
    _, idx = jax.lax.top_k(scores + bias.astype(jnp.float32), top_k)
    chosen = jnp.take_along_axis(scores, idx, axis=-1)
    weights = chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + 1e-20) * routed_scaling
    return idx, weights, scores


def replay_route(scores: jax.Array, idx: jax.Array, replay: jax.Array, routed_scaling: float):
    """Routing replay: the experts `replay [T,k]` chose (a rollout engine's, -1 where a token has no record)
    replace the router's own choice `idx [T,k]`; the combine weights are this router's scores at them, so the
    router still learns through them. (chosen experts [T,k], combine weights [T,k] f32)."""
    known = jnp.all(replay >= 0, axis=-1, keepdims=True)
    idx = jnp.where(known, replay.astype(idx.dtype), idx)
    chosen = jnp.take_along_axis(scores, idx, axis=-1)
    weights = chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + 1e-20) * routed_scaling
    return idx, weights


def update_router_bias(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """One auxiliary-loss-free balancing step: raise the bias of under-loaded experts.

    bias, expert_load: `[..., E]` (a layer stack gives `[L, E]`); load is the number
    (or fraction) of token slots each expert received in the step.
    """
    load = expert_load.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return (bias.astype(jnp.float32) + rate * jnp.sign(mean - load)).astype(bias.dtype)


def sequence_balance_loss(scores: jax.Array, mask: jax.Array, top_k: int) -> jax.Array:
    """DeepSeek-V3's complementary sequence-wise balance loss (unweighted), mean over rows.

    scores `[B, S, E]`: the router's un-biased affinities s (sigmoid, float32); mask
    `[B, S]`: tokens that count (padding 0). Per row (a packed row is the sequence) with
    T counted tokens:
        f_i = E / (k T) * sum_t 1(s_{i,t} in TopK({s_{j,t}}_j, k))    (un-biased top-k)
        P_i = 1/T * sum_t s_{i,t} / sum_j s_{j,t}
        L   = sum_i f_i P_i
    The indicator uses top-k of the un-biased scores s, as the paper writes it, not the
    bias-adjusted selection that routes the tokens: the correction bias never enters it.
    f carries no gradient (an indicator); P does.
    """
    num_experts = scores.shape[-1]
    mask = mask.astype(jnp.float32)
    _, top = jax.lax.top_k(scores, top_k)
    chosen = jax.nn.one_hot(top, num_experts, dtype=jnp.float32).sum(-2)  # [B, S, E]
    n_tok = jnp.maximum(mask.sum(-1), 1.0)[:, None]  # [B, 1]
    f = jnp.einsum("bse,bs->be", chosen, mask) * (num_experts / top_k) / n_tok
    probs = scores / scores.sum(-1, keepdims=True)
    p = jnp.einsum("bse,bs->be", probs, mask) / n_tok
    return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nnx.Module):
    """Routed SwiGLU experts plus always-on shared experts: `[B, S, E] -> [B, S, E]`."""

    def __init__(
        self,
        embed_dim: int,
        mlp_dim: int,
        num_experts: int,
        experts_per_token: int,
        *,
        num_shared_experts: int = 1,
        routed_scaling: float = 1.0,
        impl: str = "ragged_dot",
        capacity_factor: float = 0.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if not 1 <= experts_per_token <= num_experts:
            raise ConfigError("experts_per_token",
                              f"experts_per_token ({experts_per_token}) must be in [1, num_experts={num_experts}]")
        if capacity_factor < 0:
            raise ConfigError("capacity_factor", f"must be >= 0 (0 = dropless), got {capacity_factor}")
        get_moe_impl(impl)
        self.capacity_factor = capacity_factor
        self.num_experts, self.top_k = num_experts, experts_per_token
        self.routed_scaling, self.impl, self.dtype = routed_scaling, impl, dtype
        init = normal(init_std)
        self.router = param(rngs, init, (embed_dim, num_experts), ("embed", "exp_router"), jnp.float32)
        self.correction_bias = RouterBias(zeros()(None, (num_experts,), jnp.float32),
                                          out_sharding=("exp_router",), eager_sharding=False)
        self.gate = param(rngs, init, (num_experts, embed_dim, mlp_dim), ("exp", "embed", "mlp"), param_dtype)
        self.up = param(rngs, init, (num_experts, embed_dim, mlp_dim), ("exp", "embed", "mlp"), param_dtype)
        self.down = param(rngs, init, (num_experts, mlp_dim, embed_dim), ("exp", "mlp", "embed"), param_dtype)
        self.shared = (
            SwiGLU(embed_dim, mlp_dim * num_shared_experts, dtype=dtype, param_dtype=param_dtype,
                   init_std=init_std, rngs=rngs)
            if num_shared_experts else None
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None, *, return_expert_ids: bool = False,
                 replay_ids: jax.Array | None = None):
        """x `[B, S, E]`, token_mask `[B, S]` (padding excluded from load statistics); replay_ids `[B, S, top_k]`
        (optional): experts to route each token to instead of the router's choice (`replay_route`; -1: none).

        Returns (y, aux) with aux = {expert_load [E] (slots per expert, f32),
        balance_loss (DeepSeek-V3 sequence-wise loss per row, unweighted, counting the
        un-biased top-k: `sequence_balance_loss`)}; with `return_expert_ids` also the routed
        experts of every token, `expert_ids [B, S, top_k]` (generation records them for routing replay).
        """
        b, s, e = x.shape
        x = x.astype(self.dtype)
        flat = x.reshape(b * s, e)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        idx, weights, scores = route(logits, self.correction_bias[...], self.top_k, self.routed_scaling)
        if replay_ids is not None:
            idx, weights = replay_route(scores, idx, replay_ids.reshape(b * s, -1), self.routed_scaling)
        c = self.dtype
        y, dropped = get_moe_impl(self.impl)(flat, idx, weights, self.gate[...].astype(c), self.up[...].astype(c),
                                             self.down[...].astype(c), capacity_factor=self.capacity_factor)
        y = y.reshape(b, s, e)
        if self.shared is not None:
            y = y + self.shared(x)

        mask = jnp.ones((b, s), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        onehot = jax.nn.one_hot(idx, self.num_experts, dtype=jnp.float32).sum(1).reshape(b, s, -1)
        expert_load = jnp.einsum("bse,bs->e", onehot, mask)
        balance = sequence_balance_loss(scores.reshape(b, s, -1), mask, self.top_k)
        dropped_fraction = dropped.astype(jnp.float32) / idx.size
        aux = {"expert_load": expert_load, "balance_loss": balance, "dropped_fraction": dropped_fraction}
        if return_expert_ids:
            aux["expert_ids"] = idx.reshape(b, s, -1).astype(jnp.int32)
        return y.astype(self.dtype), aux
