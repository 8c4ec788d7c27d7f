"""Multi-head attention with GQA, optional q/k/v bias, QK-Norm and rotary embeddings.

The attention core is picked by name from `ATTENTION_IMPLS` (`xla` is the pure-jnp
reference in `glm5v_jax.kernels`); the kernels issue registers `pallas` and
`cudnn` there, so layers never branch on the implementation.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.kernels.reference import attention_reference
from glm5v_jax.layers.norms import rms_normalize
from glm5v_jax.layers.params import normal, ones, param, zeros
from glm5v_jax.layers.rope import apply_rotary

# name -> fn(q, k, v, *, causal, q_segment_ids, kv_segment_ids, scale) -> out
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {"xla": attention_reference}


def register_attention_impl(name: str, fn: Callable[..., jax.Array]) -> None:
    """Make an attention core selectable as `attention_impl=name`."""
    ATTENTION_IMPLS[name] = fn


def get_attention_impl(name: str) -> Callable[..., jax.Array]:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {name!r}; known: {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]


class Attention(nnx.Module):
    """GQA self-attention: x `[B, S, E]` -> `[B, S, E]`.

    QK-Norm is an RMSNorm over head_dim (one scale shared by all heads), applied to
    q and k before the rotary embedding, as in GLM-4.5 and CogViT.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        impl: str = "xla",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.norm_eps, self.dtype, self.impl = norm_eps, dtype, impl
        get_attention_impl(impl)  # fail early on an unknown name
        init = normal(init_std)
        self.q = param(rngs, init, (embed_dim, num_heads, head_dim), ("embed", "heads", "kv"), param_dtype)
        self.k = param(rngs, init, (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "kv"), param_dtype)
        self.v = param(rngs, init, (embed_dim, num_kv_heads, head_dim), ("embed", "kv_heads", "kv"), param_dtype)
        self.o = param(rngs, init, (num_heads, head_dim, embed_dim), ("heads", "kv", "embed"), param_dtype)
        if qkv_bias:
            self.q_bias = param(rngs, zeros(), (num_heads, head_dim), ("heads", "kv"), param_dtype)
            self.k_bias = param(rngs, zeros(), (num_kv_heads, head_dim), ("kv_heads", "kv"), param_dtype)
            self.v_bias = param(rngs, zeros(), (num_kv_heads, head_dim), ("kv_heads", "kv"), param_dtype)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if qk_norm:
            self.q_norm = param(rngs, ones(), (head_dim,), ("kv",), param_dtype)
            self.k_norm = param(rngs, ones(), (head_dim,), ("kv",), param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x, kernel, bias):
        y = jnp.einsum("bse,ehd->bshd", x, kernel[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return y

    def _qk_norm(self, x, scale):
        if scale is None:
            return x
        return (rms_normalize(x, self.norm_eps) * scale[...].astype(jnp.float32)).astype(x.dtype)

    def __call__(
        self,
        x: jax.Array,
        *,
        rotary: tuple[jax.Array, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
        causal: bool = False,
    ) -> jax.Array:
        """x `[B, S, E]`; rotary = (cos, sin) `[B, S, R/2]`; segment_ids `[B, S]` (0 = pad)."""
        x = x.astype(self.dtype)
        q = self._qk_norm(self._project(x, self.q, self.q_bias), self.q_norm)
        k = self._qk_norm(self._project(x, self.k, self.k_bias), self.k_norm)
        v = self._project(x, self.v, self.v_bias)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        out = get_attention_impl(self.impl)(
            q, k, v, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
            scale=self.head_dim**-0.5,
        )
        return jnp.einsum("bshd,hde->bse", out.astype(self.dtype), self.o[...].astype(self.dtype))
