"""GLM-5V-style vision-language model: CogViT -> projector -> GLM backbone (+ MMTP).

The batch holds packed token rows and a flat list of
NaFlex images. Projected vision features are scattered into the `<|image|>`
positions in order of appearance over the flattened batch, and M-RoPE positions
are built from the image grids unless the batch brings its own.

The batch keys are documented, and checked on the host, in `glm5v_jax.data.batch`
(`validate_vlm_batch`): inside `jit` a mismatch between `<|image|>` tokens and
images cannot raise.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.attention import CachePages
from glm5v_jax.models.backbone import GLMBackbone
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.mmtp import MMTP, stack_name, stream_keep
from glm5v_jax.models.positions import continue_positions, mrope_positions
from glm5v_jax.models.projector import Projector
from glm5v_jax.models.specs import TrunkGradient, VLMSpec


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array,
                           features_valid: jax.Array) -> jax.Array:
    """Put the valid rows of `features [M, H]` into the image positions of `embeds [B, S, H]`.

    The r-th image position (row-major over the batch) gets the r-th valid feature
    row, like `masked_scatter`. The data pipeline guarantees the counts match.
    """
    order = jnp.argsort(~features_valid, stable=True)  # valid rows first, in order
    compact = features[order]
    rank = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1
    gathered = compact[jnp.clip(rank, 0, compact.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _trunk_two_streams(trunk, state, x, positions, segment_ids, is_visual):
    """(h, aux, h_for_mtp) = trunk's output twice; see `trunk_isolating_vision`."""
    h, aux = trunk(state, x, positions, segment_ids)
    return h, aux, h


def _trunk_two_streams_fwd(trunk, state, x, positions, segment_ids, is_visual):
    (h, aux), vjp_fn = jax.vjp(lambda s, e: trunk(s, e, positions, segment_ids), state, x)
    return (h, aux, h), (vjp_fn, is_visual)


def _trunk_two_streams_bwd(trunk, res, cotangents):
    vjp_fn, is_visual = res
    g_main, g_aux, g_mtp = cotangents
    d_state, dx_all = vjp_fn((g_main + g_mtp, g_aux))  # parameters learn from both losses
    _, dx_main = vjp_fn((g_main, g_aux))  # the input at image positions: main loss only
    dx = jnp.where(is_visual[..., None], dx_main, dx_all)
    return d_state, dx, None, None, None


_trunk_two_streams.defvjp(_trunk_two_streams_fwd, _trunk_two_streams_bwd)


def trunk_isolating_vision(backbone: GLMBackbone, embeds, positions, segment_ids, is_visual):
    """Run the decoder stack once; return (h, aux, h_for_mtp) (`trunk_gradient="isolate_vision"`).

    An ablation option of this project, not from the report (whose MTP loss, as in
    DeepSeek-V3, trains everything upstream of h^0, vision tower included). Forward values
    are identical. In the backward pass, gradient arriving at
    `h_for_mtp` trains the trunk's parameters and the text inputs, but is dropped at
    the image positions of the input, so it never reaches the vision tower.
    """
    graphdef, state = nnx.split(backbone)

    def trunk(state, x, positions, segment_ids):
        return nnx.merge(graphdef, state).run_layers(x, positions, segment_ids)

    return _trunk_two_streams(trunk, state, embeds, positions, segment_ids, is_visual)


