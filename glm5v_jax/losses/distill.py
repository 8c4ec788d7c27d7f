"""Feature distillation for CogViT stage 1: per-teacher target standardisation and the masked loss.

Teachers differ wildly in feature scale (SigLIP2 and DINOv3 token norms differ by an order of
magnitude), so each teacher's targets are standardised before the loss:

* `zscore`: per channel, (x - mean) / std from running statistics (Theia / RADIO's "mean and tx").
* `phi_s`: PHI-S (arXiv 2410.01680): y = H U^T (x - mean) / sqrt(mean(lambda)), where
  cov = U diag(lambda) U^T and H is a normalised Hadamard matrix. Every output channel then has
  the same variance, mean(lambda), so under MSE no channel and no teacher dominates.

The statistics are running estimates (an exponential moving average with bias correction, over
valid tokens only) kept in `RunningStat` variables, which the optimizer never sees (optimizers
are built `wrt=nnx.Param`). `distill_loss` compares student predictions with standardised
targets at masked positions only: cosine + smooth-L1 (AM-RADIO's 0.9 / 0.1) or MSE.
"""
from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Standardization(str, enum.Enum):
    NONE = "none"
    ZSCORE = "zscore"
    PHI_S = "phi_s"


class DistillLoss(str, enum.Enum):
    COSINE_SMOOTH_L1 = "cosine_smooth_l1"
    MSE = "mse"


class RunningStat(nnx.Variable):
    """Statistics updated from data outside the optimizer."""


# ----------------------------------------------------------------------------- Hadamard matrices
def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m by Paley's constructions with a prime q, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: order q + 1
        s = np.zeros((m, m), int)
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = _jacobsthal(q)
        return s + np.eye(m, dtype=int)
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II: order 2 (q + 1)
        c = np.zeros((q + 1, q + 1), int)
        c[0, 1:], c[1:, 0] = 1, 1
        c[1:, 1:] = _jacobsthal(q)
        return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=int),
                                                                 np.array([[1, -1], [-1, -1]]))
    return None


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> np.ndarray:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I): Sylvester doubling of a Paley
    matrix. Covers every power of two and 2^k x {12, 20, 36, ...}, e.g. the teacher widths 384,
    768, 1024, 1152 and 1280; raises for orders it cannot build."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for j in range(k, -1, -1):  # the largest power of two first, then a Paley factor
        m = n // 2 ** j
        base = np.ones((1, 1), int) if m == 1 else _paley(m)
        if base is not None:
            h = base
            for _ in range(j):
                h = np.block([[h, h], [h, -h]])
            return h
    raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley (prime q); use zscore "
                     f"standardisation for this feature width")


# ----------------------------------------------------------------------------- standardisation
def _masked_moments(x: jax.Array, valid: jax.Array, full_cov: bool):
    """Mean `[D]` and variance `[D]` or covariance `[D, D]` of the valid rows of x `[..., D]`."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w = valid.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mean = (w @ x) / n
    centred = (x - mean) * w[:, None]
    second = (centred.T @ centred) / n if full_cov else jnp.sum(centred * centred, 0) / n
    return mean, second, w.sum()


class FeatureStandardizer(nnx.Module):
    """Standardises one teacher's features with running statistics (see the module docstring)."""

    def __init__(self, dim: int, mode: Standardization | str = Standardization.ZSCORE, *,
                 momentum: float = 0.99, eps: float = 1e-6):
        self.mode = Standardization(mode)
        self.momentum, self.eps = momentum, eps
        full = self.mode == Standardization.PHI_S
        if full:
            self.hadamard = jnp.asarray(hadamard(dim), jnp.float32) / np.sqrt(dim)  # orthonormal
        self.mean = RunningStat(jnp.zeros((dim,), jnp.float32))
        self.second = RunningStat(jnp.zeros((dim, dim) if full else (dim,), jnp.float32))
        self.weight = RunningStat(jnp.zeros((), jnp.float32))  # 1 - momentum^updates: bias correction

    def update(self, features: jax.Array, valid: jax.Array) -> None:
        """Moves the statistics towards those of `features [..., D]` over `valid [...]` rows."""
        if self.mode == Standardization.NONE:
            return
        mean, second, count = _masked_moments(jax.lax.stop_gradient(features), valid,
                                              self.mode == Standardization.PHI_S)
        keep = jnp.where(count > 0, self.momentum, 1.0)  # a batch without valid rows changes nothing
        self.mean[...] = keep * self.mean[...] + (1 - keep) * mean
        self.second[...] = keep * self.second[...] + (1 - keep) * second
        self.weight[...] = keep * self.weight[...] + (1 - keep)

    def statistics(self) -> tuple[jax.Array, jax.Array]:
        """Bias-corrected (mean, variance or covariance)."""
        w = jnp.maximum(self.weight[...], 1e-12)
        return self.mean[...] / w, self.second[...] / w

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[..., D]` -> standardised `[..., D]` float32 (unchanged in mode `none`)."""
        x = features.astype(jnp.float32)
        if self.mode == Standardization.NONE:
            return x
        mean, second = self.statistics()
        if self.mode == Standardization.ZSCORE:
            return (x - mean) * jax.lax.rsqrt(second + self.eps)
        lam, u = jnp.linalg.eigh(second + self.eps * jnp.eye(second.shape[0]))
        scale = jax.lax.rsqrt(jnp.maximum(jnp.mean(lam), self.eps))
        return ((x - mean) @ u @ self.hadamard.T) * scale


# ----------------------------------------------------------------------------- the loss
def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
    a = jnp.abs(x)
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def distill_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, kind: DistillLoss | str, *,
                 cosine_weight: float = 0.9, smooth_l1_weight: float = 0.1) -> tuple[jax.Array, dict]:
    """Mean over masked positions of the per-token loss between pred and target `[B, N, D]`.

    mask `[B, N]`: positions that count (the MIM-masked valid patches); the rest, padding
    included, contribute nothing. Returns (loss, {"cosine": ..., "smooth_l1" | "mse": ...}).
    """
    kind = DistillLoss(kind)
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)

    def mean(per_token):
        return jnp.sum(per_token * w) / n

    cos = jnp.sum(pred * target, -1) * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(pred * pred, -1) * jnp.sum(target * target, -1), 1e-16))
    parts = {"cosine": mean(cos)}
    if kind == DistillLoss.MSE:
        parts["mse"] = mean(jnp.mean(jnp.square(pred - target), -1))
        return parts["mse"], parts
    parts["smooth_l1"] = mean(jnp.mean(smooth_l1(pred - target), -1))
    return cosine_weight * (1.0 - parts["cosine"]) + smooth_l1_weight * parts["smooth_l1"], parts
