"""Counting XLA compilations: `with count_compiles() as names: ...` collects the name of every function
compiled inside the block (jax's backend-compile monitoring events). The generation tests and
`experiments/bench_generate.py` use it to show that serving compiles nothing after warm-up."""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Yields a list that gets the name of each function XLA compiles while the block runs."""
    names: list[str] = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
