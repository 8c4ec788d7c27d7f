"""Multimodal multi-token prediction (MMTP), DeepSeek-V3-style with GLM naming.

Depth k (1..D) at position i combines the previous depth's hidden state h^{k-1}_i
with the embedding of token t_{i+k}:

    h'_i = eh_proj [enorm(e_{i+k}); hnorm(h^{k-1}_i)]      (embedding first, as GLM)
    h^k  = DecoderBlock_k(h')                              (causal, packed segments)
    logits^k_i = head(shared_head_norm_k(h^k_i))  -> predicts t_{i+k+1}

The embedding table and head are the backbone's. What e_{i+k} is at image
positions is the MMTP mode (`MMTPMode`): the backbone's merged input embeddings
(`visual_embed`), the shared `<|image|>` row of the embedding table
(`image_token`), or nothing at all: visual positions leave the stream, neither
attended to nor used as input (`mask`).

h^0, the main model's last hidden state, is read *after* the backbone's final RMSNorm
by default (`MTPSpec.h0_norm="final_norm"`; `"pre_norm"` reads the trunk's output
before it). That is what the released GLM-4.5 MTP weights (`model.layers.{N}.enorm /
hnorm / eh_proj / shared_head`) are served with. Settled from sglang
(github.com/sgl-project/sglang):
  * `python/sglang/srt/models/glm4_moe.py`, `Glm4MoeModel.forward` ends with
    `hidden_states, _ = self.norm(hidden_states, residual)` and returns that, and
    `Glm4MoeForCausalLM.forward` hands exactly this tensor to
    `self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch, ...)`;
  * `python/sglang/srt/layers/logits_processor.py` stores that argument as the captured
    hidden state for speculative decoding (`hidden_states_to_store = hidden_states`),
    which the EAGLE/MTP worker puts in `spec_info.hidden_states`;
  * `python/sglang/srt/models/glm4_moe_nextn.py` (lines 93-97 at commit 008b79d2),
    `Glm4MoeModelNextN.forward` reads it as `self.hnorm(forward_batch.spec_info.hidden_states)` in
    `self.eh_proj(torch.cat((self.enorm(hidden_states), self.hnorm(...)), dim=-1))`.
vLLM agrees (`vllm/model_executor/models/glm4_moe.py`: `Glm4MoeModel.forward` returns
`self.norm(hidden_states, residual)`, the runner passes it on as `target_hidden_states`,
and `glm4_moe_mtp.py` applies `self.hnorm(previous_hidden_states)`). So hnorm
normalises an already-normalised h^0. For k > 1 (GLM-4.5 ships one depth, so no
checkpoint decides it) the state passed on is h^k before `head_norm`, as vLLM's
`Glm4MoeMultiTokenPredictorLayer.forward` returns it (sglang's NextN passes the normed one).

Generation (`MMTP.extend_cached`, called through `GLM5V.extend_mtp_cached`): each depth has its own
paged KV cache (stack `stack_name(d)`, one layer). Depth k's entry for position i can only be computed
once t_{i+k} is known, so its stream lags the main one by k tokens. The cache is *compacted*: it holds
the in-stream entries only, in order (`stream_cache_pages`), so `mask` mode needs no key mask; keys keep
their real M-RoPE positions in the rotary. In the other modes every position is in the stream.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.layers.attention import CachePages
from glm5v_jax.layers.norms import RMSNorm
from glm5v_jax.layers.params import normal, param
from glm5v_jax.models.backbone import DecoderBlock, GLMBackbone
from glm5v_jax.models.specs import BackboneSpec, H0Norm, MMTPMode, MTPSpec, TrunkGradient


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, i] <- x[:, i + k] along axis 1; the last k entries get `fill`."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def stream_keep(segment, next_segment, is_visual, next_is_visual, mode: MMTPMode) -> jax.Array:
    """The MTP stream rule, elementwise: is the entry of position i (segment id `segment`, 0 = none;
    `is_visual`) whose depth-k input is token i+k (`next_segment`, `next_is_visual`) in the stream?

    Token i+k must exist in the same document; in `mask` mode neither token may be visual.
    """
    keep = (segment != 0) & (next_segment == segment)
    if mode == MMTPMode.MASK:
        keep &= ~is_visual & ~next_is_visual
    return keep


def stream_segments(segment_ids: jax.Array, is_visual: jax.Array, depth: int, mode: MMTPMode) -> jax.Array:
    """Segment ids of the depth-k MTP stream `[B, S]` (0 = position not in the stream), by `stream_keep`."""
    keep = stream_keep(segment_ids, shift_left(segment_ids, depth), is_visual,
                       shift_left(is_visual, depth, fill=True), mode)
    return jnp.where(keep, segment_ids, 0)


def stream_cache_pages(table: jax.Array, stream_lengths: jax.Array, in_stream: jax.Array
                       ) -> tuple[CachePages, jax.Array]:
    """Where a chunk's entries go in a depth's *compacted* paged cache, which holds only in-stream
    entries, in order: entry s of row b (`in_stream [B, S]`) is written at `stream_lengths[b]` plus the
    number of in-stream entries before it in the chunk; the others are never written. Returns
    (CachePages whose `token_index` is that compact index, also the causal query index, and the
    stream lengths after the chunk `[B]`)."""
    in_stream = in_stream.astype(bool)
    rank = jnp.cumsum(in_stream.astype(jnp.int32), axis=1) - in_stream
    lengths = (stream_lengths + jnp.sum(in_stream, axis=1)).astype(jnp.int32)
    index = (stream_lengths[:, None] + rank).astype(jnp.int32)
    return CachePages(table, lengths, index, in_stream), lengths


def stack_name(depth_index: int) -> str:
    """The paged-cache stack of MTP depth `depth_index` (0-based): "mtp_0", "mtp_1", ..."""
    return f"mtp_{depth_index}"


class MTPDepth(nnx.Module):
    """One MTP depth: enorm, hnorm, eh_proj, a decoder block, shared_head.norm."""

    def __init__(self, spec: BackboneSpec, *, moe: bool, rngs: nnx.Rngs):
        h, pdt = spec.embed_dim, spec.param_dtype
        self.dtype = spec.dtype
        self.enorm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.hnorm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)
        self.eh_proj = param(rngs, normal(spec.init_std), (2 * h, h), ("mtp_concat", "embed"), pdt)
        self.block = DecoderBlock(spec, moe=moe, rngs=rngs)
        self.head_norm = RMSNorm(h, eps=spec.norm_eps, param_dtype=pdt, rngs=rngs)

    def _input(self, h_prev, emb_next):
        """h' = eh_proj [enorm(e); hnorm(h)] in the compute dtype."""
        dt = self.dtype
        x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1).astype(dt)
        return x @ self.eh_proj[...].astype(dt)

    def __call__(self, h_prev, emb_next, rotary, segment_ids):
        """h_prev, emb_next `[B, S, H]` -> (h^k `[B, S, H]` before head_norm, aux)."""
        return self.block(self._input(h_prev, emb_next), rotary, segment_ids)

    def cached(self, h_prev, emb_next, rotary, cache, pages: CachePages):
        """The depth on new stream entries over its paged cache ({"k", "v"}: `[1, KV, P, page, D]`):
        (h^k before head_norm, the updated cache, aux)."""
        return self.block.cached(self._input(h_prev, emb_next), rotary, cache, pages, jnp.int32(0))


