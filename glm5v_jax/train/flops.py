"""Analytic training FLOPs per step and device peak FLOP/s, for MFU.

FLOPs count matmuls only (2 per multiply-add), forward plus backward (x3):
6 * active matmul parameters * tokens for every linear layer, plus attention's
score and value products (12 * layers * S * attended-dims per token, halved for
causal), for the decoder, the MTP depths and the vision tower.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.models.specs import VLMSpec

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def _decoder_layer_matmul_params(spec, moe: bool) -> int:
    h, hd = spec.embed_dim, spec.head_dim
    attn = h * hd * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    if moe:
        mlp = 3 * h * spec.moe_mlp_dim * (spec.experts_per_token + spec.num_shared_experts) + h * spec.num_experts
    else:
        mlp = 3 * h * spec.mlp_dim
    return attn + mlp


def train_flops_per_step(spec: VLMSpec, *, rows: int, seq_len: int, images: int, patches_per_image: int) -> float:
    """Training FLOPs of one step for a batch of `rows x seq_len` tokens and `images` images."""
    bb, v = spec.backbone, spec.vision
    tokens = rows * seq_len
    dec = bb.first_k_dense * _decoder_layer_matmul_params(bb, False) + \
        bb.num_moe_layers * _decoder_layer_matmul_params(bb, True)
    head = bb.embed_dim * bb.vocab_size
    mtp_moe = spec.mtp.moe_block if spec.mtp.moe_block is not None else bb.num_moe_layers > 0
    mtp = spec.mtp.num_depths * (_decoder_layer_matmul_params(bb, mtp_moe) + 2 * bb.embed_dim**2 + head)
    # causal: half the scores, times 2 products (QK^T and PV)
    attn_dec = (bb.num_layers + spec.mtp.num_depths) * 2 * seq_len * bb.num_heads * bb.head_dim
    flops = 6 * tokens * (dec + head + mtp) + 3 * tokens * attn_dec
    n_vis = images * patches_per_image
    mlp_mult = 3 if v.mlp_type == "swiglu" else 2
    vit = v.depth * (4 * v.embed_dim**2 + mlp_mult * v.embed_dim * v.mlp_dim) + v.patch_size**2 * 3 * v.embed_dim
    proj = (v.merge_size**2 * v.embed_dim + bb.embed_dim) * bb.embed_dim / v.merge_size**2
    attn_vit = v.depth * 4 * patches_per_image * v.embed_dim
    flops += 6 * n_vis * (vit + proj) + 3 * n_vis * attn_vit
    return float(flops)


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this host (the CPU 'peak' for MFU)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_cpu_peak_flops(), "measured f32 matmul on CPU"
    kind = getattr(dev, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak, f"table: {name}"
    return float("nan"), f"unknown device kind {kind!r}"
