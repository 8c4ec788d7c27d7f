"""Padding helpers shared by every kernel wrapper (pure jnp): tiles need whole blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    """Pad `x` at the end of `axis` to `length` (`x` itself when already that long)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
