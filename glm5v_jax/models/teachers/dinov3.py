"""DINOv3 ViT as a frozen teacher over NaFlex patch sequences (CogViT's dense distillation target).

Inputs are the student's (`glm5v_jax.data.naflex`): `patches [B, N, P*P*3]` in [-1, 1], each
patch flattened (p, p, C) row-major, `patch_yx [B, N, 2]` int grid (row, col) and `valid [B, N]`;
one image per row, rows of different grids padded to N. DINOv3 sees ImageNet-normalised pixels,
so `normalize_pixels` maps [-1, 1] -> [0, 1] -> (x - mean) / std per channel first.

Architecture (DINOv3 ViT-S/S+/B/L/H+, patch 16): the conv patch embedding as a Dense over the
flattened patch; tokens = [CLS, registers, patches]; no absolute position embedding, position
only through axial 2D RoPE on patch tokens (prefix tokens unrotated) with patch centres
normalised by each image's own grid to [-1, 1]; pre-LN blocks (LayerNorm eps 1e-5) with
qkv bias but no key bias (`mask_k_bias`), LayerScale, a GELU (erf) MLP or a SwiGLU FFN with
biases; a final LayerNorm. Padding is excluded from attention as keys; its outputs are zero.

Matmuls run in `spec.dtype` (bfloat16 for teachers), the residual stream, norms and RoPE in
float32; parameters are `spec.param_dtype`. Outputs are float32 and carry no gradient.
Checkpoints load through `glm5v_jax.models.teachers.dinov3_loaders`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm5v_jax.errors import ConfigError, require
from glm5v_jax.layers.attention import ATTENTION_IMPLS, Attention
from glm5v_jax.layers.norms import LayerNorm
from glm5v_jax.layers.params import normal, ones, param, zeros
from glm5v_jax.layers.stack import scan_layers, stacked
from glm5v_jax.models.specs import as_dtype
from glm5v_jax.sharding.context import RESIDUAL, constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFN_TYPES = ("mlp", "swiglu")


@dataclasses.dataclass(frozen=True)
class DINOv3Spec:
    """A DINOv3 ViT. `ffn`: 'mlp' (GELU, hidden = int(width * ffn_ratio)) or 'swiglu'
    (hidden = int(int(width * ffn_ratio) * 2/3) rounded up to `swiglu_align`, DINOv3's rule)."""

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"
    ffn_ratio: float = 4.0
    swiglu_align: int = 8
    num_register_tokens: int = 4
    patch_size: int = 16
    rope_base: float = 100.0
    layerscale: bool = True
    qkv_bias: bool = True
    mask_k_bias: bool = True  # the key bias is masked to zero (absent here and in HF checkpoints)
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("width", "depth", "num_heads", "patch_size", "swiglu_align"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        require(self.num_register_tokens >= 0, "num_register_tokens", "must be >= 0")
        require(self.ffn_ratio > 0, "ffn_ratio", f"must be positive, got {self.ffn_ratio}")
        require(self.ffn in FFN_TYPES, "ffn", f"unknown ffn {self.ffn!r}; expected one of {FFN_TYPES}")
        require(self.width % self.num_heads == 0, "num_heads",
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        require(self.head_dim % 4 == 0, "num_heads",
                f"head_dim = width/num_heads = {self.head_dim} must be a multiple of 4 (2D RoPE)")
        require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                f"unknown implementation {self.attention_impl!r}; known: {sorted(ATTENTION_IMPLS)}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype, "param_dtype"))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus the register (storage) tokens."""
        return 1 + self.num_register_tokens

    @property
    def mlp_dim(self) -> int:
        """FFN hidden size: DINOv3's rule for each FFN type."""
        hidden = int(self.width * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % self.swiglu_align)


DINOV3_VARIANTS: dict[str, DINOv3Spec] = {
    "S": DINOv3Spec(384, 12, 6, "mlp", 4.0),
    "S+": DINOv3Spec(384, 12, 6, "swiglu", 6.0),
    "B": DINOv3Spec(768, 12, 12, "mlp", 4.0),
    "L": DINOv3Spec(1024, 24, 16, "mlp", 4.0),
    "H+": DINOv3Spec(1280, 32, 20, "swiglu", 6.0),
    # Test sizes with every feature of the real ones.
    "tiny": DINOv3Spec(32, 2, 2, "mlp", 4.0),
    "tiny+": DINOv3Spec(32, 2, 2, "swiglu", 6.0),
}


def dinov3_spec(name: str, **overrides: Any) -> DINOv3Spec:
    """The registered variant `name` ('S', 'S+', 'B', 'L', 'H+', 'tiny', 'tiny+') with `overrides`."""
    if name not in DINOV3_VARIANTS:
        raise ConfigError("variant", f"unknown DINOv3 variant {name!r}; known: {sorted(DINOV3_VARIANTS)}")
    return dataclasses.replace(DINOV3_VARIANTS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Pixels and RoPE
# ---------------------------------------------------------------------------------------------

def normalize_pixels(patches: jax.Array, patch_size: int) -> jax.Array:
    """[-1, 1] patches `[..., P*P*3]` ((p, p, C) flattened) -> ImageNet-normalised, float32."""
    if patches.shape[-1] != patch_size * patch_size * 3:
        raise ValueError(f"patches end in {patches.shape[-1]} values; expected patch_size^2*3 = "
                         f"{patch_size * patch_size * 3} ((p, p, C) flattened)")
    x = patches.astype(jnp.float32).reshape(*patches.shape[:-1], patch_size * patch_size, 3)
    x = (x + 1.0) * 0.5  # [-1, 1] -> [0, 1], as torchvision's ToTensor gives
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x.reshape(patches.shape)


def rope_periods(head_dim: int, base: float) -> np.ndarray:
    """DINOv3's RoPE periods `[head_dim/4]`: base^(2k / (head_dim/2)), float32."""
    k = np.arange(head_dim // 4, dtype=np.float64)
    return (base ** (2.0 * k / (head_dim // 2))).astype(np.float32)


def image_grid_from_patch_yx(patch_yx: jax.Array, valid: jax.Array) -> jax.Array:
    """Each row's grid `[B, 2]` (height, width) = 1 + max (row, col) over its valid patches."""
    yx = jnp.where(valid[..., None], patch_yx.astype(jnp.int32), -1)
    return jnp.max(yx, axis=1) + 1


def rope_cos_sin(patch_yx: jax.Array, image_grid: jax.Array, head_dim: int, base: float,
                 num_prefix: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, num_prefix + N, head_dim/2]` (float32) for `apply_rotary`'s rotate-half layout.

    Patch (i, j) of an H x W image has centre coordinates ((i+0.5)/H*2-1, (j+0.5)/W*2-1);
    frequency k < head_dim/4 of the y half reads y, of the x half reads x, with angle
    2*pi*coord/period_k. Prefix tokens get the identity rotation (cos 1, sin 0).
    """
    grid = jnp.maximum(image_grid.astype(jnp.float32), 1.0)[:, None, :]  # [B, 1, 2]
    coords = (patch_yx.astype(jnp.float32) + 0.5) / grid * 2.0 - 1.0  # [B, N, 2]
    periods = jnp.asarray(rope_periods(head_dim, base))
    angles = (2.0 * math.pi * coords)[..., None] / periods  # [B, N, 2, Dh/4]
    angles = angles.reshape(*angles.shape[:2], head_dim // 2)  # [y freqs | x freqs]
    b = angles.shape[0]
    cos = jnp.concatenate([jnp.ones((b, num_prefix, head_dim // 2), jnp.float32), jnp.cos(angles)], 1)
    sin = jnp.concatenate([jnp.zeros((b, num_prefix, head_dim // 2), jnp.float32), jnp.sin(angles)], 1)
    return cos, sin


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class GeluMLP(nnx.Module):
    """gelu(x W1 + b1) W2 + b2 with exact (erf) GELU, as torch nn.GELU: `[..., E] -> [..., E]`."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc1 = param(rngs, normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.fc1_bias = param(rngs, zeros(), (hidden,), ("mlp",), param_dtype)
        self.fc2 = param(rngs, normal(), (hidden, dim), ("mlp", "embed"), param_dtype)
        self.fc2_bias = param(rngs, zeros(), (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = x.astype(dt) @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt)
        return jax.nn.gelu(h, approximate=False) @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class SwiGLUFFN(nnx.Module):
    """(silu(x W1 + b1) * (x W2 + b2)) W3 + b3 (DINOv3's SwiGLU has biases): `[..., E] -> [..., E]`."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w1 = param(rngs, normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.w1_bias = param(rngs, zeros(), (hidden,), ("mlp",), param_dtype)
        self.w2 = param(rngs, normal(), (dim, hidden), ("embed", "mlp"), param_dtype)
        self.w2_bias = param(rngs, zeros(), (hidden,), ("mlp",), param_dtype)
        self.w3 = param(rngs, normal(), (hidden, dim), ("mlp", "embed"), param_dtype)
        self.w3_bias = param(rngs, zeros(), (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        gate = x @ self.w1[...].astype(dt) + self.w1_bias[...].astype(dt)
        up = x @ self.w2[...].astype(dt) + self.w2_bias[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.w3[...].astype(dt) + self.w3_bias[...].astype(dt)


class DINOv3Block(nnx.Module):
    """x + ls1 * (Attn(norm1(x)) + b_o); x + ls2 * FFN(norm2(x)). Residual in float32."""

    def __init__(self, spec: DINOv3Spec, *, rngs: nnx.Rngs):
        d, dt, pdt = spec.width, spec.dtype, spec.param_dtype
        self.norm1 = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(d, spec.num_heads, spec.num_heads, spec.head_dim, qkv_bias=spec.qkv_bias,
                              impl=spec.attention_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        if spec.mask_k_bias:
            self.attn.k_bias = None  # DINOv3 masks the key bias to zero: no parameter at all
        self.attn_out_bias = param(rngs, zeros(), (d,), ("embed",), pdt)  # `Attention` has no o bias
        self.norm2 = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        ffn = GeluMLP if spec.ffn == "mlp" else SwiGLUFFN
        self.mlp = ffn(d, spec.mlp_dim, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.ls1 = param(rngs, ones(), (d,), ("norm",), pdt) if spec.layerscale else None
        self.ls2 = param(rngs, ones(), (d,), ("norm",), pdt) if spec.layerscale else None

    @staticmethod
    def _scale(y: jax.Array, gamma: nnx.Param | None) -> jax.Array:
        y = y.astype(jnp.float32)
        return y if gamma is None else y * gamma[...].astype(jnp.float32)

    def __call__(self, x: jax.Array, rotary: tuple[jax.Array, jax.Array], segment_ids: jax.Array) -> jax.Array:
        a = self.attn(self.norm1(x), rotary=rotary, segment_ids=segment_ids, causal=False)
        x = x + self._scale(a + self.attn_out_bias[...].astype(a.dtype), self.ls1)
        x = x + self._scale(self.mlp(self.norm2(x)), self.ls2)
        return constrain(x, RESIDUAL)


class DINOv3(nnx.Module):
    """Frozen DINOv3 ViT over NaFlex patches -> {cls [B,D], registers [B,R,D], tokens [B,N,D]}."""

    def __init__(self, spec: DINOv3Spec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, pdt = spec.width, spec.param_dtype
        patch_dim = spec.patch_size * spec.patch_size * 3
        # The 16x16/16 conv as a Dense over the (p, p, C)-flattened patch.
        self.patch_embed = param(rngs, nnx.initializers.lecun_normal(), (patch_dim, d), ("patch", "embed"), pdt)
        self.patch_bias = param(rngs, zeros(), (d,), ("embed",), pdt)
        self.cls_token = param(rngs, normal(), (d,), ("embed",), pdt)
        self.register_tokens = (param(rngs, normal(), (spec.num_register_tokens, d), (None, "embed"), pdt)
                                if spec.num_register_tokens else None)
        self.blocks = stacked(lambda r: DINOv3Block(spec, rngs=r), spec.depth, rngs)
        self.norm = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)

    def normalize_pixels(self, patches: jax.Array) -> jax.Array:
        """[-1, 1] -> [0, 1] -> ImageNet mean/std per channel (the last of (p, p, C)); float32."""
        return normalize_pixels(patches, self.spec.patch_size)

    def __call__(self, patches: jax.Array, patch_yx: jax.Array, valid: jax.Array,
                 image_grid: jax.Array | None = None) -> dict[str, jax.Array]:
        """patches `[B, N, P*P*3]` in [-1, 1], patch_yx `[B, N, 2]`, valid `[B, N]`;
        image_grid `[B, 2]` (rows, cols) or None to take it from the valid patch_yx.

        Returns float32, gradient-free: `cls [B, D]`, `registers [B, R, D]`, `tokens [B, N, D]`
        (patch tokens after the final norm, zero at padding).
        """
        spec, dt = self.spec, self.spec.dtype
        b = patches.shape[0]
        r, pre = spec.num_register_tokens, spec.num_prefix_tokens
        valid = valid.astype(bool)
        if image_grid is None:
            image_grid = image_grid_from_patch_yx(patch_yx, valid)
        x = self.normalize_pixels(patches).astype(dt) @ self.patch_embed[...].astype(dt)
        x = (x + self.patch_bias[...].astype(dt)).astype(jnp.float32)  # [B, N, D]
        prefix = [jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, spec.width))]
        if r:
            prefix.append(jnp.broadcast_to(self.register_tokens[...].astype(jnp.float32), (b, r, spec.width)))
        x = jnp.concatenate(prefix + [jnp.where(valid[..., None], x, 0.0)], axis=1)  # [B, pre+N, D]
        x = constrain(x, RESIDUAL)
        segment_ids = jnp.concatenate([jnp.ones((b, pre), jnp.int32), valid.astype(jnp.int32)], axis=1)
        rotary = rope_cos_sin(patch_yx, image_grid, spec.head_dim, spec.rope_base, pre)

        def body(block, h):
            return block(h, rotary, segment_ids), None

        x, _ = scan_layers(self.blocks, x, body)
        x = self.norm(x).astype(jnp.float32)
        out = {"cls": x[:, 0], "registers": x[:, 1:pre], "tokens": jnp.where(valid[..., None], x[:, pre:], 0.0)}
        return jax.lax.stop_gradient(out)
