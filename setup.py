"""glm5v_jax: a JAX/TPU-native reproduction of the GLM-5V-Turbo training system.

The top-level `kernels/` folder is installed as the package `glm5v_jax.kernels`
(see `package_dir`), so it depends on jax only and can be vendored on its own.
"""
from setuptools import find_packages, setup

_LIB_PACKAGES = [p for p in find_packages(include=["glm5v_jax", "glm5v_jax.*"])]
_KERNEL_PACKAGES = ["glm5v_jax.kernels"] + [
    "glm5v_jax.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="glm5v_jax",
    version="0.1.0",
    description="GLM-5V-Turbo training system in JAX / Flax NNX: CogViT, GLM MoE backbone, MMTP.",
    python_requires=">=3.11",
    packages=_LIB_PACKAGES + _KERNEL_PACKAGES,
    package_dir={"glm5v_jax.kernels": "kernels"},
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.6,<0.3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "pillow>=10",
        "absl-py>=2",
        # data: TFDS builds ArrayRecord without TensorFlow; grain reads it
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.5",
        "sentencepiece>=0.2,<0.3",
        # training: checkpoints, metrics (clu.metrics is TF-free), TensorBoard via tensorboardX
        "orbax-checkpoint>=0.11,<0.13",
        "clu>=0.0.12",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # teacher checkpoints (Hugging Face safetensors), read through the numpy API: no torch
        "safetensors>=0.4",
        # RL: model-based judges are called over HTTP asynchronously (glm5v_jax.rl.judge)
        "aiohttp>=3.9",
    ],
    extras_require={
        # tensorboard: to view the logs and, in tests, to read event files back
        # notebooks: colabs/ are executed by the test suite (nbclient + ipykernel), paired with jupytext
        # ruff: scripts/test.sh lints first (settings in ruff.toml)
        "test": ["pytest>=8", "pytest-xdist>=3", "tensorboard>=2.18", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "jupytext>=1.16", "ruff>=0.5"],
        # tpu: libtpu for the jax that install_requires picks (jax's own `tpu` extra pins the matching
        # jaxlib and libtpu, so adding it does not move jax); also lets a CPU host compile for TPU
        # topologies (glm5v_jax.tools.aot, tests/test_aot.py)
        "tpu": ["jax[tpu]"],
        # bench: experiments/bench_generate.py compares the generation engine with tunix's Sampler on the
        # same weights (its tunix columns say "not installed" without it); tunix is never imported by the library
        "bench": ["google-tunix>=0.1.7,<0.2"],
    },
)
