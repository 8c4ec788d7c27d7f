"""NaFlex variable-resolution image preprocessing for a ViT with a spatial merge.

Like SigLIP2 / big_vision `resize_to_sequence`, but written from scratch: an
image is resized, keeping its aspect ratio, to the largest patch grid that fits
a patch budget, cut into patches and padded to a fixed sequence length so that
batches have static shapes. Grid sides are multiples of `merge` because the
vision tower merges every `merge x merge` window of patches into one token
downstream; patches are emitted in merge-window order so that merging is a
plain reshape of consecutive rows.

NumPy and Pillow only (no jax / tensorflow / torch), so it runs in data workers.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


class NaFlexError(ValueError):
    """Invalid NaFlex arguments (budget, patch size, image size, shapes)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _largest_units(dim: int, other: int, units: int) -> int:
    """Largest a in [0, units] with a * ceil(a * other / dim) <= units (0 if none).

    a * ceil(a * other / dim) is nondecreasing in a, so a binary search is exact.
    """
    lo, hi = 0, units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * _ceil_div(mid * other, dim) <= units:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_grid(height: int, width: int, *, patch_size: int, max_patches: int,
             merge: int = 2) -> tuple[int, int]:
    """Patch grid `(grid_h, grid_w)` of the largest resize that fits `max_patches`.

    For a scale r, grid_h(r) = merge * ceil(height * r / (patch_size * merge))
    (same for width). We return the grid for the largest r with
    grid_h * grid_w <= max_patches. The product is nondecreasing and
    left-continuous in r, so that largest r exists and is a breakpoint of one
    side, r = a * merge * patch_size / side for an integer a; the search over a
    is done exactly in integers (no floats, deterministic). Small images are
    upsampled.

    Guarantees, with u = r / patch_size the exact scaled size in patches per px:
      * grid_h, grid_w are multiples of `merge`, >= merge, grid_h * grid_w <= max_patches;
      * aspect ratio within one merge group per side: 0 <= grid_h - u*height < merge
        and 0 <= grid_w - u*width < merge; equivalently, in integers,
        (grid_h - merge) * width < grid_w * height and
        (grid_w - merge) * height < grid_h * width;
      * maximal: at u, the side(s) with grid == u * side are tight; growing every
        tight side by `merge` (the next grid as r grows) exceeds `max_patches`.
    """
    if merge < 1:
        raise NaFlexError(f"merge ({merge}) must be >= 1")
    if patch_size <= 0:
        raise NaFlexError(f"patch_size ({patch_size}) must be positive")
    group = merge * merge
    if max_patches <= 0 or max_patches % group:
        raise NaFlexError(f"max_patches ({max_patches}) must be a positive multiple of "
                          f"the merge group merge*merge={group}")
    if height < patch_size or width < patch_size:
        raise NaFlexError(f"image of {height}x{width} px (HxW) is smaller than one "
                          f"{patch_size}-px patch")
    units = max_patches // group  # budget in merge groups
    a = _largest_units(height, width, units)  # height side tight
    b = _largest_units(width, height, units)  # width side tight
    # Scale of each candidate is proportional to a / height and b / width;
    # keep the larger one (a == 0 or b == 0 means no valid breakpoint there).
    if a and (not b or a * width >= b * height):
        gh, gw = a, _ceil_div(a * width, height)
    else:
        gh, gw = _ceil_div(b * height, width), b
    return gh * merge, gw * merge


def resize_to_grid(image: np.ndarray, grid_h: int, grid_w: int,
                   patch_size: int) -> np.ndarray:
    """Resize `[H, W, C]` to `[grid_h * p, grid_w * p, C]` float32 in [-1, 1].

    Pillow bicubic (antialiased when downsampling) on 32-bit float channels, so
    no intermediate uint8 rounding. uint8 input maps x / 127.5 - 1 (SigLIP range);
    float input is taken to be in [0, 1] and maps 2x - 1. Bicubic overshoot is
    clipped to [-1, 1].
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise NaFlexError(f"image must be [H, W, C], got shape {image.shape}")
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(image.dtype, np.floating):
        x = image.astype(np.float32) * 2.0 - 1.0
    else:
        raise NaFlexError(f"image dtype must be uint8 or float, got {image.dtype}")
    size = (grid_w * patch_size, grid_h * patch_size)  # PIL wants (width, height)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]))
                           .resize(size, Image.Resampling.BICUBIC))
                for c in range(x.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), -1.0, 1.0).astype(np.float32)


def patchify(image: np.ndarray, patch_size: int,
             merge: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Cut `[gh*p, gw*p, C]` into patches `[gh*gw, p*p*C]` in merge-window order.

    Order: merged row my, merged col mx, then the merge x merge patches of that
    window row-major (dy, dx); so every `merge**2` consecutive rows form one
    window and the downstream merge is a reshape. Each patch is flattened
    (p, p, C) row-major. `yx` `[gh*gw, 2]` int32 is each patch's (row, col).
    """
    hp, wp, c = image.shape
    p, m = patch_size, merge
    if hp % p or wp % p:
        raise NaFlexError(f"image of {hp}x{wp} px is not a whole number of {p}-px patches")
    gh, gw = hp // p, wp // p
    if gh % m or gw % m:
        raise NaFlexError(f"patch grid {gh}x{gw} is not a multiple of merge={m}")
    x = image.reshape(gh // m, m, p, gw // m, m, p, c)
    patches = x.transpose(0, 3, 1, 4, 2, 5, 6).reshape(gh * gw, p * p * c)
    rows, cols = np.indices((gh, gw), dtype=np.int32)
    yx = np.stack([rows, cols], axis=-1).reshape(gh // m, m, gw // m, m, 2)
    yx = yx.transpose(0, 2, 1, 3, 4).reshape(gh * gw, 2)
    return patches, yx


def pad_patches(patches: np.ndarray, yx: np.ndarray,
                max_patches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-pad patches and positions to `max_patches` rows; `valid` marks real ones."""
    n = patches.shape[0]
    if yx.shape[0] != n:
        raise NaFlexError(f"patches ({n}) and yx ({yx.shape[0]}) disagree in length")
    if n > max_patches:
        raise NaFlexError(f"{n} patches do not fit max_patches ({max_patches})")
    pad = max_patches - n
    out = np.pad(patches, ((0, pad), (0, 0)))
    out_yx = np.pad(yx.astype(np.int32), ((0, pad), (0, 0)))
    valid = np.arange(max_patches) < n
    return out, out_yx, valid


def naflex_preprocess(image: np.ndarray, *, patch_size: int, max_patches: int,
                      merge: int = 2) -> dict[str, np.ndarray]:
    """Full pipeline: fit grid, resize, patchify, pad.

    Returns patches float32 [max_patches, p*p*C], patch_yx int32 [max_patches, 2],
    valid bool [max_patches] and grid int32 [2] = (grid_h, grid_w).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise NaFlexError(f"image must be [H, W, C], got shape {image.shape}")
    gh, gw = fit_grid(image.shape[0], image.shape[1], patch_size=patch_size,
                      max_patches=max_patches, merge=merge)
    resized = resize_to_grid(image, gh, gw, patch_size)
    patches, yx = patchify(resized, patch_size, merge)
    patches, yx, valid = pad_patches(patches, yx, max_patches)
    return dict(patches=patches.astype(np.float32), patch_yx=yx, valid=valid,
                grid=np.array([gh, gw], dtype=np.int32))
