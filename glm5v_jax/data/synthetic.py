"""Random packed VLM batches in the model's batch format, for tests and benchmarks.

Images of the given sizes go through the real NaFlex preprocessing; each image
becomes `<|begin_of_image|> <|image|> x (gh/2 * gw/2) <|end_of_image|>` followed by
random text, in its own packed document; text-only documents fill the rest.
The real data pipeline (shapes world, grain) produces the same keys.
"""
from __future__ import annotations

import numpy as np

from glm5v_jax.data.batch import validate_vlm_batch
from glm5v_jax.data.naflex import naflex_preprocess


def packed_vlm_batch(
    *,
    rows: int,
    seq_len: int,
    vocab_size: int,
    image_token_id: int,
    image_sizes: list[tuple[int, int]],
    patch_size: int = 16,
    max_patches: int = 64,
    merge: int = 2,
    seed: int = 0,
    text_docs_per_row: int = 1,
    max_images: int | None = None,
    first_text_id: int = 16,
) -> dict[str, np.ndarray]:
    """A batch dict: tokens/segment_ids `[rows, seq_len]` and NaFlex image arrays.

    Images are dealt to rows round-robin; token ids below `first_text_id` are
    reserved for special tokens (begin/end of image use image_token_id + 1 / + 2).
    """
    rng = np.random.default_rng(seed)
    n_img = max_images if max_images is not None else len(image_sizes)
    dim = patch_size * patch_size * 3
    out = dict(
        tokens=np.zeros((rows, seq_len), np.int32),
        segment_ids=np.zeros((rows, seq_len), np.int32),
        patches=np.zeros((n_img, max_patches, dim), np.float32),
        patch_yx=np.zeros((n_img, max_patches, 2), np.int32),
        patch_valid=np.zeros((n_img, max_patches), bool),
        image_grid=np.zeros((n_img, 2), np.int32),
        image_valid=np.zeros((n_img,), bool),
    )
    cursor = [0] * rows
    segment = [0] * rows

    def put(row: int, ids: np.ndarray) -> None:
        start = cursor[row]
        if start + len(ids) > seq_len:
            raise ValueError(f"row {row} overflows seq_len={seq_len}; use a longer row or fewer images")
        segment[row] += 1
        out["tokens"][row, start:start + len(ids)] = ids
        out["segment_ids"][row, start:start + len(ids)] = segment[row]
        cursor[row] += len(ids)

    def text(n: int) -> np.ndarray:
        return rng.integers(first_text_id, vocab_size, n).astype(np.int32)

    for j, (h, w) in enumerate(image_sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        item = naflex_preprocess(pixels, patch_size=patch_size, max_patches=max_patches, merge=merge)
        out["patches"][j], out["patch_yx"][j], out["patch_valid"][j] = item["patches"], item["patch_yx"], item["valid"]
        out["image_grid"][j], out["image_valid"][j] = item["grid"], True
        n_tok = int(item["grid"][0] // merge * (item["grid"][1] // merge))
        ids = np.concatenate([text(3), [image_token_id + 1], np.full(n_tok, image_token_id),
                              [image_token_id + 2], text(6)]).astype(np.int32)
        put(j % rows, ids)
    for row in range(rows):
        for _ in range(text_docs_per_row):
            room = seq_len - cursor[row]
            if room >= 4:
                put(row, text(int(rng.integers(4, max(5, room // 2 + 1)))))
    validate_vlm_batch(out, image_token_id=image_token_id, vocab_size=vocab_size, merge=merge)
    return out
