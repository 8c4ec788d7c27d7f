"""Attention and MoE kernels with their pure-jnp references.

This package depends on jax only (never on the rest of glm5v_jax), so it can be
imported into other projects as `glm5v_jax.kernels`. The references here are the
ground truth that the Pallas kernels are tested against.

  flash_attention  GQA / segments / causal flash attention (TPU Mosaic, GPU Triton)
  BlockSizes       its tile sizes
  gmm, tgmm        MoE grouped matmul and its transposed form (TPU Mosaic, GPU Triton)
  attention_reference, attention_max_logits, gmm_reference   pure-jnp twins
  paged_attention_reference, paged_write, gather_pages   a paged KV cache (generation)
  paged_attention  attention over that cache: jax's Pallas TPU decode kernel on TPU, else the reference
"""

from glm5v_jax.kernels.attention_common import BlockSizes
from glm5v_jax.kernels.flash_attention import flash_attention
from glm5v_jax.kernels.gmm import gmm, tgmm
from glm5v_jax.kernels.paged_attention import paged_attention
from glm5v_jax.kernels.reference import (
    attention_max_logits,
    attention_reference,
    gather_pages,
    gmm_reference,
    paged_attention_reference,
    paged_write,
)

__all__ = ["BlockSizes", "attention_max_logits", "attention_reference", "flash_attention", "gather_pages", "gmm",
           "gmm_reference", "paged_attention", "paged_attention_reference", "paged_write", "tgmm"]
