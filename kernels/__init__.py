"""Attention and MoE kernels with their pure-jnp references.

This package depends on jax only (never on the rest of glm5v_jax), so it can be
imported into other projects as `glm5v_jax.kernels`. The references here are the
ground truth that the Pallas kernels are tested against.
"""

from glm5v_jax.kernels.reference import (
    attention_max_logits,
    attention_reference,
    gmm_reference,
)

__all__ = ["attention_max_logits", "attention_reference", "gmm_reference"]
