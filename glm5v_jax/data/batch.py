"""The VLM batch contract, and a host-side check of it with errors that name the key.

Inside `jit` the model cannot raise, so a batch whose `<|image|>` tokens do not
match its images would silently mix features. Loaders and trainers call
`validate_vlm_batch` on each host batch (NumPy, cheap) before it reaches a device.

Keys (NI = image slots, N = patch budget, g = merge**2):
  tokens [B, S] int32, segment_ids [B, S] int32 (0 = padding),
  patches [NI, N, P*P*3] float, patch_yx [NI, N, 2] int32, patch_valid [NI, N] bool,
  image_grid [NI, 2] int32 (patch rows, cols), image_valid [NI] bool,
  optional positions [B, S, 3] int32, loss_mask [B, S] bool.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


class BatchError(ValueError):
    """A batch that breaks the contract; the message names the key."""


def validate_vlm_batch(batch: Mapping[str, np.ndarray], *, image_token_id: int, vocab_size: int,
                       merge: int = 2) -> None:
    """Raise `BatchError` unless `batch` is a consistent VLM batch."""
    for key in ("tokens", "segment_ids"):
        if key not in batch:
            raise BatchError(f"batch is missing {key!r}")
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2 or np.asarray(batch["segment_ids"]).shape != tokens.shape:
        raise BatchError(f"tokens {tokens.shape} and segment_ids {np.shape(batch['segment_ids'])} "
                         "must both be [B, S]")
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= vocab_size:
        raise BatchError(f"tokens must lie in [0, vocab_size={vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    n_image_tokens = int((tokens == image_token_id).sum())
    if "patches" not in batch:
        if n_image_tokens:
            raise BatchError(f"tokens hold {n_image_tokens} <|image|> tokens but the batch has no 'patches'")
        return
    valid = np.asarray(batch["patch_valid"]).astype(bool)
    grid = np.asarray(batch["image_grid"])
    image_valid = np.asarray(batch["image_valid"]).astype(bool)
    ni, n = valid.shape
    if np.shape(batch["patches"])[:2] != (ni, n) or np.shape(batch["patch_yx"]) != (ni, n, 2):
        raise BatchError(f"patches {np.shape(batch['patches'])} and patch_yx {np.shape(batch['patch_yx'])} "
                         f"must match patch_valid [{ni}, {n}] (+ [.., 2] for patch_yx)")
    if grid.shape != (ni, 2) or image_valid.shape != (ni,):
        raise BatchError(f"image_grid {grid.shape} must be [{ni}, 2] and image_valid {image_valid.shape} [{ni}]")
    g = merge * merge
    if n % g:
        raise BatchError(f"patch budget {n} (patch_valid.shape[1]) is not a multiple of merge**2 = {g}")
    for j in np.flatnonzero(image_valid):
        gh, gw = (int(x) for x in grid[j])
        if gh % merge or gw % merge:
            raise BatchError(f"image_grid[{j}] = ({gh}, {gw}) is not a multiple of merge={merge} per side")
        if int(valid[j].sum()) != gh * gw:
            raise BatchError(f"image {j}: patch_valid marks {int(valid[j].sum())} patches, "
                             f"image_grid says {gh}x{gw}={gh * gw}")
        if not valid[j, : gh * gw].all():
            raise BatchError(f"image {j}: valid patches must come first (padding at the end)")
    expected = int(sum((grid[j, 0] // merge) * (grid[j, 1] // merge) for j in np.flatnonzero(image_valid)))
    if n_image_tokens != expected:
        raise BatchError(f"tokens hold {n_image_tokens} <|image|> tokens (id {image_token_id}) but the images "
                         f"give {expected} merged tokens (image_grid / {merge}, valid images only)")
