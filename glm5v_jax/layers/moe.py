"""GLM-style mixture of experts: sigmoid router with auxiliary-loss-free balancing.

Routing (GLM-4.5 / DeepSeek-V3 `noaux_tc`):
  scores  = sigmoid(x W_router)                      (float32)
  chosen  = top_k(scores + correction_bias)          (bias used for selection only)
  weights = scores[chosen] / sum(scores[chosen]) * routed_scaling
  y       = sum_k weights_k * expert_k(x) + shared_expert(x)

The correction bias is a `RouterBias` variable (not an `nnx.Param`): the trainer
moves it with `update_router_bias` from the step's expert load, outside the
optimizer. The expert dispatch is picked by name from `MOE_IMPLS` (`dense`
computes every expert on every token, the exact reference; `ragged_dot` sorts
token slots by expert and runs grouped matmuls; `expert_parallel`, in
`moe_expert_parallel.py`, moves token slots to the devices holding their experts with
all_to_all under the active mesh; `pallas`, in `moe_pallas.py`, runs the grouped
matmuls with the Pallas kernel `glm5v_jax.kernels.gmm`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.mlp import SwiGLU
from glm5v_jax.layers.params import RouterBias, normal, param, zeros

# name -> fn(x [T,H], idx [T,k], weights [T,k] f32, gate [E,H,I], up [E,H,I], down [E,I,H]) -> [T,H]
MOE_IMPLS: dict[str, Callable[..., jax.Array]] = {}


def register_moe_impl(name: str):
    def deco(fn):
        MOE_IMPLS[name] = fn
        return fn
    return deco


def get_moe_impl(name: str) -> Callable[..., jax.Array]:
    if name not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {name!r}; known: {sorted(MOE_IMPLS)}")
    return MOE_IMPLS[name]


@register_moe_impl("dense")
def dense_dispatch(x, idx, weights, gate, up, down):
    """Every expert on every token, combined with a dense [T, E] weight matrix."""
    num_experts = gate.shape[0]
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
    h = jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate)) * jnp.einsum("th,ehi->tei", x, up)
    out = jnp.einsum("tei,eih->teh", h, down)
    return jnp.einsum("te,teh->th", combine.astype(out.dtype), out)


@register_moe_impl("ragged_dot")
def ragged_dot_dispatch(x, idx, weights, gate, up, down, *, grouped_matmul=jax.lax.ragged_dot):
    """Sort the T*k token slots by expert, grouped matmuls, unsort and combine.

    `grouped_matmul(lhs [m,k], rhs [G,k,n], group_sizes [G]) -> [m,n]`: `jax.lax.ragged_dot`
    here; the `pallas` dispatch passes the Pallas kernel `glm5v_jax.kernels.gmm`.
    """
    t, k = idx.shape
    num_experts = gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # slot positions grouped by expert
    xs = x[order // k]  # [T*k, H]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = jax.nn.silu(grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(xs, up, group_sizes)
    out_sorted = grouped_matmul(h, down, group_sizes)  # [T*k, H]
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(t, k, -1)
    return jnp.einsum("tk,tkh->th", weights.astype(out.dtype), out)


def route(logits32: jax.Array, bias: jax.Array, top_k: int, routed_scaling: float):
    """(chosen experts [T,k], combine weights [T,k] f32, scores [T,E] f32)."""
    scores = jax.nn.sigmoid(logits32)
    _, idx = jax.lax.top_k(scores + bias.astype(jnp.float32), top_k)
    chosen = jnp.take_along_axis(scores, idx, axis=-1)
    weights = chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + 1e-20) * routed_scaling
    return idx, weights, scores


def update_router_bias(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """One auxiliary-loss-free balancing step: raise the bias of under-loaded experts.

    bias, expert_load: `[..., E]` (a layer stack gives `[L, E]`); load is the number
    (or fraction) of token slots each expert received in the step.
    """
    load = expert_load.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return (bias.astype(jnp.float32) + rate * jnp.sign(mean - load)).astype(bias.dtype)


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
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token ({experts_per_token}) must be in [1, num_experts={num_experts}]")
        get_moe_impl(impl)
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

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
        """x `[B, S, E]`, token_mask `[B, S]` (padding excluded from load statistics).

        Returns (y, aux) with aux = {expert_load [E] (slots per expert, f32),
        balance_loss (DeepSeek-V3 sequence-wise loss, unweighted)}.
        """
        b, s, e = x.shape
        x = x.astype(self.dtype)
        flat = x.reshape(b * s, e)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        idx, weights, scores = route(logits, self.correction_bias[...], self.top_k, self.routed_scaling)
        c = self.dtype
        y = get_moe_impl(self.impl)(flat, idx, weights, self.gate[...].astype(c),
                                    self.up[...].astype(c), self.down[...].astype(c))
        y = y.reshape(b, s, e)
        if self.shared is not None:
            y = y + self.shared(x)

        mask = jnp.ones((b, s), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        onehot = jax.nn.one_hot(idx, self.num_experts, dtype=jnp.float32).sum(1).reshape(b, s, -1)
        expert_load = jnp.einsum("bse,bs->e", onehot, mask)
        # Sequence-wise balance loss: E/(k T) * sum_i f_i P_i per row, averaged over rows.
        n_tok = jnp.maximum(mask.sum(-1), 1.0)  # [B]
        f = jnp.einsum("bse,bs->be", onehot, mask) * (self.num_experts / (self.top_k * n_tok[:, None]))
        probs = (scores / scores.sum(-1, keepdims=True)).reshape(b, s, -1)
        p = jnp.einsum("bse,bs->be", probs, mask) / n_tok[:, None]
        balance = jnp.mean(jnp.sum(f * p, axis=-1))
        return y.astype(self.dtype), {"expert_load": expert_load, "balance_loss": balance}


# Register "expert_parallel" and "pallas" (imported last: they use `ragged_dot_dispatch` and
# `register_moe_impl`).
from glm5v_jax.layers import moe_expert_parallel  # noqa: E402, F401
from glm5v_jax.layers import moe_pallas  # noqa: E402, F401
