"""CogViT stage 1, the student side: the encoder plus one adaptor head per teacher.

The student sees the image with its MIM-masked patches replaced by the mask token and predicts,
at every position, each teacher's (standardised) feature through that teacher's adaptor head
(AM-RADIO's MLP: Linear -> LayerNorm -> GELU -> Linear). Heads exist only for pre-training;
the encoder is what later stages keep.

`resample_tokens` aligns a teacher whose patch grid differs from the student's (another patch
size on the same image): each student patch takes the bilinear interpolation of the teacher
tokens around the same point of the image, per image.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.norms import LayerNorm
from glm5v_jax.layers.params import param, zeros
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.specs import VisionSpec


class AdaptorHead(nnx.Module):
    """`[..., D_student] -> [..., D_teacher]`: Linear, LayerNorm, GELU, Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.dtype = dtype
        self.fc1 = param(rngs, init, (in_dim, hidden_dim), ("embed", "mlp"))
        self.fc1_bias = param(rngs, zeros(), (hidden_dim,), ("mlp",))
        self.norm = LayerNorm(hidden_dim, eps=1e-6, rngs=rngs)
        self.fc2 = param(rngs, init, (hidden_dim, out_dim), ("mlp", "embed"))
        self.fc2_bias = param(rngs, zeros(), (out_dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = x.astype(dt) @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt)
        h = jax.nn.gelu(self.norm(h))
        return (h.astype(dt) @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)).astype(jnp.float32)


class MIMStudent(nnx.Module):
    """CogViT + {teacher name: adaptor head}."""

    def __init__(self, spec: VisionSpec, teacher_dims: Mapping[str, int], *, head_hidden: int = 0,
                 rngs: nnx.Rngs):
        if not teacher_dims:
            raise ConfigError("teacher_dims", "stage 1 needs at least one teacher")
        self.encoder = CogViT(spec, rngs=rngs)
        hidden = head_hidden or spec.embed_dim
        self.heads = nnx.Dict({name: AdaptorHead(spec.embed_dim, hidden, dim, dtype=spec.dtype, rngs=rngs)
                               for name, dim in sorted(teacher_dims.items())})

    def __call__(self, patches, patch_yx, valid, mim_mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(student tokens `[B, N, D]`, {teacher: prediction `[B, N, D_teacher]` float32})."""
        tokens = self.encoder(patches, patch_yx, valid, mim_mask=mim_mask)
        return tokens, {name: head(tokens) for name, head in self.heads.items()}


def grid_of(patch_yx: jax.Array, valid: jax.Array) -> jax.Array:
    """`[B, 2]` (rows, cols) of each image's patch grid, from its valid positions."""
    yx = jnp.where(valid[..., None], patch_yx, -1)
    return jnp.max(yx, axis=1) + 1


def resample_tokens(src_tokens: jax.Array, src_yx: jax.Array, src_valid: jax.Array, dst_yx: jax.Array,
                    dst_valid: jax.Array) -> jax.Array:
    """Teacher tokens on their grid -> the student's grid, bilinear, per image.

    src_tokens `[B, Ns, D]` at src_yx `[B, Ns, 2]` (src_valid `[B, Ns]`); dst_yx / dst_valid
    `[B, Nd, ...]`. Both grids cover the same image: a student patch centre (y + 0.5) / H_dst
    maps to the teacher grid point (y + 0.5) H_src / H_dst - 0.5, clamped to the grid. Written as
    a `[B, Nd, Ns]` interpolation matrix times the tokens (a matmul; no gather). Zero at padding.
    """
    src_grid = grid_of(src_yx, src_valid).astype(jnp.float32)  # [B, 2]
    dst_grid = jnp.maximum(grid_of(dst_yx, dst_valid), 1).astype(jnp.float32)
    pos = (dst_yx.astype(jnp.float32) + 0.5) * (src_grid / dst_grid)[:, None, :] - 0.5  # [B, Nd, 2]
    pos = jnp.clip(pos, 0.0, jnp.maximum(src_grid - 1.0, 0.0)[:, None, :])
    lo = jnp.floor(pos)
    frac = pos - lo
    hi = jnp.minimum(lo + 1.0, jnp.maximum(src_grid - 1.0, 0.0)[:, None, :])
    src = src_yx.astype(jnp.float32)  # [B, Ns, 2]
    weights = jnp.zeros(dst_yx.shape[:2] + src_yx.shape[1:2], jnp.float32)  # [B, Nd, Ns]
    for ry, wy in ((lo[..., 0], 1.0 - frac[..., 0]), (hi[..., 0], frac[..., 0])):
        for rx, wx in ((lo[..., 1], 1.0 - frac[..., 1]), (hi[..., 1], frac[..., 1])):
            hit = (src[:, None, :, 0] == ry[..., None]) & (src[:, None, :, 1] == rx[..., None]) & src_valid[:, None, :]
            weights = weights + jnp.where(hit, (wy * wx)[..., None], 0.0)
    out = jnp.einsum("bds,bsc->bdc", weights, src_tokens.astype(jnp.float32))
    return jnp.where(dst_valid[..., None], out, 0.0)
