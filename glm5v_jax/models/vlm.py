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

import jax
import jax.numpy as jnp
from flax import nnx

from glm5v_jax.models.backbone import GLMBackbone
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.mmtp import MMTP
from glm5v_jax.models.positions import mrope_positions
from glm5v_jax.models.projector import Projector
from glm5v_jax.models.specs import VLMSpec


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

    def __call__(self, batch):
        tokens, segment_ids = batch["tokens"], batch["segment_ids"]
        is_visual = tokens == self.spec.image_token_id
        embeds = self.backbone.embed_tokens(tokens)
        if "patches" in batch and batch["patches"].shape[0]:
            feats, feats_valid = self.encode_images(batch)
            embeds = scatter_image_features(embeds, is_visual, feats, feats_valid)
        positions = self.positions(batch)
        h, aux = self.backbone.run_layers(embeds, positions, segment_ids)
        out = {"logits": self.backbone.logits(h), "is_visual": is_visual, "aux": aux}
        if self.mtp is not None:
            logits, segments, inputs, mtp_aux = self.mtp(
                self.backbone, h, tokens, embeds, positions, segment_ids, is_visual)
            out.update(mtp_logits=logits, mtp_segments=segments, mtp_inputs=inputs, mtp_aux=mtp_aux)
        return out
