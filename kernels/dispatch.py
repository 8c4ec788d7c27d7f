"""Choosing a kernel per platform, shared by `flash_attention` and `gmm` / `tgmm`.

`run_on_platform` picks, at lowering time (`jax.lax.platform_dependent`), the TPU
(Mosaic) kernel on TPU, the GPU (Triton) kernel on CUDA, the TPU kernel under the HLO
interpreter on CPU and a pure-jnp fallback elsewhere; `backend` forces a kernel and
`interpret` runs it (the TPU one unless `backend="gpu"`) in an interpreter.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

BACKENDS = ("tpu", "gpu")


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}; got {backend!r}")


def for_backend(value: Any, backend: str, name: str) -> Any:
    """`value[backend]` when `value` is a per-backend mapping (e.g. block sizes), else `value`."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{name} keys must be in {BACKENDS}; got {sorted(unknown)}")
        return value.get(backend)
    return value


def run_on_platform(
    args: tuple,
    *,
    tpu: Callable[..., Any],
    gpu: Callable[[], Callable[..., Any]],
    fallback: Callable[..., Any],
    backend: str | None,
    interpret: Any,
) -> Any:
    """Call the kernel for the platform on `args`.

    `tpu(*args, interpret=...)` and `gpu()(*args, interpret=...)` (gpu is a thunk so the
    Triton module is imported only when used); `fallback(*args)` is pure jnp.
    """
    check_backend(backend)
    if backend == "gpu":
        return gpu()(*args, interpret=interpret)
    if backend == "tpu" or interpret:
        return tpu(*args, interpret=interpret)
    gpu_kernel = gpu()
    return jax.lax.platform_dependent(
        *args,
        tpu=lambda *a: tpu(*a, interpret=False),
        cuda=lambda *a: gpu_kernel(*a, interpret=False),
        cpu=lambda *a: tpu(*a, interpret=True),
        default=fallback,
    )
