"""Frozen teacher encoders for CogViT's masked distillation (stage 1): SigLIP2 and DINOv3 ViTs as
Flax NNX modules over the same NaFlex inputs as CogViT, each with its own pixel normalisation, and
loaders for their public checkpoint formats."""
