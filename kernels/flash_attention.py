"""`flash_attention`: one entry point, a Pallas kernel per backend.

    out = flash_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)

q `[B, S, H, D]`, k and v `[B, T, KV, D]` (H a multiple of KV; GQA without repeating
K/V), segment ids `[B, S]` / `[B, T]` int32 with 0 = padding; returns `[B, S, H, D]`.
Conventions and the ground truth: `glm5v_jax.kernels.reference.attention_reference`.

Backend choice (`backend=None`) happens at lowering time with
`jax.lax.platform_dependent`, so one jitted function serves every platform and an
ahead-of-time compile for TPU from a CPU host gets the TPU kernel:
  tpu   -> `flash_attention_tpu` (Mosaic);
  cuda  -> `flash_attention_gpu` (Pallas Triton);
  cpu   -> the TPU kernel under the HLO interpreter (slow; tests, notebooks);
  other -> the pure-jnp reference.
`backend="tpu" | "gpu"` forces one kernel; `interpret=True` (or a
`pltpu.InterpretParams`) runs the chosen kernel (TPU by default) in an interpreter.
Since every branch is traced, `block_sizes` must be legal for all of them, or be a
mapping `{"tpu": BlockSizes, "gpu": BlockSizes}`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax

from glm5v_jax.kernels.attention_common import BlockSizes
from glm5v_jax.kernels.dispatch import for_backend, run_on_platform
from glm5v_jax.kernels.flash_attention_tpu import flash_attention_tpu
from glm5v_jax.kernels.reference import attention_reference


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | Mapping[str, BlockSizes] | None = None,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:
    """Flash attention forward (and, through its custom VJP, backward); see the module docstring."""
    kw = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)

    def gpu():
        from glm5v_jax.kernels.flash_attention_gpu import flash_attention_gpu  # Triton; imported on use

        return functools.partial(flash_attention_gpu, block_sizes=for_backend(block_sizes, "gpu", "block_sizes"), **kw)

    return run_on_platform(
        (q, k, v),
        tpu=functools.partial(flash_attention_tpu, block_sizes=for_backend(block_sizes, "tpu", "block_sizes"), **kw),
        gpu=gpu, fallback=functools.partial(attention_reference, **kw), backend=backend, interpret=interpret)
