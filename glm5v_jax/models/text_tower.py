"""The text tower of CogViT's contrastive stage 2: a small pre-norm transformer over token ids.

    tokens [B, L] -> token embedding -> depth x [x + Attn(norm(x)); x + MLP(norm(x))]
    -> final norm -> masked mean over the caption's tokens -> [B, D]

Which tokens count. The project tokenizer uses one id (`<|endoftext|>`) as both eos and pad,
and the image-batch pipeline writes `caption ids, eos, pad, pad, ...`. When `eos_id == pad_id`
the caption is therefore every token up to and including the first pad-id token (so the eos is
part of it); otherwise every token that is not `pad_id`. Tokens outside the caption are never
attended to (keys masked through segment ids), their outputs are zeroed and they do not enter
the pool, so the pooled vector does not depend on how much padding follows the caption.

Positions: 1D RoPE (`glm5v_jax.layers.rope`) over the token index, as in the GLM backbone and
(2D) in CogViT. There is no position table tied to a maximum length, so `text_len` may differ
between training, prompts and evaluation, and a caption's positions do not depend on the padding.

Pooling: the masked mean over the caption's tokens. The encoder is bidirectional, so there is
no reason to read one special position ("last token" pooling, as causal CLIP text towers do);
the mean gives every token a direct gradient, which helps a tiny tower trained for a few hundred
steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import require
from glm5v_jax.layers.attention import ATTENTION_IMPLS
from glm5v_jax.layers.mlp import MLP_TYPES
from glm5v_jax.layers.norms import RMSNorm
from glm5v_jax.layers.params import normal, param
from glm5v_jax.layers.rope import Rotary
from glm5v_jax.models.cogvit import VisionBlock  # the same pre-norm block; reads the spec's shared fields
from glm5v_jax.layers.stack import scan_layers, stacked


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Shape and numerics of the text tower. `vocab_size`, `pad_id`, `eos_id` come from the tokenizer."""

    vocab_size: int
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 2
    mlp_dim: int = 512
    mlp_type: str = "gelu"
    pad_id: int = 0
    eos_id: int = 0
    rope_theta: float = 10_000.0
    qk_norm: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                f"unknown implementation {self.attention_impl!r}; known: {sorted(ATTENTION_IMPLS)}")
        for f in ("vocab_size", "embed_dim", "depth", "num_heads", "mlp_dim"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        require(self.embed_dim % self.num_heads == 0, "num_heads",
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        require(self.head_dim % 2 == 0, "num_heads", f"head_dim {self.head_dim} must be even for RoPE")
        require(self.mlp_type in MLP_TYPES, "mlp_type",
                f"unknown mlp_type {self.mlp_type!r}; expected {sorted(MLP_TYPES)}")
        require(0 <= self.pad_id < self.vocab_size, "pad_id", f"{self.pad_id} is outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def caption_mask(tokens: jax.Array, pad_id: int, eos_id: int) -> jax.Array:
    """`[B, L]` bool: the caption's tokens (see the module docstring for the eos == pad case)."""
    is_pad = tokens == pad_id
    if pad_id != eos_id:
        return ~is_pad
    pads_before = jnp.cumsum(is_pad.astype(jnp.int32), axis=-1) - is_pad.astype(jnp.int32)
    return pads_before == 0  # up to and including the first pad (= eos) token


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x [B, L, D]` over the positions where `mask [B, L]` is set, in float32."""
    w = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)


class TextEncoder(nnx.Module):
    """Token ids `[B, L]` -> (token outputs `[B, L, D]`, zero outside the caption; caption mask `[B, L]`)."""

    def __init__(self, spec: TextSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = param(rngs, normal(0.02), (spec.vocab_size, spec.embed_dim), ("vocab", "embed"),
                           spec.param_dtype)
        self.blocks = stacked(lambda r: VisionBlock(spec, rngs=r), spec.depth, rngs)
        self.final_norm = RMSNorm(spec.embed_dim, eps=spec.norm_eps, param_dtype=spec.param_dtype, rngs=rngs)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = self.spec
        mask = caption_mask(tokens, s.pad_id, s.eos_id)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(s.dtype)
        x = jnp.where(mask[..., None], x, 0)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)[..., None]
        rotary = self.rotary.cos_sin(positions)
        segment_ids = mask.astype(jnp.int32)

        def body(block, h):
            return block(h, rotary, segment_ids), None

        x, _ = scan_layers(self.blocks, x, body, remat=s.remat)
        x = self.final_norm(x)
        return jnp.where(mask[..., None], x, 0).astype(s.dtype), mask

    def pool(self, tokens: jax.Array) -> jax.Array:
        """Pooled caption features `[B, D]` (float32): the masked mean of the outputs."""
        out, mask = self(tokens)
        return masked_mean(out, mask)
