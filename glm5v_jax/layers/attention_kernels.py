"""Kernel-backed attention cores: `attention_impl = "pallas" | "cudnn"`.

Listed in `glm5v_jax.layers.attention.ATTENTION_IMPLS` (this module does not import it).

`pallas`: `glm5v_jax.kernels.flash_attention` (TPU Mosaic kernel, GPU Triton kernel,
interpreted TPU kernel on CPU; picked per platform at lowering time). A Pallas kernel
is a custom call the SPMD partitioner cannot split, so under an active mesh it runs
per device inside `jax.shard_map`: batch over the `activation_batch` axes and heads
over the `activation_heads` axes (where they divide both the query and the K/V head
counts, so each device keeps whole GQA groups); the sequence stays whole.

`cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` when the default
backend is a GPU (segments become a boolean mask; padding rows are zeroed after),
and the `xla` reference everywhere else, so a config written for GPUs still runs on
a CPU or TPU host. The choice is made at trace time from `jax.default_backend()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm5v_jax.kernels.flash_attention import flash_attention
from glm5v_jax.kernels.reference import attention_reference
from glm5v_jax.sharding import context


def pallas_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, scale=None):
    """q `[B,S,H,D]`, k/v `[B,T,KV,D]` -> `[B,S,H,D]` through the Pallas flash kernel."""
    has_seg = q_segment_ids is not None

    def core(q, k, v, *seg):
        qs, ks = seg if has_seg else (None, None)
        return flash_attention(q, k, v, causal=causal, q_segment_ids=qs, kv_segment_ids=ks, scale=scale)

    seg_args = (q_segment_ids, kv_segment_ids) if has_seg else ()
    ctx = context.active()
    if ctx is None:
        return core(q, k, v, *seg_args)
    mesh = ctx.mesh
    batch = context.dividing_axes(ctx.mesh_axes("activation_batch"), (q.shape[0],), mesh)
    heads = tuple(a for a in ctx.mesh_axes("activation_heads") if a not in batch)
    heads = context.dividing_axes(heads, (q.shape[2], k.shape[2]), mesh)
    batch, heads = context.axes_entry(batch), context.axes_entry(heads)
    x_spec, seg_spec = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        core, mesh=mesh, in_specs=(x_spec, x_spec, x_spec) + (seg_spec,) * len(seg_args),
        out_specs=x_spec, check_vma=False,
    )(q, k, v, *seg_args)


def cudnn_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, scale=None):
    """cuDNN fused attention on GPU; the jnp reference elsewhere (see the module docstring)."""
    if jax.default_backend() != "gpu":
        return attention_reference(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, scale=scale)
    mask = None
    if q_segment_ids is not None:
        qs, ks = q_segment_ids, kv_segment_ids
        mask = (qs[:, None, :, None] == ks[:, None, None, :]) & (qs != 0)[:, None, :, None]  # [B,1,S,T]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn")
    if q_segment_ids is not None:
        out = jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(out.dtype)
    return out
