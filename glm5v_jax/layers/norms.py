"""Normalisation layers (RMSNorm, LayerNorm) computed in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.params import ones, param, zeros


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (no bias)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis_name: str | None = "norm",
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, ones(), (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with learned scale and bias."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "norm",
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, ones(), (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros(), (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
