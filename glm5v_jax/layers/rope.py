"""Rotary position embeddings: partial 1D RoPE, M-RoPE (t, h, w) and 2D RoPE (y, x).

One mechanism covers all three. The rotary part of a head (its first
`rotary_dim` dims) is rotated NeoX style (`rotate_half`: dim j pairs with
j + rotary_dim/2). Frequency j (0 <= j < rotary_dim/2) reads one position axis:
with `sections=(s0, s1, ...)` the first s0 frequencies read axis 0, the next s1
axis 1, and so on (GLM-4.5V M-RoPE uses sections (8, 12, 12) over (t, h, w) for
64 rotary dims). Without sections there is one axis. With
`restart_per_section=True` every section spans the full frequency range on its
own (2D RoPE in a ViT, where y and x should be treated alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.errors import ConfigError


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding settings; `cos_sin(positions)` gives the tables to apply.

    positions: `[..., num_axes]` int (1D RoPE: `[..., 1]`).
    """

    rotary_dim: int
    theta: float = 10000.0
    sections: tuple[int, ...] | None = None
    restart_per_section: bool = False

    def __post_init__(self):
        if self.rotary_dim % 2:
            raise ConfigError("rotary_dim", f"rotary_dim ({self.rotary_dim}) must be even")
        if self.sections is not None and sum(self.sections) != self.rotary_dim // 2:
            raise ConfigError(
                "sections", f"rope sections {self.sections} must sum to rotary_dim/2 = {self.rotary_dim // 2}"
            )

    @property
    def num_axes(self) -> int:
        return 1 if self.sections is None else len(self.sections)

    def frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """(inverse frequency [rotary_dim/2], position axis of each frequency)."""
        half = self.rotary_dim // 2
        sections = self.sections or (half,)
        inv_freq, axis = [], []
        for a, n in enumerate(sections):
            if self.restart_per_section:
                j = np.arange(n)
                inv_freq.append(self.theta ** (-j / n))
            else:
                start = sum(sections[:a])
                j = np.arange(start, start + n)
                inv_freq.append(self.theta ** (-2.0 * j / self.rotary_dim))
            axis.append(np.full(n, a))
        return np.concatenate(inv_freq).astype(np.float32), np.concatenate(axis)

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos and sin tables `[..., rotary_dim/2]` in float32."""
        inv_freq, axis = self.frequencies()
        pos = positions.astype(jnp.float32)
        if pos.ndim == 0 or pos.shape[-1] != self.num_axes:
            raise ValueError(
                f"positions {tuple(pos.shape)} must end in an axis of size {self.num_axes} "
                f"(one per rotary section); for 1D RoPE pass positions[..., None]"
            )
        angles = jnp.take(pos, jnp.asarray(axis), axis=-1) * jnp.asarray(inv_freq)
        return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first 2*cos.shape[-1] dims of `x [B, S, H, D]` (NeoX rotate_half).

    cos, sin: `[B, S, R/2]`; dims beyond R pass through unchanged.
    """
    half = cos.shape[-1]
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"rotary dims ({rot}) exceed head_dim ({x.shape[-1]})")
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rot], x32[..., rot:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)
    return out.astype(x.dtype)
