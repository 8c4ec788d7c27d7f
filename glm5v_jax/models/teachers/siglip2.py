"""SigLIP2 image tower as a frozen teacher for CogViT's masked distillation (stage 1).

Same inputs as the student (`glm5v_jax.data.naflex`): `patches [B, N, P*P*3]` in [-1, 1],
each patch flattened (p, p, C) row-major, `patch_yx [B, N, 2]` int32 (row, col) and
`valid [B, N]`. The architecture follows big_vision's ViT / NaFlex ViT (written from
scratch here):

  patch Dense (p*p*3 -> D, bias)  +  learned position table resized to each image's grid
  -> depth x pre-LN block [x + MHA(LN(x)); x + GELU-tanh MLP(LN(x))]  (LayerNorm eps 1e-6)
  -> encoder_norm  -> `tokens`
  -> MAP head: a learned probe attends over the valid tokens, + LN/MLP residual -> `pooled`

Position table. NaFlex checkpoints hold a (16, 16, D) table; fixed-resolution ones a
(1, g*g, D) table (HF: (g*g, D)) that the loaders reshape to (g, g, D). Either way the table is resized to
each image's patch grid (h, w) with bilinear, antialiased resampling (the triangle kernel
of `jax.image.scale_and_translate`, widened by 1/scale when shrinking, weights renormalised)
and read at each patch's (y, x). big_vision resizes onto a fixed (l, l) canvas and gathers
from it, which yields NaN for a grid side above l (64 by default). Here the resize is
separable, so each token's embedding is computed directly from its own row and column
weights (`pos_weights`): there is no canvas and no limit on the grid side (any h, w <= N
works); at each (y, x) the result equals the canvas resize. A fixed-resolution table read at
its native grid is returned exactly (the weights are one-hot).

The grid (h, w) of an image is taken from its valid coordinates: max(y) + 1, max(x) + 1.

The module is a teacher: outputs carry no gradient (`stop_gradient`), and its parameters are
meant to come from a checkpoint (`glm5v_jax.models.teachers.siglip2_loaders`), never an
optimizer. Parameters are `spec.param_dtype` (float32); matmuls run in `spec.dtype` (bfloat16
for teachers), while the residual stream, LayerNorms, attention softmax and the position
embedding stay float32; outputs are float32 (distillation targets), as in the DINOv3 teacher.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError, require
from glm5v_jax.kernels.reference import attention_reference
from glm5v_jax.layers.attention import ATTENTION_IMPLS, Attention
from glm5v_jax.layers.mlp import GeluMLP
from glm5v_jax.layers.norms import LayerNorm
from glm5v_jax.layers.params import normal, param, zeros
from glm5v_jax.layers.stack import scan_layers, stacked
from glm5v_jax.models.specs import as_dtype
from glm5v_jax.sharding.context import RESIDUAL, constrain


@dataclasses.dataclass(frozen=True)
class SigLIP2Spec:
    """Shape and numerics of a SigLIP2 image tower.

    `posemb_grid` is the side of the learned position table: 16 for the NaFlex checkpoints,
    image_size // patch_size for fixed-resolution ones (16 at 256 px, 24 at 384, 32 at 512).
    `naflex` only selects the checkpoint layout (Dense vs Conv patch kernel, (16,16,D) vs
    (1,N,D) table); the module is the same.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 16
    posemb_grid: int = 16
    naflex: bool = True
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "posemb_grid"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        require(self.width % self.num_heads == 0, "num_heads",
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                f"unknown implementation {self.attention_impl!r}; known: {sorted(ATTENTION_IMPLS)}")
        object.__setattr__(self, "dtype", as_dtype(self.dtype, "dtype"))  # also 'bfloat16' etc.
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype, "param_dtype"))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (p, p, 3) patch."""
        return self.patch_size * self.patch_size * 3


# Named towers (big_vision `decode_variant` widths/depths/MLP/heads), NaFlex layout by default.
SIGLIP2_VARIANTS: dict[str, SigLIP2Spec] = {
    "tiny": SigLIP2Spec(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, posemb_grid=4),
    "B/16": SigLIP2Spec(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L/16": SigLIP2Spec(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m/16": SigLIP2Spec(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}


def siglip2_spec(variant: str, *, naflex: bool = True, image_size: int | None = None,
                 **overrides: Any) -> SigLIP2Spec:
    """The spec of a named variant.

    naflex=True: the (16, 16, D) table of the NaFlex checkpoints. naflex=False needs
    `image_size` (a fixed-resolution checkpoint, e.g. 256/384/512) and sets
    posemb_grid = image_size // patch_size. `overrides` replace any other field
    (dtype=jnp.bfloat16, attention_impl=...).
    """
    if variant not in SIGLIP2_VARIANTS:
        raise ConfigError("variant", f"unknown SigLIP2 variant {variant!r}; known: {sorted(SIGLIP2_VARIANTS)}")
    spec = SIGLIP2_VARIANTS[variant]
    changes: dict[str, Any] = {"naflex": naflex}
    if not naflex:
        if image_size is None:
            raise ConfigError("image_size", "a fixed-resolution SigLIP2 spec needs image_size (e.g. 256, 384, 512)")
        if image_size % spec.patch_size:
            raise ConfigError("image_size", f"{image_size} is not a multiple of patch_size {spec.patch_size}")
        changes["posemb_grid"] = image_size // spec.patch_size
    elif image_size is not None:
        raise ConfigError("image_size", "applies to fixed-resolution checkpoints only (naflex=False)")
    return dataclasses.replace(spec, **{**changes, **overrides})


# Below this the weights of a sample are dropped (as in jax.image: 1000 float32 eps).
_MIN_WEIGHT_SUM = 1000 * float(jnp.finfo(jnp.float32).eps)


def pos_weights(index: jax.Array, out_size: jax.Array, in_size: int) -> jax.Array:
    """Antialiased bilinear resize weights `[..., in_size]` for output rows `index`.

    Resizing a length-`in_size` axis to `out_size` samples input coordinate
    (index + 0.5) * in/out - 0.5 with a triangle kernel, widened by in/out when shrinking
    (antialiasing); weights are renormalised over the input and zero for samples outside
    it, as `jax.image.scale_and_translate(..., "linear", antialias=True)` does. `index`
    and `out_size` broadcast (e.g. `[B, N]` and `[B, 1]`).
    """
    index = index.astype(jnp.float32)
    inv_scale = in_size / out_size.astype(jnp.float32)
    sample = (index + 0.5) * inv_scale - 0.5  # [...]
    kernel_scale = jnp.maximum(inv_scale, 1.0)[..., None]
    dist = jnp.abs(sample[..., None] - jnp.arange(in_size, dtype=jnp.float32))  # [..., in]
    w = jnp.maximum(0.0, 1.0 - dist / kernel_scale)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = jnp.where(total > _MIN_WEIGHT_SUM, w / jnp.where(total > 0, total, 1.0), 0.0)
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)
    return jnp.where(inside[..., None], w, 0.0)


def grid_shape(patch_yx: jax.Array, valid: jax.Array) -> jax.Array:
    """Each image's patch grid (h, w) `[B, 2]` int32: max valid coordinate + 1 (at least 1)."""
    yx = jnp.where(valid[..., None], patch_yx.astype(jnp.int32), -1)
    return jnp.maximum(jnp.max(yx, axis=1) + 1, 1)


