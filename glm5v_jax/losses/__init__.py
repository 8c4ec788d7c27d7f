"""Losses: next-token cross-entropy with MTP terms (lm.py); the sigmoid image-text loss, dense and
as a bidirectional ring over devices (contrastive.py)."""
from glm5v_jax.losses.contrastive import (  # noqa: F401
    all_gather_sigmoid_contrastive_loss,
    ring_sigmoid_contrastive_loss,
    sharded_sigmoid_contrastive_loss,
    sigmoid_contrastive_loss,
)
