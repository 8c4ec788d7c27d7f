"""MIM masks: exactly round(0.35 x valid) valid patches per image, never padding, for random and
block-wise layouts; block-wise masks are contiguous; reproducible from the key; jit-friendly."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.models.masking import mim_mask, masked_count


def _batch(grids, n=64):
    """NaFlex-style valid / patch_yx for images with the given (rows, cols) grids, padded to n."""
    valid = np.zeros((len(grids), n), bool)
    yx = np.zeros((len(grids), n, 2), np.int32)
    for i, (h, w) in enumerate(grids):
        rows, cols = np.indices((h, w))
        valid[i, :h * w] = True
        yx[i, :h * w] = np.stack([rows.ravel(), cols.ravel()], -1)
    return jnp.asarray(valid), jnp.asarray(yx)


GRIDS = [(8, 8), (4, 6), (2, 3), (1, 1), (5, 7), (0, 0)]


@pytest.mark.parametrize("layout", ["random", "block"])
def test_exact_count_and_never_padding(layout):
    valid, yx = _batch(GRIDS)
    fn = jax.jit(lambda k: mim_mask(k, valid, yx, ratio=0.35, layout=layout))
    for seed in range(5):
        mask = np.asarray(fn(jax.random.key(seed)))
        n_valid = np.asarray(valid).sum(1)
        np.testing.assert_array_equal(mask.sum(1), np.round(0.35 * n_valid).astype(int))
        assert not (mask & ~np.asarray(valid)).any()
    np.testing.assert_array_equal(masked_count(valid, 0.35), [22, 8, 2, 0, 12, 0])  # 22.4, 8.4, 2.1, .35, 12.25


def test_same_key_same_mask_and_keys_differ():
    valid, yx = _batch(GRIDS)
    a = mim_mask(jax.random.key(1), valid, yx, layout="block")
    b = mim_mask(jax.random.key(1), valid, yx, layout="block")
    c = mim_mask(jax.random.key(2), valid, yx, layout="block")
    assert bool(jnp.array_equal(a, b)) and not bool(jnp.array_equal(a, c))


def _masked_neighbours(mask, h, w):
    """Mean number of masked 4-neighbours of a masked patch on an h x w grid."""
    m = mask[:h * w].reshape(h, w)
    p = np.pad(m, 1)
    nb = p[:-2, 1:-1].astype(int) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return nb[m].mean()


def test_block_masks_are_contiguous_random_masks_are_not():
    valid, yx = _batch([(16, 16)], n=256)
    block = [_masked_neighbours(np.asarray(mim_mask(jax.random.key(s), valid, yx, layout="block"))[0], 16, 16)
             for s in range(8)]
    rand = [_masked_neighbours(np.asarray(mim_mask(jax.random.key(s), valid, yx, layout="random"))[0], 16, 16)
            for s in range(8)]
    # random at 35%: about 4 x 0.35 = 1.4 masked neighbours; blobs: most neighbours of a masked patch are masked
    assert np.mean(rand) < 1.8 and np.mean(block) > 2.8, (np.mean(rand), np.mean(block))


def test_bad_arguments_are_named():
    valid, yx = _batch([(2, 2)], n=4)
    with pytest.raises(ValueError, match="ratio"):
        mim_mask(jax.random.key(0), valid, yx, ratio=1.5)
    with pytest.raises(ValueError, match="patch_yx"):
        mim_mask(jax.random.key(0), valid, None, layout="block")
    with pytest.raises(ValueError):
        mim_mask(jax.random.key(0), valid, yx, layout="checkerboard")