class EncoderBlock(nnx.Module):
    """Pre-LN block: x + MHA(LN(x)) + b_out; x + MLP(LN(x)). Padding is masked as keys."""

    def __init__(self, spec: SigLIP2Spec, *, rngs: nnx.Rngs):
        d, pdt = spec.width, spec.param_dtype
        self.attn_norm = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        # `Attention` has q/k/v biases but no output bias; SigLIP's is added here.
        self.attn = Attention(d, spec.num_heads, spec.num_heads, spec.head_dim, qkv_bias=True,
                              impl=spec.attention_impl, dtype=spec.dtype, param_dtype=pdt, rngs=rngs)
        self.attn_out_bias = param(rngs, zeros(), (d,), ("embed",), pdt)
        self.mlp_norm = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(d, spec.mlp_dim, dtype=spec.dtype, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x float32 `[B, N, D]` (residual stream); segment_ids `[B, N]` (0 = padding)."""
        h = self.attn(self.attn_norm(x), segment_ids=segment_ids, causal=False)  # spec.dtype
        x = x + h.astype(jnp.float32) + self.attn_out_bias[...].astype(jnp.float32)
        return constrain(x + self.mlp(self.mlp_norm(x)).astype(jnp.float32), RESIDUAL)


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe queries the valid tokens.

    probe `[D]` -> MHA(probe, tokens, key mask) `[B, D]` -> y + MLP(LN(y)). No input
    LayerNorm: the encoder already ends with `encoder_norm`.
    """

    def __init__(self, spec: SigLIP2Spec, *, rngs: nnx.Rngs):
        d, h, hd, pdt = spec.width, spec.num_heads, spec.head_dim, spec.param_dtype
        self.dtype, self.head_dim = spec.dtype, hd
        init = normal(0.02)
        self.probe = param(rngs, init, (d,), ("embed",), pdt)
        self.q = param(rngs, init, (d, h, hd), ("embed", "heads", "kv"), pdt)
        self.k = param(rngs, init, (d, h, hd), ("embed", "heads", "kv"), pdt)
        self.v = param(rngs, init, (d, h, hd), ("embed", "heads", "kv"), pdt)
        self.o = param(rngs, init, (h, hd, d), ("heads", "kv", "embed"), pdt)
        self.q_bias = param(rngs, zeros(), (h, hd), ("heads", "kv"), pdt)
        self.k_bias = param(rngs, zeros(), (h, hd), ("heads", "kv"), pdt)
        self.v_bias = param(rngs, zeros(), (h, hd), ("heads", "kv"), pdt)
        self.o_bias = param(rngs, zeros(), (d,), ("embed",), pdt)
        self.norm = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(d, spec.mlp_dim, dtype=spec.dtype, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x `[B, N, D]`, valid `[B, N]` -> pooled float32 `[B, D]` (finite even with no valid token)."""
        dt, b = self.dtype, x.shape[0]
        x = x.astype(dt)

        def proj(inp, w, bias):  # [B, S, D] -> [B, S, H, Dh]
            return jnp.einsum("bsd,dhk->bshk", inp, w[...].astype(dt)) + bias[...].astype(dt)

        probe = jnp.broadcast_to(self.probe[...].astype(dt), (b, 1, x.shape[-1]))
        q, k, v = proj(probe, self.q, self.q_bias), proj(x, self.k, self.k_bias), proj(x, self.v, self.v_bias)
        # One query per image: the pure-jnp core is cheap here (the kernels target self-attention).
        att = attention_reference(q, k, v, q_segment_ids=jnp.ones((b, 1), jnp.int32),
                                  kv_segment_ids=valid.astype(jnp.int32), scale=self.head_dim**-0.5)
        y = jnp.einsum("bshk,hkd->bsd", att.astype(dt), self.o[...].astype(dt)).astype(jnp.float32)
        y = y + self.o_bias[...].astype(jnp.float32)  # [B, 1, D]
        y = y + self.mlp(self.norm(y)).astype(jnp.float32)
        return y[:, 0]


class SigLIP2(nnx.Module):
    """SigLIP2 image tower: NaFlex patches -> {"tokens" `[B, N, D]`, "pooled" `[B, D]`}."""

    def __init__(self, spec: SigLIP2Spec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, g, pdt = spec.width, spec.posemb_grid, spec.param_dtype
        self.patch_embed = param(rngs, nnx.initializers.lecun_normal(), (spec.patch_dim, d), ("patch", "embed"), pdt)
        self.patch_bias = param(rngs, zeros(), (d,), ("embed",), pdt)
        self.pos_embed = param(rngs, normal(d**-0.5), (g, g, d), (None, None, "embed"), pdt)
        self.blocks = stacked(lambda r: EncoderBlock(spec, rngs=r), spec.depth, rngs)
        self.encoder_norm = LayerNorm(d, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.head = MAPHead(spec, rngs=rngs)

    @staticmethod
    def normalize_pixels(patches: jax.Array) -> jax.Array:
        """SigLIP expects pixels in [-1, 1], which is what the NaFlex pipeline emits: identity.

        (Explicit because each teacher has its own normalisation; DINOv3 uses ImageNet mean/std.)
        """
        return patches

    def position_embeddings(self, patch_yx: jax.Array, valid: jax.Array) -> jax.Array:
        """The table resized to each image's grid, read at each patch: float32 `[B, N, D]`."""
        g = self.spec.posemb_grid
        hw = grid_shape(patch_yx, valid)  # [B, 2]
        wy = pos_weights(patch_yx[..., 0], hw[:, None, 0], g)  # [B, N, g]
        wx = pos_weights(patch_yx[..., 1], hw[:, None, 1], g)  # [B, N, g]
        w = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:2], g * g)  # [B, N, g*g]
        table = self.pos_embed[...].astype(jnp.float32).reshape(g * g, -1)
        return jnp.einsum("bnk,kd->bnd", w, table, precision=jax.lax.Precision.HIGHEST)

    def __call__(self, patches: jax.Array, patch_yx: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
        """patches `[B, N, p*p*3]` in [-1, 1], patch_yx `[B, N, 2]`, valid `[B, N]`.

        Returns `tokens [B, N, D]` (after encoder_norm, zero at padding) and `pooled [B, D]`
        (MAP output), both float32 and without gradient.
        """
        spec, dt = self.spec, self.spec.dtype
        if patches.ndim != 3 or patches.shape[-1] != spec.patch_dim:
            raise ValueError(f"patches must be [B, N, {spec.patch_dim}] (p={spec.patch_size}, flattened "
                             f"(p, p, 3)), got {patches.shape}")
        if patch_yx.shape != (*patches.shape[:2], 2) or valid.shape != patches.shape[:2]:
            raise ValueError(f"patch_yx {patch_yx.shape} / valid {valid.shape} do not match patches "
                             f"{patches.shape} (expected [B, N, 2] / [B, N])")
        valid = valid.astype(bool)
        x = self.normalize_pixels(patches).astype(dt)
        x = (x @ self.patch_embed[...].astype(dt)).astype(jnp.float32)  # [B, N, D]
        x = x + self.patch_bias[...].astype(jnp.float32) + self.position_embeddings(patch_yx, valid)
        x = constrain(jnp.where(valid[..., None], x, 0.0), RESIDUAL)
        segment_ids = valid.astype(jnp.int32)  # 0 = padding: never a key, zero as a query

        def body(block, h):
            return block(h, segment_ids), None

        x, _ = scan_layers(self.blocks, x, body)
        x = self.encoder_norm(x)
        tokens = jnp.where(valid[..., None], x, 0.0)
        pooled = self.head(x, valid)
        return {"tokens": jax.lax.stop_gradient(tokens), "pooled": jax.lax.stop_gradient(pooled)}
