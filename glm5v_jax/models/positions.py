"""M-RoPE position ids `[B, S, 3]` (t, h, w) for packed image-text rows.

Text tokens use t = h = w = running index. An image block of gh x gw merged
tokens starting at st = (previous max) + 1 uses (st, st + row, st + col); the text
after it resumes at st + max(gh, gw). Positions restart at 0 with every packed
document (segment). Image tokens are matched to images in order of appearance
over the flattened batch, the same order the VLM scatters vision features in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def image_token_layout(is_image: jax.Array, merged_grid: jax.Array, image_valid: jax.Array):
    """For each position: (image index, row, col, is-last-token-of-its-image).

    is_image `[B, S]` bool; merged_grid `[NI, 2]` (rows, cols of merged tokens);
    image_valid `[NI]`. Values at non-image positions are meaningless.
    """
    b, s = is_image.shape
    counts = jnp.where(image_valid, merged_grid[:, 0] * merged_grid[:, 1], 0)  # [NI]
    ends = jnp.cumsum(counts)
    starts = ends - counts
    rank = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1  # order of appearance
    img = jnp.clip(jnp.searchsorted(ends, rank, side="right"), 0, counts.shape[0] - 1)
    local = rank - starts[img]
    cols = jnp.maximum(merged_grid[img, 1], 1)
    row, col = local // cols, local % cols
    last = local == counts[img] - 1
    shape = (b, s)
    return img.reshape(shape), row.reshape(shape), col.reshape(shape), last.reshape(shape)


def _advance(tokens, image_token_id, merged_grid, image_valid):
    """(how far each token moves t on `[B, S]`, is_image, row, col): text 1, an image block its span
    max(gh, gw) at its last token and 0 before."""
    is_image = tokens == image_token_id
    if merged_grid is None or merged_grid.shape[0] == 0:
        zeros = jnp.zeros(tokens.shape, jnp.int32)
        return jnp.ones(tokens.shape, jnp.int32), jnp.zeros_like(is_image), zeros, zeros
    if image_valid is None:
        image_valid = jnp.ones(merged_grid.shape[:1], bool)
    img, row, col, last = image_token_layout(is_image, merged_grid, image_valid)
    span = jnp.max(merged_grid, axis=-1)[img]
    return jnp.where(is_image, jnp.where(last, span, 0), 1).astype(jnp.int32), is_image, row, col


def continue_positions(
    tokens: jax.Array,
    valid: jax.Array,
    offsets: jax.Array,
    image_token_id: int,
    merged_grid: jax.Array | None = None,
    image_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Positions `[B, S, 3]` of new tokens appended to sequences whose next position is `offsets [B]`
    (generation: a prompt chunk, decoded tokens, a tool result or an image appended mid-conversation),
    and the offsets after them `[B]`. `valid [B, S]`: real tokens (False: bucket padding, at the end);
    `merged_grid` lists the images of these tokens in order. Chunk by chunk, this gives what
    `mrope_positions` gives the whole sequence."""
    positions = mrope_positions(tokens, valid.astype(jnp.int32), image_token_id, merged_grid, image_valid)
    advance, _, _, _ = _advance(tokens, image_token_id, merged_grid, image_valid)
    moved = jnp.sum(jnp.where(valid, advance, 0), axis=1)
    return positions + offsets[:, None, None].astype(jnp.int32), (offsets + moved).astype(jnp.int32)


def mrope_positions(
    tokens: jax.Array,
    segment_ids: jax.Array,
    image_token_id: int,
    merged_grid: jax.Array | None = None,
    image_valid: jax.Array | None = None,
) -> jax.Array:
    """Position ids `[B, S, 3]` int32; without images all three axes equal the index."""
    advance, is_image, row, col = _advance(tokens, image_token_id, merged_grid, image_valid)
    exclusive = jnp.cumsum(advance, axis=1) - advance
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    doc_start = segment_ids != prev
    base = jax.lax.cummax(jnp.where(doc_start, exclusive, 0), axis=1)
    t = exclusive - base
    h = jnp.where(is_image, t + row, t)
    w = jnp.where(is_image, t + col, t)
    return jnp.stack([t, h, w], axis=-1).astype(jnp.int32)