class GLM5V(nnx.Module):
    """The full model; `__call__(batch)` returns a dict of logits, masks and aux."""

    def __init__(self, spec: VLMSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.vision = CogViT(spec.vision, rngs=rngs)
        self.projector = Projector(spec.projector, rngs=rngs)
        self.backbone = GLMBackbone(spec.backbone, rngs=rngs)
        self.mtp = MMTP(spec.mtp, spec.backbone, rngs=rngs) if spec.mtp.num_depths else None

    def encode_images(self, batch) -> tuple[jax.Array, jax.Array]:
        """Vision features `[NI * N/g, H]` and their validity, in scatter order."""
        tokens = self.vision(batch["patches"], batch["patch_yx"], batch["patch_valid"])
        merged, valid = self.projector(tokens, batch["patch_valid"])
        valid = valid & batch["image_valid"][:, None]
        return merged.reshape(-1, merged.shape[-1]), valid.reshape(-1)

    def positions(self, batch) -> jax.Array:
        if "positions" in batch:
            return batch["positions"]
        grid = batch.get("image_grid")
        merged = None if grid is None else grid // self.spec.vision.merge_size
        return mrope_positions(batch["tokens"], batch["segment_ids"], self.spec.image_token_id,
                               merged, batch.get("image_valid"))

    def embed(self, batch) -> tuple[jax.Array, jax.Array, bool]:
        """(token embeddings `[B, S, H]` with the vision features at the image tokens, is_visual
        `[B, S]`, whether the batch has images); CogViT and the projector run once per image."""
        tokens = batch["tokens"]
        is_visual = tokens == self.spec.image_token_id
        embeds = self.backbone.embed_tokens(tokens)
        has_images = "patches" in batch and batch["patches"].shape[0] > 0
        if has_images:
            feats, feats_valid = self.encode_images(batch)
            embeds = scatter_image_features(embeds, is_visual, feats, feats_valid)
        return embeds, is_visual, has_images

    def extend_cached(self, chunk, offsets: jax.Array, cache: dict, pages: CachePages) -> dict:
        """New tokens of sequences held in a paged KV cache (generation: a prompt or a chunk of it, decoded
        tokens, a tool result or an image appended mid-conversation).

        chunk: `tokens [B, S]`, `valid [B, S]` (False: bucket padding) and, when the chunk holds image
        tokens, its images in order (`patches`, `patch_yx`, `patch_valid`, `image_grid`, `image_valid`);
        offsets `[B]`: each sequence's next M-RoPE position. Returns logits `[B, S, V]`, h (before the
        final norm), the updated cache, the new offsets, positions, embeds, is_visual, expert_load and
        expert_ids `[B, S, L_moe, top_k]` (each new token's routed experts, for routing replay).
        """
        embeds, is_visual, _ = self.embed(chunk)
        grid = chunk.get("image_grid")
        merged = None if grid is None else grid // self.spec.vision.merge_size
        positions, offsets = continue_positions(chunk["tokens"], chunk["valid"], offsets, self.spec.image_token_id,
                                                merged, chunk.get("image_valid"))
        h, updated, routing = self.backbone.run_layers_cached(embeds, positions, cache, pages)
        b, s = chunk["tokens"].shape
        no_moe = jnp.zeros((b, s, 0, 0), jnp.int32)
        return dict(logits=self.backbone.logits(h), h=h, cache={**cache, **updated}, offsets=offsets,
                    positions=positions, embeds=embeds, is_visual=is_visual,
                    expert_load=routing.get("expert_load"), expert_ids=routing.get("expert_ids", no_moe))

    def cache_stacks(self) -> dict[str, int]:
        """{paged-cache stack name: number of layers} of every stack `extend_cached` and
        `extend_mtp_cached` read: "dense_layers", "moe_layers" (those that exist), "mtp_0", ..."""
        spec = self.spec.backbone
        layers = {"dense_layers": spec.first_k_dense, "moe_layers": spec.num_moe_layers}
        depths = 0 if self.mtp is None else len(self.mtp.depths)
        return {**{name: layers[name] for name in self.backbone.stacks()}, **{stack_name(i): 1 for i in range(depths)}}

    def mtp_in_stream(self, tokens: jax.Array, next_tokens: jax.Array, known: jax.Array) -> jax.Array:
        """Which entries are in an MTP depth's stream `[B, S]`: entry (position i) has token `tokens`
        (t_i) and, for depth k, `next_tokens` (t_{i+k}); `known`: the entry is real and t_{i+k} is known.
        The rule of the training forward (`mmtp.stream_keep`): in `mask` mode neither token is visual."""
        image = self.spec.image_token_id
        seg = known.astype(jnp.int32)
        return stream_keep(seg, seg, tokens == image, next_tokens == image, self.spec.mtp.mode)

    def mtp_stream_embeds(self, tokens: jax.Array, embeds: jax.Array | None = None) -> jax.Array:
        """The MTP stream's embedding of tokens `[B, S]` -> `[B, S, H]`: `embeds` (the merged input
        embeddings `extend_cached` returns) in `visual_embed` mode, else the token embeddings (the
        `<|image|>` row at images). Sampled text tokens need no `embeds`; image tokens do in `visual_embed`."""
        return self.mtp.stream_embeds(self.backbone, tokens, embeds, tokens == self.spec.image_token_id)

    def extend_mtp_cached(self, depth_index: int, h_prev: jax.Array, next_embeds: jax.Array, positions: jax.Array,
                          in_stream: jax.Array, cache: dict, table: jax.Array, stream_lengths: jax.Array) -> dict:
        """New entries of MTP depth k = depth_index + 1 over its paged cache (stack `mmtp.stack_name`).

        The entry of position i reads h^{k-1}_i and the stream embedding of token t_{i+k}; its logits
        predict t_{i+k+1}. Per entry (`[B, S, ...]`, in position order, after the row's cached ones):
        h_prev `[B, S, H]`: for depth_index 0 the `h` of `extend_cached` (before the final norm; h0_norm
        is applied here), else the previous depth's returned `h`; next_embeds `[B, S, H]`:
        `mtp_stream_embeds` of t_{i+k}; positions `[B, S, 3]`: position i's M-RoPE positions (`positions`
        of `extend_cached`); in_stream `[B, S]` (`mtp_in_stream`; False also for bucket padding). The
        depth's cache is compacted: it holds in-stream entries only, `stream_lengths [B]` of them per row
        before the call, under the same page table `table [B, N]` as the backbone. Returns logits
        `[B, S, V]`, h `[B, S, H]` (before head_norm; both zero off the stream), the whole cache with
        this depth's stack updated, and stream_lengths after the call."""
        name = stack_name(depth_index)
        logits, h, updated, lengths = self.mtp.extend_cached(self.backbone, depth_index, h_prev, next_embeds,
                                                             positions, in_stream, cache[name], table,
                                                             stream_lengths)
        return dict(logits=logits, h=h, cache={**cache, name: updated}, stream_lengths=lengths)

    def __call__(self, batch):
        tokens, segment_ids = batch["tokens"], batch["segment_ids"]
        embeds, is_visual, has_images = self.embed(batch)
        positions = self.positions(batch)
        isolate = (self.mtp is not None and has_images
                   and self.spec.mtp.trunk_gradient == TrunkGradient.ISOLATE_VISION)
        replay = batch.get("expert_ids")  # routing replay `[B, S, L_moe, top_k]` (RL); the MTP routers route alone
        if isolate:
            if replay is not None:
                raise ConfigError("mtp.trunk_gradient", "routing replay (a batch with expert_ids) runs the trunk "
                                  "once with the replayed routes; use trunk_gradient 'full' or 'stop'")
            h, aux, h_mtp = trunk_isolating_vision(self.backbone, embeds, positions, segment_ids, is_visual)
        else:
            h, aux = self.backbone.run_layers(embeds, positions, segment_ids, replay)
            h_mtp = h
        out = {"logits": self.backbone.logits(h), "is_visual": is_visual, "aux": aux}
        if self.mtp is not None:  # h_mtp before the final norm: MMTP applies spec.mtp.h0_norm
            logits, segments, inputs, mtp_aux = self.mtp(
                self.backbone, h_mtp, tokens, embeds, positions, segment_ids, is_visual)
            out.update(mtp_logits=logits, mtp_segments=segments, mtp_inputs=inputs, mtp_aux=mtp_aux)
        return out

    def attention_max_logits(self, outputs) -> dict[str, jax.Array]:
        """{attention-module path: per-head max logits} of the backbone and MTP blocks.

        Needs `spec.backbone.track_max_logits`. Keys are module paths from the model
        root ("backbone/dense_layers/attn" -> `[L_dense, H]`, "mtp/depths/0/block/attn"
        -> `[H]`), matching `glm5v_jax.optim.qk_clip.qk_clip_targets(model,
        prefixes=("backbone", "mtp"))`: pass the dict as QK-Clip's `max_logits`.
        CogViT is not tracked (it uses QK-Norm, where QK-Clip does not apply).
        """
        found = self.backbone.attention_max_logits(outputs["aux"], prefix="backbone")
        for i, aux in enumerate(outputs.get("mtp_aux", ())):
            found[f"mtp/depths/{i}/block/attn"] = aux["attn_max_logits"]
        return found
