"""Test setup: 8 fake CPU devices and cheap XLA compilation, before any JAX work."""
import os

# Tiny shapes: compile time dominates, so trade generated-code speed for it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
