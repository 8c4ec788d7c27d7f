"""Expert-parallel MoE dispatch: token slots travel to the devices that hold their experts.

Listed as `MOE_IMPLS["expert_parallel"]` in `glm5v_jax.layers.moe` (same signature as the other
dispatches: `fn(x [T,H], idx [T,k], weights [T,k] f32, gate [E,H,I], up [E,H,I], down [E,I,H], *,
capacity_factor) -> (y [T,H], dropped token slots [] int32)`).

Why: under plain GSPMD an expert-sharded `ragged_dot` makes the compiler gather the
expert weights (or all tokens) onto every device. Here the expert weights stay put and
only the routed token slots move, once out and once back, with `all_to_all` over the
mesh axes of the `exp` rule (the expert axes, size `ep`).

Inside `jax.shard_map` over the active mesh (`glm5v_jax.sharding.context.use_mesh_rules`):
  * x, idx, weights are split along T over the `activation_batch` axes (which must
    contain the expert axes), replicated along H: each device has T_l = T / n_batch tokens,
    S = T_l * k slots;
  * gate/up/down are split along E over the expert axes (E_l = E / ep local experts) and
    along I over the `mlp` axes not already used for tokens (tensor parallelism, a psum
    over them at the end); H is not split (FSDP shards are gathered at the boundary).
  * per device: slot s goes to expert rank `idx // E_l`; slots are packed into a send
    buffer `[ep, C, H]` (plus local expert ids `[ep, C]`, -1 marking empty rows),
    exchanged with `all_to_all`, sorted by local expert and run as grouped matmuls
    (`jax.lax.ragged_dot`; empty rows sort last, outside every group, and are masked to
    zero), sent back with the reverse `all_to_all`, unpacked and combined with the
    routing weights.

Buffers and cost: dropless by default (`capacity_factor=0`), C = S, so the send and receive
buffers are `[ep, S, H]` each (ep times the slots' size) and the grouped matmuls run over ep*S
rows, most of them padding; exact, but memory and FLOPs grow with ep. A capacity factor f > 0
(`BackboneSpec.capacity_factor`, `config.model.backbone.capacity_factor`) bounds
C = ceil(f * S / ep); slots beyond C for a destination rank are dropped (they contribute zero)
and the dispatch returns how many (the MoE layer reports the fraction as `dropped_fraction`).
`jax.lax.ragged_all_to_all` would avoid the padding but is not implemented by XLA:CPU
in this jax (0.10.2), so the padded `all_to_all` is used everywhere.

Falls back to the `ragged_dot` dispatch (identical results) outside `use_mesh_rules`
or when the expert axes have total size 1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.moe_dispatch import ragged_dot_dispatch
from glm5v_jax.sharding import context


def _capacity(slots: int, ep: int, factor: float) -> int:
    """Rows per destination rank in the send buffer (factor 0: dropless, all `slots`)."""
    if factor == 0:
        return slots
    return max(1, min(slots, math.ceil(factor * slots / ep)))


def _local_dispatch(x, idx, weights, gate, up, down, *, exp_axes, mlp_axes, batch_axes, ep, capacity,
                    grouped_matmul):
    """Per-device body: pack, all_to_all, grouped matmuls, all_to_all back, combine.

    x [T_l,H], idx/weights [T_l,k], gate/up [E_l,H,I_l], down [E_l,I_l,H] -> ([T_l,H], dropped [])
    """
    t, k = idx.shape
    h_dim = x.shape[-1]
    e_local = gate.shape[0]
    slots = t * k

    flat = idx.reshape(slots)
    dest = flat // e_local  # [S] expert rank holding the slot's expert
    local_e = flat % e_local  # [S] expert id on that rank
    # Position of each slot among the slots with the same destination (in slot order).
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)  # [S, ep]
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], axis=1)[:, 0] - 1  # [S]
    keep = pos < capacity  # [S]; out-of-range rows are dropped by the scatters below
    row = jnp.where(keep, pos, capacity)

    send_x = jnp.zeros((ep, capacity, h_dim), x.dtype).at[dest, row].set(x[jnp.arange(slots) // k], mode="drop")
    send_e = jnp.full((ep, capacity), -1, jnp.int32).at[dest, row].set(local_e, mode="drop")

    # recv[j] = the rows device j of the expert group sent to this device.
    recv_x = jax.lax.all_to_all(send_x, exp_axes, 0, 0).reshape(ep * capacity, h_dim)  # [R, H]
    recv_e = jax.lax.all_to_all(send_e, exp_axes, 0, 0).reshape(ep * capacity)  # [R]
    valid = recv_e >= 0
    sort_key = jnp.where(valid, recv_e, e_local)  # empty rows last, outside every group
    order = jnp.argsort(sort_key, stable=True)  # [R]
    xs = recv_x[order]
    group_sizes = jnp.bincount(sort_key, length=e_local + 1)[:e_local].astype(jnp.int32)
    hid = jax.nn.silu(grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(xs, up, group_sizes)
    out_sorted = grouped_matmul(hid, down, group_sizes)  # [R, H], partial over the mlp axes
    out_sorted = jnp.where(valid[order][:, None], out_sorted, 0)
    out_recv = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(ep, capacity, h_dim)

    back = jax.lax.all_to_all(out_recv, exp_axes, 0, 0)  # [ep, C, H]: results of this device's slots
    y_slots = back.at[dest, row].get(mode="fill", fill_value=0).reshape(t, k, h_dim)  # dropped slots -> 0
    y = jnp.einsum("tk,tkh->th", weights.astype(y_slots.dtype), y_slots)
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    dropped = jnp.sum(~keep).astype(jnp.int32)
    if batch_axes:
        dropped = jax.lax.psum(dropped, batch_axes)
    return y, dropped


def expert_parallel_dispatch(x, idx, weights, gate, up, down, *, capacity_factor: float = 0.0,
                             grouped_matmul=jax.lax.ragged_dot):
    """(y [T,H], number of dropped token slots [] int32) — see the module docstring.

    capacity_factor: 0 = dropless (exact); f > 0 bounds each send buffer at ceil(f * S / ep) rows.
    grouped_matmul: the local expert matmul (`jax.lax.ragged_dot`, or the Pallas `gmm`).
    """
    if capacity_factor < 0:
        raise ConfigError("capacity_factor", f"must be >= 0 (0 = dropless), got {capacity_factor}")
    ctx = context.active()
    exp_axes = ctx.mesh_axes("exp") if ctx is not None else ()
    ep = ctx.axis_size("exp") if ctx is not None else 1
    if ep == 1:
        return (ragged_dot_dispatch(x, idx, weights, gate, up, down, grouped_matmul=grouped_matmul),
                jnp.zeros((), jnp.int32))

    batch_axes = ctx.mesh_axes("activation_batch")
    missing = [a for a in exp_axes if a not in batch_axes]
    if missing:
        raise ConfigError("config.mesh.rules.activation_batch",
                          f"moe_impl='expert_parallel' splits tokens over config.mesh.rules.activation_batch "
                          f"{batch_axes}, which must contain the expert axes of rule 'exp' {exp_axes}; "
                          f"missing {tuple(missing)}")
    n_batch = ctx.axis_size("activation_batch")
    t, k = idx.shape
    num_experts = gate.shape[0]
    if t % n_batch:
        raise ConfigError("config.mesh.rules.activation_batch",
                          f"moe_impl='expert_parallel': the {t} tokens (batch*seq) are not divisible by the "
                          f"{n_batch} devices of config.mesh.rules.activation_batch {batch_axes}")
    if num_experts % ep:
        raise ConfigError("config.model.backbone.num_experts",
                          f"moe_impl='expert_parallel': {num_experts} experts are not divisible by the "
                          f"{ep} devices of rule 'exp' {exp_axes}")
    mlp_axes = tuple(a for a in ctx.mesh_axes("mlp") if a not in batch_axes)
    n_mlp = math.prod(ctx.mesh.shape[a] for a in mlp_axes)
    if gate.shape[-1] % n_mlp:
        mlp_axes = ()  # width not divisible: no tensor parallelism inside the experts
    capacity = _capacity(t // n_batch * k, ep, capacity_factor)

    tok = P(context.axes_entry(batch_axes), None)
    e_spec, m_spec = context.axes_entry(exp_axes), context.axes_entry(mlp_axes)

    def body(x, idx, weights, gate, up, down):
        return _local_dispatch(x, idx, weights, gate, up, down, exp_axes=exp_axes, mlp_axes=mlp_axes,
                               batch_axes=batch_axes, ep=ep, capacity=capacity, grouped_matmul=grouped_matmul)

    fn = jax.shard_map(
        body, mesh=ctx.mesh,
        in_specs=(tok, tok, tok, P(e_spec, None, m_spec), P(e_spec, None, m_spec), P(e_spec, m_spec, None)),
        out_specs=(tok, P()),
        # A Pallas kernel (the `pallas` dispatch's gmm) carries no varying-axes annotation.
        check_vma=grouped_matmul is jax.lax.ragged_dot,
    )
    return fn(x, idx, weights, gate, up, down)
