"""glm5v_jax: GLM-5V-Turbo training system in JAX and Flax NNX.

Importing this package is cheap: it pulls in neither tensorflow nor torch, and
submodules (layers, models, losses, ...) are imported on demand.
"""

__version__ = "0.1.0"
