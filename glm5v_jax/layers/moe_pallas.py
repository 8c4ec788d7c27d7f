"""`moe_impl="pallas"`: the routing glue of `ragged_dot` with the Pallas grouped matmul.

Token slots are sorted by expert, run through `glm5v_jax.kernels.gmm` (gate, up, down),
unsorted and combined with the router weights: the same math as the `ragged_dot`
dispatch, so the two give the same result within kernel tolerance.

A Pallas kernel is one custom call the SPMD partitioner cannot split, so under an
active mesh the dispatch runs per device inside `jax.shard_map`:
  * expert axes > 1: the expert-parallel all_to_all dispatch (`moe_expert_parallel`)
    with the kernel as its local grouped matmul (the only case with an exchange buffer for
    `capacity_factor` to bound; elsewhere no slot is dropped);
  * otherwise: tokens split over the `activation_batch` axes, expert weights gathered
    (FSDP) except along the expert width, which stays split over the `mlp` axes
    (tensor parallelism; one psum at the end).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm5v_jax.kernels.gmm import gmm
from glm5v_jax.layers.moe_dispatch import ragged_dot_dispatch
from glm5v_jax.layers.moe_expert_parallel import expert_parallel_dispatch
from glm5v_jax.sharding import context


def pallas_dispatch(x, idx, weights, gate, up, down, *, capacity_factor: float = 0.0):
    """x [T,H], idx/weights [T,k], gate/up [E,H,I], down [E,I,H] -> (y [T,H], dropped slots [] int32)."""
    ctx = context.active()
    if ctx is not None and ctx.axis_size("exp") > 1:
        return expert_parallel_dispatch(x, idx, weights, gate, up, down, capacity_factor=capacity_factor,
                                        grouped_matmul=gmm)
    return _pallas_dropless(ctx, x, idx, weights, gate, up, down), jnp.zeros((), jnp.int32)


def _pallas_dropless(ctx, x, idx, weights, gate, up, down):
    """No expert axes: the kernel on one device, or per token shard with the expert width split."""
    if ctx is None:
        return ragged_dot_dispatch(x, idx, weights, gate, up, down, grouped_matmul=gmm)
    mesh = ctx.mesh
    batch_axes = context.dividing_axes(ctx.mesh_axes("activation_batch"), (x.shape[0],), mesh)
    mlp_axes = tuple(a for a in ctx.mesh_axes("mlp") if a not in batch_axes)
    mlp_axes = context.dividing_axes(mlp_axes, (gate.shape[-1],), mesh)

    def body(x, idx, weights, gate, up, down):
        y = ragged_dot_dispatch(x, idx, weights, gate, up, down, grouped_matmul=gmm)
        return jax.lax.psum(y, mlp_axes) if mlp_axes else y

    tok, m = P(context.axes_entry(batch_axes), None), context.axes_entry(mlp_axes)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(tok, tok, tok, P(None, None, m), P(None, None, m), P(None, m, None)),
        out_specs=tok, check_vma=False,
    )(x, idx, weights, gate, up, down)
