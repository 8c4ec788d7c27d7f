"""CogViT: the vision encoder, a pre-norm ViT over NaFlex patch sequences.

Inputs (from `glm5v_jax.data.naflex`): `patches [B, N, P*P*3]`, `patch_yx [B, N, 2]`
(grid row, column) and `valid [B, N]`. Position enters only through 2D RoPE over
(y, x), so any grid shape works without resizing a position table. Padding is
excluded from attention and pooling, and padded rows of the output are zero.
A learnable mask token replaces the patch embedding where `mim_mask` is set
(masked-image distillation, stage 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.attention import Attention
from glm5v_jax.layers.mlp import MLP_TYPES
from glm5v_jax.layers.norms import RMSNorm
from glm5v_jax.layers.params import normal, param, zeros
from glm5v_jax.layers.rope import Rotary
from glm5v_jax.layers.stack import scan_layers, stacked
from glm5v_jax.models.specs import VisionSpec
from glm5v_jax.sharding.context import RESIDUAL, constrain


class VisionBlock(nnx.Module):
    """Pre-norm block: x + Attn(norm(x)); x + MLP(norm(x))."""

    def __init__(self, spec: VisionSpec, *, rngs: nnx.Rngs):
        d, dt, pdt = spec.embed_dim, spec.dtype, spec.param_dtype
        self.attn_norm = RMSNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(d, spec.num_heads, spec.num_heads, spec.head_dim, qkv_bias=spec.qkv_bias,
                              qk_norm=spec.qk_norm, norm_eps=spec.norm_eps, impl=spec.attention_impl,
                              dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp_norm = RMSNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP_TYPES[spec.mlp_type](d, spec.mlp_dim, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, rotary, segment_ids):
        x = x + self.attn(self.attn_norm(x), rotary=rotary, segment_ids=segment_ids, causal=False)
        return constrain(x + self.mlp(self.mlp_norm(x)), RESIDUAL)


class CogViT(nnx.Module):
    """NaFlex ViT with QK-Norm and 2D RoPE: patches `[B, N, P*P*3]` -> tokens `[B, N, D]`."""

    def __init__(self, spec: VisionSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, pdt = spec.embed_dim, spec.param_dtype
        patch_dim = spec.patch_size * spec.patch_size * 3
        self.patch_embed = param(rngs, nnx.initializers.lecun_normal(), (patch_dim, d), ("patch", "embed"), pdt)
        self.patch_bias = param(rngs, zeros(), (d,), ("embed",), pdt)
        self.mask_token = param(rngs, normal(0.02), (d,), ("embed",), pdt)
        self.blocks = stacked(lambda r: VisionBlock(spec, rngs=r), spec.depth, rngs)
        self.final_norm = RMSNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        # Each of y and x gets half of head_dim with the full frequency range.
        quarter = spec.head_dim // 4
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, (quarter, quarter), restart_per_section=True)

    def __call__(self, patches: jax.Array, patch_yx: jax.Array, valid: jax.Array,
                 mim_mask: jax.Array | None = None) -> jax.Array:
        """Encoded tokens `[B, N, D]` (zero at padding). mim_mask `[B, N]`: True = masked."""
        dt = self.spec.dtype
        x = patches.astype(dt) @ self.patch_embed[...].astype(dt) + self.patch_bias[...].astype(dt)
        if mim_mask is not None:
            x = jnp.where(mim_mask[..., None], self.mask_token[...].astype(dt), x)
        valid = valid.astype(bool)
        x = constrain(jnp.where(valid[..., None], x, 0), RESIDUAL)
        segment_ids = valid.astype(jnp.int32)
        rotary = self.rotary.cos_sin(patch_yx)

        def body(block, h):
            return block(h, rotary, segment_ids), None

        x, _ = scan_layers(self.blocks, x, body, remat=self.spec.remat)
        x = self.final_norm(x)
        return jnp.where(valid[..., None], x, 0).astype(dt)

    @staticmethod
    def pool(tokens: jax.Array, valid: jax.Array) -> jax.Array:
        """Mean over valid tokens: `[B, N, D] -> [B, D]` (padding excluded)."""
        w = valid.astype(jnp.float32)[..., None]
        return (jnp.sum(tokens.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(tokens.dtype)
