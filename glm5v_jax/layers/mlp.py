"""Feed-forward blocks: SwiGLU (GLM backbone, experts) and GELU (ViT)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.params import normal, param, zeros
from glm5v_jax.sharding.context import constrain

_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


def _hidden(h: jax.Array) -> jax.Array:
    """The MLP hidden activation `[B, S, F]` split by the rules (other ranks left alone)."""
    return constrain(h, _HIDDEN) if h.ndim == 3 else h


class SwiGLU(nnx.Module):
    """silu(x W_gate) * (x W_up) W_down, no biases: `[..., E] -> [..., E]`."""

    def __init__(self, embed_dim: int, mlp_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.dtype = dtype
        init = normal(init_std)
        self.gate = param(rngs, init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, init, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = _hidden(jax.nn.silu(x @ self.gate[...].astype(self.dtype)) * (x @ self.up[...].astype(self.dtype)))
        return h @ self.down[...].astype(self.dtype)


class GeluMLP(nnx.Module):
    """gelu(x W1 + b1) W2 + b2 (tanh approximation, as in big_vision ViTs)."""

    def __init__(self, embed_dim: int, mlp_dim: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.dtype = dtype
        init = normal(init_std)
        self.fc1 = param(rngs, init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
        self.fc1_bias = param(rngs, zeros(), (mlp_dim,), ("mlp",), param_dtype)
        self.fc2 = param(rngs, init, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)
        self.fc2_bias = param(rngs, zeros(), (embed_dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = _hidden(jax.nn.gelu(x @ self.fc1[...].astype(self.dtype) + self.fc1_bias[...].astype(self.dtype)))
        return h @ self.fc2[...].astype(self.dtype) + self.fc2_bias[...].astype(self.dtype)


MLP_TYPES = {"swiglu": SwiGLU, "gelu": GeluMLP}
