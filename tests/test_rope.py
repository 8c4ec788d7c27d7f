"""Tests for rotary embeddings (glm5v_jax.layers.rope): partial 1D RoPE, M-RoPE, 2D RoPE."""
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.layers.rope import Rotary, apply_rotary

B, S, H = 2, 5, 3


def _np_rope_1d(x, positions, rotary_dim, theta):
    """NeoX RoPE in NumPy via complex rotation: (x_j + i x_{j+R/2}) * exp(i pos w_j)."""
    half = rotary_dim // 2
    inv_freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / rotary_dim)
    angles = positions.astype(np.float64)[:, :, None, None] * inv_freq  # [B, S, 1, R/2]
    x = x.astype(np.float64)
    z = (x[..., :half] + 1j * x[..., half:rotary_dim]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag, x[..., rotary_dim:]], axis=-1)


def _scores(q, k):
    """Per-head dot products q_s . k_t: [B, H, S, T] in float64."""
    return np.einsum("bshd,bthd->bhst", np.asarray(q, np.float64), np.asarray(k, np.float64))


def _rotated_scores(rot, q, k, positions):
    cos, sin = rot.cos_sin(jnp.asarray(positions))
    return _scores(apply_rotary(jnp.asarray(q), cos, sin), apply_rotary(jnp.asarray(k), cos, sin))


def _assert_scores_close(a, b):
    scale = np.max(np.abs(b))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def test_partial_rope_matches_numpy_and_passes_tail_through():
    """Partial 1D RoPE equals an independent NumPy complex-rotation RoPE; dims >= rotary_dim are untouched."""
    head_dim, rotary_dim, theta = 24, 16, 10000.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    pos = rng.integers(0, 200, size=(B, S))
    rot = Rotary(rotary_dim, theta)
    cos, sin = rot.cos_sin(jnp.asarray(pos)[..., None])
    assert cos.shape == (B, S, rotary_dim // 2)
    out = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])
    np.testing.assert_allclose(out, _np_rope_1d(x, pos, rotary_dim, theta), rtol=1e-4, atol=1e-4)
    # Rotation preserves the norm of the rotary part.
    np.testing.assert_allclose(np.linalg.norm(out[..., :rotary_dim], axis=-1),
                               np.linalg.norm(x[..., :rotary_dim], axis=-1), rtol=1e-5)


def test_partial_rope_shift_invariance():
    """1D partial RoPE: q.k scores depend only on position differences."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, S, H, 24)).astype(np.float32)
    k = rng.standard_normal((B, S, H, 24)).astype(np.float32)
    pos = rng.integers(0, 40, size=(B, S, 1))
    rot = Rotary(16, 10000.0)
    base = _rotated_scores(rot, q, k, pos)
    _assert_scores_close(_rotated_scores(rot, q, k, pos + 17), base)
    # Sanity: the check can fail - non-uniform shifts change the scores.
    assert not np.allclose(_rotated_scores(rot, q, k, pos + np.arange(S)[:, None]), base, rtol=1e-3, atol=1e-3)


def test_mrope_shift_invariance_common_and_per_axis():
    """M-RoPE (4, 6, 6): scores unchanged by a common shift and by independent per-axis shifts."""
    rng = np.random.default_rng(2)
    head_dim = 40  # rotary_dim 32 < head_dim: partial M-RoPE
    q = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    k = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    pos = rng.integers(0, 40, size=(B, S, 3))
    rot = Rotary(32, 10000.0, (4, 6, 6))
    base = _rotated_scores(rot, q, k, pos)
    _assert_scores_close(_rotated_scores(rot, q, k, pos + 9), base)
    _assert_scores_close(_rotated_scores(rot, q, k, pos + np.array([5, 23, 2])), base)
    # Each axis matters: changing one axis non-uniformly changes the scores.
    for a in range(3):
        moved = pos.copy()
        moved[..., a] += np.arange(S) * 3
        assert not np.allclose(_rotated_scores(rot, q, k, moved), base, rtol=1e-3, atol=1e-3)


def test_2d_vit_rope_shift_invariance():
    """2D ViT RoPE (restart_per_section) over (y, x): scores invariant to per-axis shifts."""
    head_dim = 16
    rng = np.random.default_rng(3)
    q = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    k = rng.standard_normal((B, S, H, head_dim)).astype(np.float32)
    yx = rng.integers(0, 30, size=(B, S, 2))
    rot = Rotary(head_dim, 100.0, (head_dim // 4, head_dim // 4), restart_per_section=True)
    base = _rotated_scores(rot, q, k, yx)
    _assert_scores_close(_rotated_scores(rot, q, k, yx + 7), base)
    _assert_scores_close(_rotated_scores(rot, q, k, yx + np.array([3, 11])), base)
    # y and x each use the full frequency range theta^(-j/n), j < n.
    inv_freq, axis = rot.frequencies()
    n = head_dim // 4
    expected = np.concatenate([100.0 ** (-np.arange(n) / n)] * 2)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    np.testing.assert_array_equal(axis, [0] * n + [1] * n)


def test_mrope_equal_axes_reduces_to_1d():
    """M-RoPE with t = h = w gives the same tables and rotation as 1D RoPE."""
    rng = np.random.default_rng(4)
    pos = rng.integers(0, 100, size=(B, S))
    mrope = Rotary(32, 10000.0, (4, 6, 6))
    rope = Rotary(32, 10000.0)
    inv_m, axis_m = mrope.frequencies()
    inv_1, _ = rope.frequencies()
    np.testing.assert_allclose(inv_m, 10000.0 ** (-2.0 * np.arange(16) / 32), rtol=1e-6)
    np.testing.assert_array_equal(inv_m, inv_1)
    np.testing.assert_array_equal(axis_m, [0] * 4 + [1] * 6 + [2] * 6)
    cos_m, sin_m = mrope.cos_sin(jnp.asarray(np.repeat(pos[..., None], 3, axis=-1)))
    cos_1, sin_1 = rope.cos_sin(jnp.asarray(pos)[..., None])
    np.testing.assert_allclose(np.asarray(cos_m), np.asarray(cos_1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin_m), np.asarray(sin_1), atol=1e-6)
    x = rng.standard_normal((B, S, H, 32)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(apply_rotary(jnp.asarray(x), cos_m, sin_m)),
                               _np_rope_1d(x, pos, 32, 10000.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(rotary_dim=32, sections=(4, 6, 5)),   # sums to 15, not 16
    dict(rotary_dim=32, sections=(8, 8, 8)),   # sums to 24
    dict(rotary_dim=15),                       # odd rotary_dim
])
def test_bad_settings_raise(kwargs):
    """Sections that do not sum to rotary_dim/2 (or an odd rotary_dim) raise ValueError."""
    with pytest.raises(ValueError):
        Rotary(**kwargs)


def test_too_few_position_axes_and_too_wide_rotary_raise():
    """Positions with fewer axes than sections, or rotary dims > head_dim, raise ValueError."""
    with pytest.raises(ValueError):
        Rotary(32, 10000.0, (4, 6, 6)).cos_sin(jnp.zeros((B, S, 2), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        Rotary(32).cos_sin(jnp.zeros((B, S), jnp.int32))  # no axis dim: refused, not guessed
    cos, sin = Rotary(32).cos_sin(jnp.zeros((B, 1, 1), jnp.int32))
    assert cos.shape == (B, 1, 16)  # a single-token step keeps its sequence axis
    cos, sin = Rotary(32).cos_sin(jnp.zeros((B, S, 1), jnp.int32))
    with pytest.raises(ValueError):
        apply_rotary(jnp.zeros((B, S, H, 16)), cos, sin)
