"""Vision-to-language projector: 2x2 merge of neighbouring patches, then an MLP.

Patches arrive in merge-window order (`glm5v_jax.data.naflex.patchify`): each run
of merge_size**2 consecutive patches is one spatial window of one image, so the
merge is a reshape, and a group never straddles two images or image and padding.
One merged group becomes one `<|image|>` token of the language model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.norms import LayerNorm
from glm5v_jax.layers.params import normal, param, zeros
from glm5v_jax.models.specs import ProjectorSpec


class Projector(nnx.Module):
    """tokens `[B, N, Dv]`, valid `[B, N]` -> merged `[B, N/g, D_llm]`, valid `[B, N/g]`."""

    def __init__(self, spec: ProjectorSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        g = spec.merge_size**2
        din, dout, pdt = spec.vision_dim * g, spec.out_dim, spec.param_dtype
        self.norm = LayerNorm(din, param_dtype=pdt, rngs=rngs)
        self.fc1 = param(rngs, normal(0.02), (din, dout), ("mlp", "embed"), pdt)
        self.fc1_bias = param(rngs, zeros(), (dout,), ("embed",), pdt)
        self.fc2 = param(rngs, normal(0.02), (dout, dout), ("mlp", "embed"), pdt)
        self.fc2_bias = param(rngs, zeros(), (dout,), ("embed",), pdt)

    def __call__(self, tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, n, d = tokens.shape
        g = self.spec.merge_size**2
        if n % g:
            raise ValueError(f"patch count {n} is not a multiple of the merge group {g}")
        dt = self.spec.dtype
        x = self.norm(tokens.reshape(b, n // g, g * d)).astype(dt)
        x = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt))
        x = x @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)
        merged_valid = valid.reshape(b, n // g, g).all(-1)
        return jnp.where(merged_valid[..., None], x, 0), merged_valid
