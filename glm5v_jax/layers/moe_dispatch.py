"""The single-device MoE expert dispatches, shared by every dispatch variant.

`dense_dispatch` computes every expert on every token (the exact reference);
`ragged_dot_dispatch` sorts token slots by expert and runs grouped matmuls. The
expert-parallel and Pallas dispatches (`moe_expert_parallel.py`, `moe_pallas.py`) build
on `ragged_dot_dispatch`; the table of all of them is `glm5v_jax.layers.moe.MOE_IMPLS`.

Both take x [T,H], idx [T,k] (chosen experts), weights [T,k] f32 (combine weights),
gate [E,H,I], up [E,H,I], down [E,I,H] and return y [T,H]; they never drop a slot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_dispatch(x, idx, weights, gate, up, down):
    """Every expert on every token, combined with a dense [T, E] weight matrix."""
    num_experts = gate.shape[0]
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
    h = jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate)) * jnp.einsum("th,ehi->tei", x, up)
    out = jnp.einsum("tei,eih->teh", h, down)
    return jnp.einsum("te,teh->th", combine.astype(out.dtype), out)


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


def dropless(fn):
    """`fn` (a dispatch returning y) in the table's form: `(x, idx, weights, gate, up, down, *,
    capacity_factor=0.0) -> (y, dropped slots [] int32 = 0)`. It has no exchange buffer to bound,
    so the capacity factor has nothing to limit."""

    def dispatch(x, idx, weights, gate, up, down, *, capacity_factor: float = 0.0):
        del capacity_factor
        return fn(x, idx, weights, gate, up, down), jnp.zeros((), jnp.int32)

    dispatch.__name__ = dispatch.__qualname__ = f"dropless_{fn.__name__}"
    dispatch.__doc__ = fn.__doc__
    return dispatch
