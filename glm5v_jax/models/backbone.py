"""GLM-4.5-style decoder backbone: embedding, scanned dense and MoE layer stacks, head.

Pre-norm blocks (RMSNorm), GQA attention with q/k/v bias and optional QK-Norm,
partial RoPE or M-RoPE over (t, h, w) positions, SwiGLU MLP in the first
`first_k_dense` layers and GLM MoE in the rest. Each stack is one scan, so
compile time stays flat as depth grows. Embedding and head are untied.

With `spec.track_max_logits` every attention layer also reports its per-head
maximum logit (for QK-Clip); the aux output then holds
`attn_max_logits = {"dense_layers": [L_dense, H], "moe_layers": [L_moe, H]}`
and `attention_max_logits(aux)` keys them by attention-module path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.attention import Attention, CachePages
from glm5v_jax.layers.mlp import SwiGLU
from glm5v_jax.layers.moe import MoE, update_router_bias
from glm5v_jax.layers.norms import RMSNorm
from glm5v_jax.layers.params import normal, param
from glm5v_jax.layers.rope import Rotary
from glm5v_jax.layers.stack import scan_layers, scan_layers_with, stacked
from glm5v_jax.models.specs import BackboneSpec
from glm5v_jax.sharding.context import RESIDUAL, constrain


class DecoderBlock(nnx.Module):
    """x + Attn(norm(x)); x + FFN(norm(x)), FFN a dense SwiGLU or an MoE."""

    def __init__(self, spec: BackboneSpec, *, moe: bool, rngs: nnx.Rngs):
        h, dt, pdt, std = spec.embed_dim, spec.dtype, spec.param_dtype, spec.init_std
        self.is_moe = moe
        self.track_max_logits = spec.track_max_logits
        self.attn_norm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(h, spec.num_heads, spec.num_kv_heads, spec.head_dim, qkv_bias=spec.qkv_bias,
                              qk_norm=spec.qk_norm, norm_eps=spec.norm_eps, impl=spec.attention_impl,
                              dtype=dt, param_dtype=pdt, init_std=std, rngs=rngs)
        self.mlp_norm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        if moe:
            self.mlp = MoE(h, spec.moe_mlp_dim, spec.num_experts, spec.experts_per_token,
                           num_shared_experts=spec.num_shared_experts, routed_scaling=spec.routed_scaling,
                           impl=spec.moe_impl, capacity_factor=spec.capacity_factor, dtype=dt, param_dtype=pdt,
                           init_std=std, rngs=rngs)
        else:
            self.mlp = SwiGLU(h, spec.mlp_dim, dtype=dt, param_dtype=pdt, init_std=std, rngs=rngs)

    def __call__(self, x, rotary, segment_ids, replay_ids=None):
        """Returns (x, aux); aux holds the MoE load statistics (none for dense) and, when
        tracked, `attn_max_logits [H]`. replay_ids `[B, S, top_k]`: routing replay (`MoE`)."""
        attn = self.attn(self.attn_norm(x), rotary=rotary, segment_ids=segment_ids, causal=True,
                         return_max_logits=self.track_max_logits)
        attn_aux = {}
        if self.track_max_logits:
            attn, attn_aux = attn[0], {"attn_max_logits": attn[1]}
        x = x + attn
        if self.is_moe:
            y, aux = self.mlp(self.mlp_norm(x), token_mask=segment_ids != 0, replay_ids=replay_ids)
        else:
            y, aux = self.mlp(self.mlp_norm(x)), {}
        return constrain(x + y.astype(x.dtype), RESIDUAL), {**aux, **attn_aux}

    def cached(self, x, rotary, cache, pages: CachePages, layer: jax.Array | None = None):
        """The block on new tokens over a paged KV cache (this layer's, or with `layer` the whole stack's,
        updated in place at that layer): (x, updated cache, aux)."""
        attn, cache = self.attn.cached(self.attn_norm(x), cache, pages, rotary=rotary, layer=layer)
        x = x + attn
        if self.is_moe:
            y, aux = self.mlp(self.mlp_norm(x), token_mask=pages.valid, return_expert_ids=True)
        else:
            y, aux = self.mlp(self.mlp_norm(x)), {}
        return constrain(x + y.astype(x.dtype), RESIDUAL), cache, aux


class GLMBackbone(nnx.Module):
    """Token ids or embeddings `[B, S, H]` -> hidden states and logits."""

    def __init__(self, spec: BackboneSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        h, v, pdt = spec.embed_dim, spec.vocab_size, spec.param_dtype
        self.embed = param(rngs, normal(spec.init_std), (v, h), ("vocab", "embed"), pdt)
        self.dense_layers = (stacked(lambda r: DecoderBlock(spec, moe=False, rngs=r), spec.first_k_dense, rngs)
                             if spec.first_k_dense else None)
        self.moe_layers = (stacked(lambda r: DecoderBlock(spec, moe=True, rngs=r), spec.num_moe_layers, rngs)
                           if spec.num_moe_layers else None)
        self.final_norm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.head = param(rngs, normal(spec.init_std), (h, v), ("embed", "vocab"), pdt)
        self.rotary = Rotary(spec.rotary_dim, spec.rope_theta,
                             tuple(spec.mrope_sections) if spec.mrope_sections else None)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """`[B, S]` int -> `[B, S, H]` in the compute dtype."""
        return constrain(jnp.take(self.embed[...], tokens, axis=0).astype(self.spec.dtype), RESIDUAL)

    def rotary_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """positions `[B, S, 3]` (t, h, w) or `[B, S]` -> (cos, sin) `[B, S, R/2]`."""
        if positions.ndim == 2:
            positions = positions[..., None]
        return self.rotary.cos_sin(positions[..., : self.rotary.num_axes])

    def run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                   replay_ids: jax.Array | None = None):
        """The decoder stack on embeddings x `[B, S, H]`; returns (h before the final norm, aux).
        replay_ids `[B, S, L_moe, top_k]` (optional, -1 where unknown): routing replay, each MoE layer routes
        its tokens to these experts (a rollout engine's record) instead of its own choice.

        aux: `expert_load [L_moe, E]`, `balance_loss` and `dropped_fraction` (token-expert slots
        dropped by a bounded expert-parallel capacity; both means over MoE layers); with
        `spec.track_max_logits` also `attn_max_logits` {stack name: `[L, H]`}.
        """
        rotary = self.rotary_tables(positions)
        remat = self.spec.remat

        def body(block, h):
            return block(h, rotary, segment_ids)

        aux, max_logits = {}, {}
        if self.dense_layers is not None:
            x, dense_aux = scan_layers(self.dense_layers, x, body, remat=remat)
            if "attn_max_logits" in dense_aux:
                max_logits["dense_layers"] = dense_aux["attn_max_logits"]
        if self.moe_layers is not None and replay_ids is not None:
            def replay_body(block, h, ids):
                return block(h, rotary, segment_ids, ids)

            x, moe_aux = scan_layers_with(self.moe_layers, x, jnp.moveaxis(replay_ids, 2, 0),
                                          nnx.remat(replay_body) if remat else replay_body)
        elif self.moe_layers is not None:
            x, moe_aux = scan_layers(self.moe_layers, x, body, remat=remat)
            aux = {"expert_load": moe_aux["expert_load"], "balance_loss": jnp.mean(moe_aux["balance_loss"]),
                   "dropped_fraction": jnp.mean(moe_aux["dropped_fraction"])}
            if "attn_max_logits" in moe_aux:
                max_logits["moe_layers"] = moe_aux["attn_max_logits"]
        if self.spec.track_max_logits:
            aux["attn_max_logits"] = max_logits
        return x, aux

    def stacks(self) -> dict[str, nnx.Module]:
        """The layer stacks by name, in order: "dense_layers", "moe_layers" (those that exist)."""
        return {name: s for name, s in (("dense_layers", self.dense_layers), ("moe_layers", self.moe_layers))
                if s is not None}

    def run_layers_cached(self, x: jax.Array, positions: jax.Array, cache: dict, pages: CachePages):
        """The decoder stack on new tokens' embeddings x `[B, S, H]` at rotary `positions` (`[B, S, 3]` or
        `[B, S]`) over a paged KV cache {stack name: {"k", "v"}: `[L, KV, P, page, D]`} (generation).
        Returns (h before the final norm, the updated cache, routing): routing {"expert_load" `[L_moe, E]`,
        "expert_ids" `[B, S, L_moe, top_k]`: each new token's routed experts per MoE layer}, empty without
        MoE layers."""
        rotary = self.rotary_tables(positions)

        def body(block, carry, layer):  # the stack's cache rides in the carry: written in place, never copied
            h, stack_cache = carry
            h, stack_cache, aux = block.cached(h, rotary, stack_cache, pages, layer)
            return (h, stack_cache), (aux.get("expert_load"), aux.get("expert_ids"))

        out, routing = {}, {}
        for name, stack in self.stacks().items():
            layers = jnp.arange(cache[name]["k"].shape[0], dtype=jnp.int32)
            (x, out[name]), (load, ids) = scan_layers_with(stack, (x, cache[name]), layers, body)
            if name == "moe_layers":
                routing = {"expert_load": load, "expert_ids": jnp.moveaxis(ids, 0, 2)}
        return x, out, routing

    def attention_max_logits(self, aux, prefix: str = "") -> dict[str, jax.Array]:
        """{attention-module path: max logits `[L, H]`} from `run_layers`' aux.

        Paths are those of `glm5v_jax.optim.qk_clip.qk_clip_targets` ("dense_layers/attn",
        with `prefix` + "/" in front), so the dict is the `max_logits` QK-Clip takes.
        """
        if "attn_max_logits" not in aux:
            raise ConfigError("config.model.backbone.track_max_logits",
                              "no attn_max_logits in the aux output: build the backbone with "
                              "BackboneSpec.track_max_logits=True (config.model.backbone.track_max_logits)")
        head = f"{prefix}/" if prefix else ""
        return {f"{head}{stack}/attn": v for stack, v in aux["attn_max_logits"].items()}

    def head_logits(self, x: jax.Array) -> jax.Array:
        """The output head alone on normalised states: `[B, S, H]` -> float32 `[B, S, V]`."""
        dt = self.spec.dtype
        logits = jnp.einsum("bsh,hv->bsv", x.astype(dt), self.head[...].astype(dt),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm + head: `[B, S, H]` -> float32 logits `[B, S, V]`."""
        return self.head_logits(self.final_norm(h))

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array):
        """Text-only forward: (logits `[B, S, V]`, h `[B, S, H]`, aux)."""
        h, aux = self.run_layers(self.embed_tokens(tokens), positions, segment_ids)
        return self.logits(h), h, aux

    def update_router_biases(self, expert_load: jax.Array, rate: float) -> None:
        """Auxiliary-loss-free balancing step from a step's `expert_load [L_moe, E]`."""
        if self.moe_layers is None:
            return
        bias = self.moe_layers.mlp.correction_bias
        bias[...] = update_router_bias(bias[...], expert_load, rate)
