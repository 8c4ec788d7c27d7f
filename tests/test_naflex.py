"""Tests for NaFlex preprocessing (glm5v_jax.data.naflex): grid fit, patch order, padding."""
import subprocess
import sys

import numpy as np
import pytest

from glm5v_jax.data import naflex
from glm5v_jax.data.naflex import (NaFlexError, fit_grid, naflex_preprocess, pad_patches,
                                   patchify, resize_to_grid)

_SIDES = [16, 17, 23, 31, 32, 37, 50, 64, 100, 127, 150, 224, 255, 384, 500, 640, 777,
          1000, 1023, 1500, 2000]
# All (h, w) with aspect ratio between 1:4 and 4:1 (extremes included), plus a few beyond.
_SIZES = [(h, w) for h in _SIDES for w in _SIDES if 4 * h >= w and 4 * w >= h]
_SIZES += [(16, 2000), (2000, 16), (17, 1999), (600, 16)]
_BUDGETS = [64, 256, 1024]


def _achievable(gh, gw, h, w, m):
    """Some scale u > 0 gives exactly this grid: (gh-m)/h < u <= gh/h, same for w."""
    return ((gh - m) * w < gw * h) & ((gw - m) * h < gh * w)


def _check_grid(h, w, p, budget, m):
    gh, gw = fit_grid(h, w, patch_size=p, max_patches=budget, merge=m)
    assert isinstance(gh, int) and isinstance(gw, int)
    # Budget and merge divisibility.
    assert gh * gw <= budget
    assert gh >= m and gw >= m and gh % m == 0 and gw % m == 0
    # Aspect ratio within one merge group per side (the docstring's exact bound):
    # exists u with 0 <= gh - u*h < m and 0 <= gw - u*w < m.
    assert _achievable(gh, gw, h, w, m)
    # Maximality: at the top scale u* = min(gh/h, gw/w) the tight side(s) grow by m
    # next; that grid exceeds the budget.
    tight_h, tight_w = gh * w <= gw * h, gw * h <= gh * w
    assert (gh + m * tight_h) * (gw + m * tight_w) > budget
    # Independent brute force: every grid reachable by some scale and within the
    # budget is elementwise <= the returned one (reachable grids are totally ordered).
    a, b = np.meshgrid(np.arange(1, budget // m + 1), np.arange(1, budget // m + 1),
                       indexing="ij")
    a, b = a * m, b * m
    ok = (a * b <= budget) & _achievable(a, b, h, w, m)
    assert ok.any()
    assert (a[ok] <= gh).all() and (b[ok] <= gw).all()
    return gh, gw


@pytest.mark.parametrize("budget", _BUDGETS)
def test_fit_grid_properties(budget):
    for h, w in _SIZES:
        _check_grid(h, w, 16, budget, 2)


@pytest.mark.parametrize("merge,patch", [(1, 14), (3, 16)])
def test_fit_grid_other_merge(merge, patch):
    for h, w in _SIZES[::7]:
        for budget in (36, 144, 576):
            _check_grid(h, w, patch, budget, merge)


def test_fit_grid_examples():
    assert fit_grid(224, 224, patch_size=16, max_patches=256) == (16, 16)
    assert fit_grid(16, 16, patch_size=16, max_patches=64) == (8, 8)  # upsampled
    assert fit_grid(100, 400, patch_size=16, max_patches=64) == (4, 16)
    assert fit_grid(400, 100, patch_size=16, max_patches=64) == (16, 4)
    # Deterministic and depends only on the aspect ratio, not on absolute size.
    assert fit_grid(37, 150, patch_size=16, max_patches=64) == \
        fit_grid(370, 1500, patch_size=16, max_patches=64)


def test_patchify_round_trip_and_merge_order():
    rng = np.random.default_rng(0)
    p, c, gh, gw = 4, 3, 6, 8
    img = rng.normal(size=(gh * p, gw * p, c)).astype(np.float32)
    patches, yx = patchify(img, p)
    assert patches.shape == (gh * gw, p * p * c) and yx.shape == (gh * gw, 2)
    assert yx.dtype == np.int32
    out = np.full_like(img, np.nan)
    for patch, (y, x) in zip(patches, yx):
        out[y * p:(y + 1) * p, x * p:(x + 1) * p] = patch.reshape(p, p, c)
    np.testing.assert_array_equal(out, img)
    assert len({tuple(v) for v in yx.tolist()}) == gh * gw
    groups = yx.reshape(-1, 4, 2)
    # Each group of 4 consecutive patches is one 2x2 window, inner order row-major.
    assert (groups // 2 == groups[:, :1] // 2).all()
    np.testing.assert_array_equal(groups % 2, np.broadcast_to([[0, 0], [0, 1], [1, 0], [1, 1]],
                                                              groups.shape))
    # Windows in row-major order over the merged grid.
    win = groups[:, 0] // 2
    np.testing.assert_array_equal(win[:, 0] * (gw // 2) + win[:, 1], np.arange(gh * gw // 4))


def test_patchify_merge_3():
    img = np.arange(18 * 12 * 2, dtype=np.float32).reshape(9 * 2, 6 * 2, 2)
    _, yx = patchify(img, 2, merge=3)
    groups = yx.reshape(-1, 9, 2)
    assert (groups // 3 == groups[:, :1] // 3).all()


def test_padding():
    rng = np.random.default_rng(1)
    for h, w, budget in [(37, 150, 64), (300, 200, 256), (16, 16, 64), (64, 1000, 1024)]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        out = naflex_preprocess(img, patch_size=16, max_patches=budget)
        gh, gw = out["grid"].tolist()
        n = int(out["valid"].sum())
        assert n == gh * gw and n % 4 == 0
        assert out["valid"][:n].all() and not out["valid"][n:].any()
        assert (out["patches"][n:] == 0).all() and (out["patch_yx"][n:] == 0).all()
        assert out["patch_yx"][:n, 0].max() == gh - 1 and out["patch_yx"][:n, 1].max() == gw - 1


def test_pad_patches_overflow():
    with pytest.raises(NaFlexError, match="max_patches"):
        pad_patches(np.zeros((8, 3)), np.zeros((8, 2), np.int32), 4)


def test_errors():
    assert issubclass(NaFlexError, ValueError)
    with pytest.raises(NaFlexError, match=r"max_patches \(30\).*merge\*merge=4"):
        fit_grid(64, 64, patch_size=16, max_patches=30)
    with pytest.raises(ValueError, match="max_patches"):
        fit_grid(64, 64, patch_size=16, max_patches=0)
    with pytest.raises(NaFlexError, match=r"8x40 px.*16-px patch"):
        fit_grid(8, 40, patch_size=16, max_patches=64)
    with pytest.raises(ValueError, match="40x15"):
        naflex_preprocess(np.zeros((40, 15, 3), np.uint8), patch_size=16, max_patches=64)
    with pytest.raises(NaFlexError, match="patch_size"):
        fit_grid(64, 64, patch_size=0, max_patches=64)


def test_full_pipeline():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(37, 150, 3), dtype=np.uint8)
    out = naflex_preprocess(img, patch_size=16, max_patches=64)
    assert set(out) == {"patches", "patch_yx", "valid", "grid"}
    assert out["patches"].shape == (64, 16 * 16 * 3) and out["patches"].dtype == np.float32
    assert out["patch_yx"].shape == (64, 2) and out["patch_yx"].dtype == np.int32
    assert out["valid"].shape == (64,) and out["valid"].dtype == np.bool_
    assert out["grid"].shape == (2,) and out["grid"].dtype == np.int32
    assert out["grid"].tolist() == list(fit_grid(37, 150, patch_size=16, max_patches=64))
    assert out["patches"].min() >= -1.0 and out["patches"].max() <= 1.0
    assert out["patches"].std() > 0.1  # not collapsed


def test_resize_value_range():
    for v, want in [(0, -1.0), (255, 1.0), (51, 51 / 127.5 - 1)]:
        img = np.full((30, 50, 3), v, np.uint8)
        out = resize_to_grid(img, 4, 6, 8)
        assert out.shape == (32, 48, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, want, atol=1e-5)
    # Float input in [0, 1] matches the uint8 path.
    img = np.random.default_rng(3).integers(0, 256, size=(40, 70, 3), dtype=np.uint8)
    np.testing.assert_allclose(resize_to_grid(img / 255.0, 2, 4, 16),
                               resize_to_grid(img, 2, 4, 16), atol=1e-5)


def test_no_heavy_imports():
    code = ("import sys, glm5v_jax.data.naflex; "
            "bad = {'jax', 'tensorflow', 'torch'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert naflex.__doc__
