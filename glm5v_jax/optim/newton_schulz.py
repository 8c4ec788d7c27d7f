"""Newton-Schulz orthogonalisation for Muon, with the published coefficient tables.

`newton_schulz(x)` maps each matrix of `x [..., m, n]` towards the orthogonal factor
U V^T of its SVD (all singular values pushed towards 1) with a few quintic steps

    A = X X^T;   X <- a X + (b A + c A A) X

run in bfloat16 after a float32 Frobenius normalisation. Leading axes are batch
axes (layer stacks, experts, heads). A tall matrix is processed transposed, so
X X^T is the smaller Gram matrix.

Presets (constants, never optimizer state):
  jordan         (3.4445, -4.7750, 2.0315) every step; X / (|X|_F + 1e-7).
  you            You Jiacheng's 5-row table; X / (|X|_F + 1e-7).
  polar_express  Polar Express 5-row table (safety 2e-2, cushion 2); X / (1.02 |X|_F + 1e-6).

Steps vs rows: step i uses row min(i, rows - 1), i.e. a table is followed row by row
and its last row repeats when `steps` exceeds its length (for `jordan` every step is
the same row). Fewer steps than rows uses the first rows. `steps` must be >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from glm5v_jax.errors import ConfigError


@dataclass(frozen=True)
class NSPreset:
    """A Newton-Schulz coefficient table and its input normalisation."""

    coefficients: tuple[tuple[float, float, float], ...]
    norm_scale: float = 1.0  # X / (norm_scale * |X|_F + eps)
    eps: float = 1e-7

    def row(self, step: int) -> tuple[float, float, float]:
        return self.coefficients[min(step, len(self.coefficients) - 1)]


PRESETS: dict[str, NSPreset] = {
    "jordan": NSPreset(((3.4445, -4.7750, 2.0315),)),
    "you": NSPreset((
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    )),
    "polar_express": NSPreset((
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ), norm_scale=1.02, eps=1e-6),
}


def get_preset(preset: str | NSPreset) -> NSPreset:
    if isinstance(preset, NSPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError("ns_preset", f"unknown Newton-Schulz preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def newton_schulz(x: jax.Array, preset: str | NSPreset = "polar_express", steps: int = 5, *,
                  dtype=jnp.bfloat16) -> jax.Array:
    """Approximately orthogonalise every matrix of `x [..., m, n]`; returns x's dtype."""
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices [..., m, n], got shape {x.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = get_preset(preset)
    out_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))
    y = (x32 / (table.norm_scale * norm + table.eps)).astype(dtype)
    # One row per step, as a constant of the compiled program (not optimizer state). The
    # loop is a lax.scan so the iterations appear once in the HLO (a while loop): sharded
    # callers can check that no collective runs inside it.
    coefficients = jnp.asarray([table.row(i) for i in range(steps)], jnp.float32)

    def step(y, abc):
        a, b, c = abc.astype(dtype)
        gram = y @ jnp.swapaxes(y, -1, -2)  # [..., m, m], m <= n
        poly = b * gram + c * (gram @ gram)
        return a * y + poly @ y, None

    y, _ = jax.lax.scan(step, y, coefficients)
    if tall:
        y = jnp.swapaxes(y, -1, -2)
    return y.astype(out_dtype)
