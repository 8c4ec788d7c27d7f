"""Multi-head attention with GQA, optional q/k/v bias, QK-Norm and rotary embeddings.

The attention core is picked by name from the table `ATTENTION_IMPLS` (`xla` is the
pure-jnp reference in `glm5v_jax.kernels`; `pallas` and `cudnn` live in
`attention_kernels.py`), so layers never branch on the implementation.

On request (`return_max_logits=True`) the layer also reports each head's maximum
pre-softmax logit over the visible pairs, the statistic QK-Clip reads
(`glm5v_jax.optim.qk_clip`). Cores listed with `returns_max_logits=True`
produce it alongside the output; for the others it is computed separately from q
and k by `attention_max_logits`. Either way it carries no gradient and leaves the
output unchanged; without the request nothing extra is computed.

Generation (`Attention.cached`) reads the paged KV cache through the same table: an
implementation's `paged` core, `paged_attention_reference` when it lists none. `pallas`
lists the `glm5v_jax.kernels.paged_attention` dispatcher (jax's TPU decode kernel on TPU,
the reference elsewhere, so CPU results are the reference's bit for bit).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.kernels.paged_attention import paged_attention
from glm5v_jax.kernels.reference import (attention_max_logits, attention_reference, paged_attention_reference,
                                         paged_write)
from glm5v_jax.layers.attention_kernels import cudnn_attention, pallas_attention
from glm5v_jax.layers.norms import rms_normalize
from glm5v_jax.layers.params import normal, ones, param, zeros
from glm5v_jax.layers.rope import apply_rotary
from glm5v_jax.sharding.context import RESIDUAL, constrain


class AttentionCore(NamedTuple):
    """One attention implementation.

    fn(q [B,S,H,D], k/v [B,T,KV,D], *, causal, q_segment_ids, kv_segment_ids, scale) -> [B,S,H,D];
    with `returns_max_logits`, fn also accepts `return_max_logits=True` and then returns
    `(out, max_logits [H])` (per-head max of scale * q.k over the visible pairs).
    `paged`: its attention over the paged KV cache (generation), with the signature and
    semantics of `paged_attention_reference`; None means that reference.
    """

    fn: Callable[..., jax.Array]
    returns_max_logits: bool = False
    paged: Callable[..., jax.Array] | None = None


# The attention cores, by `attention_impl` name.
ATTENTION_IMPLS: dict[str, AttentionCore] = {
    "xla": AttentionCore(attention_reference, returns_max_logits=True),
    "pallas": AttentionCore(pallas_attention, paged=paged_attention),
    "cudnn": AttentionCore(cudnn_attention),
}


def register_attention_impl(name: str, fn: Callable[..., jax.Array], *, returns_max_logits: bool = False,
                            paged: Callable[..., jax.Array] | None = None) -> None:
    """Add an attention core of your own to `ATTENTION_IMPLS` (selectable as `attention_impl=name`)."""
    ATTENTION_IMPLS[name] = AttentionCore(fn, returns_max_logits, paged)


def get_paged_attention_impl(name: str) -> Callable[..., jax.Array]:
    """The paged-cache core of implementation `name` (`paged_attention_reference` if it lists none)."""
    get_attention_impl(name)
    return ATTENTION_IMPLS[name].paged or paged_attention_reference


def get_attention_impl(name: str) -> Callable[..., jax.Array]:
    """The core function listed as `name`; ConfigError naming `attention_impl` otherwise."""
    if name not in ATTENTION_IMPLS:
        raise ConfigError("attention_impl", f"unknown implementation {name!r}; known: {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name].fn


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
            raise ConfigError("num_kv_heads",
                              f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
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

    def queries_keys(
        self, x: jax.Array, rotary: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """q `[B, S, H, Dh]` and k `[B, S, KV, Dh]` as the attention core sees them."""
        x = x.astype(self.dtype)
        q = self._qk_norm(self._project(x, self.q, self.q_bias), self.q_norm)
        k = self._qk_norm(self._project(x, self.k, self.k_bias), self.k_norm)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        return q, k

    def __call__(
        self,
        x: jax.Array,
        *,
        rotary: tuple[jax.Array, jax.Array] | None = None,
        segment_ids: jax.Array | None = None,
        causal: bool = False,
        return_max_logits: bool = False,
    ):
        """x `[B, S, E]`; rotary = (cos, sin) `[B, S, R/2]`; segment_ids `[B, S]` (0 = pad).

        Returns `[B, S, E]`, or `(out, max_logits)` with `return_max_logits=True`:
        float32 `[H]`, each head's max of `q.k / sqrt(Dh)` over the visible pairs
        of the batch (causal, same non-zero segment), -inf if a head sees none;
        gradient-free.
        """
        q, k = self.queries_keys(x, rotary)
        v = self._project(x.astype(self.dtype), self.v, self.v_bias)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv"))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv"))
        masking = {"causal": causal, "q_segment_ids": segment_ids, "kv_segment_ids": segment_ids,
                   "scale": self.head_dim**-0.5}
        core = get_attention_impl(self.impl)
        max_logits = None
        if not return_max_logits:
            out = core(q, k, v, **masking)
        elif ATTENTION_IMPLS[self.impl].returns_max_logits:
            out, max_logits = core(q, k, v, return_max_logits=True, **masking)
        else:  # generic fallback: one extra pass over the (masked) logits
            out = core(q, k, v, **masking)
            max_logits = attention_max_logits(q, k, **masking)
        out = jnp.einsum("bshd,hde->bse", out.astype(self.dtype), self.o[...].astype(self.dtype))
        out = constrain(out, RESIDUAL)
        if return_max_logits:
            return out, jax.lax.stop_gradient(max_logits.astype(jnp.float32))
        return out

    def cached(self, x: jax.Array, cache: dict[str, jax.Array], pages: "CachePages", *,
               rotary: tuple[jax.Array, jax.Array] | None = None, layer: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Causal attention of new tokens x `[B, S, E]` over a paged KV cache (generation): their K/V
        are written into `cache` ({"k", "v"}: `[KV, P, page, D]`, this layer's pages, or with `layer`
        the whole stack's `[L, KV, P, page, D]`, written in place at that layer) at `pages.token_index`,
        then every query attends to its row's cached tokens up to itself (through the `paged` core of
        `impl`; see the module docstring). Returns (`[B, S, E]`, the updated cache)."""
        q, k = self.queries_keys(x, rotary)
        v = self._project(x.astype(self.dtype), self.v, self.v_bias)
        k_pages = paged_write(cache["k"], k, pages.page_table, pages.token_index, pages.valid, layer)
        v_pages = paged_write(cache["v"], v, pages.page_table, pages.token_index, pages.valid, layer)
        kw = {} if layer is None else {"layer": layer}
        out = get_paged_attention_impl(self.impl)(q, k_pages, v_pages, pages.page_table, pages.lengths,
                                                  q_positions=pages.token_index, scale=self.head_dim**-0.5, **kw)
        out = jnp.einsum("bshd,hde->bse", out.astype(self.dtype), self.o[...].astype(self.dtype))
        return constrain(out, RESIDUAL), {"k": k_pages, "v": v_pages}


class CachePages(NamedTuple):
    """Where a step's new tokens go in a paged KV cache (`glm5v_jax.generate`): per row its page
    table `[B, N]` and cached length after the step `[B]`; per new token its index in the row
    `[B, S]` and whether it is a real token (False: bucket padding, never written) `[B, S]`."""

    page_table: jax.Array
    lengths: jax.Array
    token_index: jax.Array
    valid: jax.Array
