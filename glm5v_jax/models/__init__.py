"""Models: CogViT, projector, GLM backbone, MMTP and the GLM-5V VLM."""
