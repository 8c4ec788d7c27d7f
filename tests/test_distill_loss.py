"""Stage-1 distillation pieces: Hadamard matrices for every teacher width, running z-score and
PHI-S standardisation against NumPy, and the masked loss counting masked positions only."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.losses.distill import FeatureStandardizer, distill_loss, hadamard, smooth_l1


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 36, 40, 384, 768, 1024, 1152, 1280])
def test_hadamard_orders_cover_the_teacher_widths(n):
    h = hadamard(n)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=int))


def test_hadamard_refuses_orders_it_cannot_build():
    with pytest.raises(ValueError, match="zscore"):
        hadamard(6)  # no Hadamard matrix of order 6 exists


def _features(rng, n=512, d=8):
    scales = np.linspace(0.1, 5.0, d)
    mixing = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return ((rng.normal(size=(n, d)) * scales) @ mixing + rng.normal(size=d) * 3).astype(np.float32)


def test_zscore_matches_numpy_over_valid_rows_only():
    rng = np.random.default_rng(0)
    x = _features(rng)
    valid = rng.random(512) < 0.7
    garbage = np.where(valid[:, None], x, 1e6).astype(np.float32)  # padding rows must not count
    std = FeatureStandardizer(8, "zscore", momentum=0.0)  # momentum 0: exactly this batch's stats
    std.update(jnp.asarray(garbage), jnp.asarray(valid))
    y = np.asarray(std(jnp.asarray(x[valid])))
    ref = (x[valid] - x[valid].mean(0)) / np.sqrt(x[valid].var(0) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_running_statistics_are_bias_corrected_averages():
    rng = np.random.default_rng(1)
    batches = [_features(rng, 64) for _ in range(3)]
    std = FeatureStandardizer(8, "zscore", momentum=0.5)
    for b in batches:
        std.update(jnp.asarray(b), jnp.ones(64, bool))
    w = np.array([0.25, 0.5, 1.0]) * 0.5  # EMA weights (1-m) m^(2-t), then / (1 - m^3)
    mean, _ = std.statistics()
    np.testing.assert_allclose(mean, sum(wi * b.mean(0) for wi, b in zip(w, batches)) / w.sum(), rtol=1e-5)
    # A batch with no valid rows changes nothing.
    before = np.asarray(std.statistics()[0])
    std.update(jnp.asarray(batches[0]), jnp.zeros(64, bool))
    np.testing.assert_array_equal(std.statistics()[0], before)


def test_phi_s_makes_targets_isotropic_with_equal_channel_variance():
    rng = np.random.default_rng(2)
    x = _features(rng, 4096, 8)
    std = FeatureStandardizer(8, "phi_s", momentum=0.0)
    std.update(jnp.asarray(x), jnp.ones(4096, bool))
    y = np.asarray(std(jnp.asarray(x)), np.float64)
    cov = np.cov(x.T, bias=True)
    lam, u = np.linalg.eigh(cov)
    ref = (x - x.mean(0)) @ u @ (hadamard(8) / np.sqrt(8)).T / np.sqrt(lam.mean())
    # eigenvector signs are arbitrary: compare covariances, which are sign-free
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.cov(ref.T, bias=True), atol=1e-3)
    var = y.var(0)
    np.testing.assert_allclose(var, var.mean(), rtol=1e-2)  # every channel the same variance
    assert np.trace(np.cov(y.T, bias=True)) == pytest.approx(8.0, rel=1e-3)  # total variance D


def test_standardizer_statistics_are_not_parameters():
    std = FeatureStandardizer(4, "zscore")
    assert not jax.tree.leaves(nnx.state(std, nnx.Param))


def test_loss_counts_masked_positions_only():
    rng = np.random.default_rng(3)
    pred = jnp.asarray(rng.normal(size=(2, 6, 4)).astype(np.float32))
    target = jnp.asarray(rng.normal(size=(2, 6, 4)).astype(np.float32))
    mask = jnp.asarray(np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], bool))
    for kind in ("mse", "cosine_smooth_l1"):
        loss, _ = distill_loss(pred, target, mask, kind)
        changed = jnp.where(mask[..., None], pred, pred + 100.0)  # unmasked positions: anything
        assert float(distill_loss(changed, target, mask, kind)[0]) == pytest.approx(float(loss), rel=1e-6)
    p, t, m = np.asarray(pred), np.asarray(target), np.asarray(mask)
    mse = np.mean(((p - t) ** 2).mean(-1)[m])
    assert float(distill_loss(pred, target, mask, "mse")[0]) == pytest.approx(mse, rel=1e-5)
    cos = (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    sl1 = np.asarray(smooth_l1(pred - target)).mean(-1)
    expected = 0.9 * (1 - cos[m].mean()) + 0.1 * sl1[m].mean()
    assert float(distill_loss(pred, target, mask, "cosine_smooth_l1")[0]) == pytest.approx(expected, rel=1e-5)
    grads = jax.grad(lambda q: distill_loss(q, target, mask, "mse")[0])(pred)
    assert not np.asarray(grads)[~m].any()  # no gradient reaches unmasked positions
