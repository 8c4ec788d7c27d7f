"""Muon parity with an independent NumPy reference of the published algorithm.

The reference below follows Keller Jordan's Muon in PyTorch's layout: a weight is
stored [out, in] (y = x @ W.T), its gradient is orthogonalised as that [out, in]
matrix with the quintic Newton-Schulz iteration (3.4445, -4.7750, 2.0315), 5 steps,
X / (|X|_F + 1e-7), tall matrices transposed; the update is scaled by
max(1, rows / cols) ** 0.5; the step is p *= 1 - lr * wd, then p -= lr * update.
Momentum: m <- lerp(m, g, 1 - beta); update = lerp(g, m, beta) (Nesterov) or m.

Our parameters are stored input-first (y = x @ W, W [fan_in, fan_out]), so the reference
sees W.T and its gradient G.T. Leaves routed to AdamW (table entry None) are checked
against a NumPy AdamW as optax.adamw does it (bias correction, eps outside the square
root, decoupled decay lr * wd * p), with decay only on leaves of two or more dimensions.
Everything is float64 in NumPy; JAX runs in float32 with 'highest' matmul precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.optim.muon import muon
from glm5v_jax.optim.routing import MatrixSpec

JORDAN = (3.4445, -4.7750, 2.0315)

# Input-first shapes [fan_in, fan_out]. In PyTorch layout [out, in] these are square,
# tall (48 x 16: NS transposes it, scale sqrt(3)) and wide (16 x 48: scale 1).
MATRICES = {
    ("blocks", "square"): (32, 32),
    ("blocks", "up"): (16, 48),
    ("blocks", "down"): (48, 16),
}
ADAM_LEAVES = {
    ("blocks", "bias"): (48,),  # 1-D: AdamW, no weight decay (matrices_only mask)
    ("embed",): (24, 16),  # a matrix routed to AdamW (like an embedding): decayed
}
STEPS = 5


# ---------------------------------------------------------------- NumPy reference


def _np_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    a, b, c = JORDAN
    x = g.astype(np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class _NumpyMuon:
    """One [out, in] weight, PyTorch conventions."""

    def __init__(self, weight, lr, wd, beta, nesterov):
        self.p = np.array(weight, np.float64)
        self.m = np.zeros_like(self.p)
        self.lr, self.wd, self.beta, self.nesterov = lr, wd, beta, nesterov

    def step(self, grad):
        grad = np.asarray(grad, np.float64)
        self.m = self.m + (1 - self.beta) * (grad - self.m)  # lerp(m, g, 1 - beta)
        u = grad + self.beta * (self.m - grad) if self.nesterov else self.m  # lerp(g, m, beta)
        u = _np_newton_schulz(u) * max(1.0, u.shape[0] / u.shape[1]) ** 0.5
        self.p = self.p * (1 - self.lr * self.wd)
        self.p = self.p - self.lr * u


class _NumpyAdamW:
    def __init__(self, param, lr, b1, b2, eps, wd):
        self.p = np.array(param, np.float64)
        self.mu = np.zeros_like(self.p)
        self.nu = np.zeros_like(self.p)
        self.t = 0
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.wd = wd if self.p.ndim >= 2 else 0.0

    def step(self, grad):
        grad = np.asarray(grad, np.float64)
        self.t += 1
        self.mu = self.b1 * self.mu + (1 - self.b1) * grad
        self.nu = self.b2 * self.nu + (1 - self.b2) * grad * grad
        mu_hat = self.mu / (1 - self.b1 ** self.t)
        nu_hat = self.nu / (1 - self.b2 ** self.t)
        u = mu_hat / (np.sqrt(nu_hat) + self.eps) + self.wd * self.p
        self.p = self.p - self.lr * u


# ---------------------------------------------------------------- helpers


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return out


def _get(tree, key):
    for k in key:
        tree = tree[k]
    return tree


def _random(rng, shapes, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _run_both(*, nesterov, lr=0.1, wd=0.1, beta=0.95, adam_lr=0.01, adam_kw=None, seed=0):
    """Run `STEPS` steps of ours and of the reference; yield (step, ours, reference, initial) per step."""
    adam_kw = adam_kw or {}
    rng = np.random.default_rng(seed)
    init = {**_random(rng, MATRICES), **_random(rng, ADAM_LEAVES)}
    table = {k: MatrixSpec((), (0,), (1,)) for k in MATRICES} | {k: None for k in ADAM_LEAVES}

    tx = muon(lr, table, beta=beta, nesterov=nesterov, ns_preset="jordan", ns_steps=5,
              ns_dtype=jnp.float32, scale_mode="spectral", weight_decay=wd,
              adam_learning_rate=adam_lr, **adam_kw)
    params = jax.tree.map(jnp.asarray, _nest(init))
    state = tx.init(params)

    ref_muon = {k: _NumpyMuon(init[k].T, lr, wd, beta, nesterov) for k in MATRICES}  # [out, in]
    adam_hp = {"b1": adam_kw.get("adam_b1", 0.9), "b2": adam_kw.get("adam_b2", 0.95),
               "eps": adam_kw.get("adam_eps", 1e-8), "wd": adam_kw.get("adam_weight_decay", wd)}
    ref_adam = {k: _NumpyAdamW(init[k], adam_lr, **adam_hp) for k in ADAM_LEAVES}

    for step in range(STEPS):
        grads = {**_random(rng, MATRICES, scale=0.5 + step), **_random(rng, ADAM_LEAVES, scale=0.5 + step)}
        updates, state = tx.update(jax.tree.map(jnp.asarray, _nest(grads)), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k, r in ref_muon.items():
            r.step(grads[k].T)
        for k, r in ref_adam.items():
            r.step(grads[k])
        ours = {k: np.asarray(_get(params, k)) for k in (*MATRICES, *ADAM_LEAVES)}
        ref = {k: r.p.T for k, r in ref_muon.items()} | {k: r.p for k, r in ref_adam.items()}
        yield step, ours, ref, init


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_numpy_reference(nesterov):
    with jax.default_matmul_precision("highest"):
        for step, ours, ref, init in _run_both(nesterov=nesterov):
            for k in (*MATRICES, *ADAM_LEAVES):
                assert ours[k].shape == init[k].shape
                # Each step moves every leaf by far more than the tolerance, so a wrong
                # update (coefficient, scale, orientation, decay, momentum) cannot pass.
                assert np.max(np.abs(ref[k] - init[k])) > 1e-3, (step, k)
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, rtol=0,
                                           err_msg=f"{'/'.join(k)} after step {step + 1}")


def test_adamw_branch_hyperparameters_match_numpy_reference():
    """Non-default AdamW settings reach the AdamW leaves (eps large enough to matter)."""
    adam_kw = {"adam_b1": 0.8, "adam_b2": 0.99, "adam_eps": 1e-2, "adam_weight_decay": 0.3}
    with jax.default_matmul_precision("highest"):
        for step, ours, ref, _ in _run_both(nesterov=True, adam_lr=0.05, adam_kw=adam_kw, seed=1):
            for k in (*MATRICES, *ADAM_LEAVES):
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, rtol=0,
                                           err_msg=f"{'/'.join(k)} after step {step + 1}")


def test_reference_orthogonalises():
    """The NumPy reference itself: singular values of NS(G) land in Jordan's band."""
    g = np.random.default_rng(0).standard_normal((16, 48))
    for x in (g, g.T):
        s = np.linalg.svd(_np_newton_schulz(x), compute_uv=False)
        assert s.min() > 0.6 and s.max() < 1.25, s