class MMTP(nnx.Module):
    """D MTP depths over the backbone's hidden states; shares its embedding and head."""

    def __init__(self, spec: MTPSpec, backbone: BackboneSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        moe = spec.moe_block if spec.moe_block is not None else backbone.num_moe_layers > 0
        self.depths = nnx.List([MTPDepth(backbone, moe=moe, rngs=rngs) for _ in range(spec.num_depths)])

    def h0(self, backbone: GLMBackbone, h: jax.Array) -> jax.Array:
        """The depth-1 input h^0 from the trunk's output before the final norm (`spec.h0_norm`,
        `spec.trunk_gradient`)."""
        if self.spec.h0_norm == H0Norm.FINAL_NORM:
            h = backbone.final_norm(h)
        if self.spec.trunk_gradient == TrunkGradient.STOP:
            h = jax.lax.stop_gradient(h)
        return h

    def stream_embeds(self, backbone: GLMBackbone, tokens: jax.Array, input_embeds: jax.Array | None,
                      is_visual: jax.Array) -> jax.Array:
        """What the MTP stream reads as the embedding of each token `[B, S, H]` (depth k uses token
        i+k's at position i): the backbone's merged input embedding in `visual_embed` mode (token
        embeddings where `input_embeds` is None), the token embedding (the shared `<|image|>` row at
        image positions) otherwise, zeros at visual positions in `mask` mode."""
        if self.spec.mode == MMTPMode.VISUAL_EMBED and input_embeds is not None:
            embeds = input_embeds
        else:
            embeds = backbone.embed_tokens(tokens)
        if self.spec.mode == MMTPMode.MASK:
            embeds = jnp.where(is_visual[..., None], 0, embeds)
        return embeds

    def extend_cached(self, backbone: GLMBackbone, depth_index: int, h_prev: jax.Array, next_embeds: jax.Array,
                      positions: jax.Array, in_stream: jax.Array, cache: dict, table: jax.Array,
                      stream_lengths: jax.Array):
        """Entries of depth `depth_index + 1` over its compacted paged cache (`stream_cache_pages`);
        see `GLM5V.extend_mtp_cached`. Returns (logits `[B, S, V]`, h `[B, S, H]`, cache, lengths)."""
        depth = self.depths[depth_index]
        if depth_index == 0:
            h_prev = self.h0(backbone, h_prev)
        keep = in_stream.astype(bool)[..., None]
        pages, lengths = stream_cache_pages(table, stream_lengths, in_stream)
        h, cache, _ = depth.cached(jnp.where(keep, h_prev, 0), jnp.where(keep, next_embeds, 0),
                                   backbone.rotary_tables(positions), cache, pages)
        h = jnp.where(keep, h, 0)
        return backbone.head_logits(depth.head_norm(h)), h, cache, lengths

    def __call__(
        self,
        backbone: GLMBackbone,
        h0: jax.Array,
        tokens: jax.Array,
        input_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        is_visual: jax.Array,
    ):
        """Per-depth logits and stream masks.

        h0 `[B, S, H]`: the trunk's last hidden states *before* the backbone's final norm
        (`GLMBackbone.run_layers`); with `h0_norm="final_norm"` the norm is applied here.
        tokens `[B, S]`; input_embeds `[B, S, H]`: the backbone's merged input (vision
        features at image positions); is_visual `[B, S]`: image positions. Returns (list of
        logits `[B, S, V]`, list of stream segment ids `[B, S]`, list of MTP-stream inputs
        `[B, S, H]` (e_{i+k}, for inspection), list of the blocks' aux (MoE load and
        balance loss)).
        """
        stream_embeds = self.stream_embeds(backbone, tokens, input_embeds, is_visual)
        rotary = backbone.rotary_tables(positions)
        logits, segments, inputs, auxes = [], [], [], []
        h = self.h0(backbone, h0)
        for k, depth in enumerate(self.depths, start=1):
            seg_k = stream_segments(segment_ids, is_visual, k, self.spec.mode)
            in_stream = (seg_k != 0)[..., None]
            emb_k = jnp.where(in_stream, shift_left(stream_embeds, k), 0)
            h_in = jnp.where(in_stream, h, 0)
            h, aux = depth(h_in, emb_k, rotary, seg_k)
            h = jnp.where(in_stream, h, 0)
            logits.append(backbone.head_logits(depth.head_norm(h)))
            segments.append(seg_k)
            inputs.append(emb_k)
            auxes.append(aux)
        return logits, segments, inputs, auxes
