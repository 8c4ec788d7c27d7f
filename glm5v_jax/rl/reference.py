"""The reference policy kept in host memory (the report's section 2.4): "parameters remain resident on CPU
memory, are asynchronously prefetched to GPU immediately before reference forward, and are released right
after use".

    ref = HostReference(nnx.state(model, nnx.Param), shardings)   # a host copy, in pinned host memory
    ref.prefetch()                   # start the copy to the devices (returns at once: jax dispatch is async)
    ... other work overlaps the transfer ...
    with ref.on_device() as params:  # waits for the copy; the device copy is deleted on leaving
        logp_ref = reference_forward(params, batch)

The host copy uses the same shardings with `memory_kind="pinned_host"` (page-locked, so the transfer is a
DMA), or "unpinned_host" where the backend has no pinned memory, or plain NumPy arrays where it has neither.
`device_bytes()` counts the device copy, so callers (and tests) can check that a release gave it all back.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import numpy as np

HOST_KINDS = ("pinned_host", "unpinned_host")  # preferred first


def host_memory_kind(device: jax.Device) -> str | None:
    """The host memory kind `device` can address, pinned preferred; None if it has none."""
    kinds = {m.kind for m in device.addressable_memories()}
    return next((k for k in HOST_KINDS if k in kinds), None)


class HostReference:
    """Reference parameters resident in host memory, on the devices only between `prefetch` and `release`."""

    def __init__(self, params: Any, shardings: Any):
        self.shardings = shardings
        leaves = jax.tree.leaves(shardings)
        kind = host_memory_kind(next(iter(leaves[0].device_set))) if leaves else None
        self.memory_kind = kind or "numpy"
        if kind is None:
            self.host = jax.tree.map(np.asarray, jax.device_get(params))
        else:
            self.host = jax.device_put(params, jax.tree.map(lambda s: s.with_memory_kind(kind), shardings))
        self.nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(self.host))
        self._device: Any = None

    def prefetch(self) -> None:
        """Start copying the parameters to the devices (no wait); a second call while on device does nothing."""
        if self._device is None:
            self._device = jax.device_put(self.host, self.shardings)

    def get(self) -> Any:
        """The parameters on the devices (prefetching now if `prefetch` was not called), ready."""
        self.prefetch()
        return jax.block_until_ready(self._device)

    def release(self) -> None:
        """Delete the device copy now (not when Python collects it), so its memory is free for the step."""
        if self._device is not None:
            for leaf in jax.tree.leaves(self._device):
                leaf.delete()
            self._device = None

    @contextlib.contextmanager
    def on_device(self) -> Iterator[Any]:
        try:
            yield self.get()
        finally:
            self.release()

    def device_bytes(self) -> int:
        """Bytes of the device copy alive now (0 after `release`)."""
        if self._device is None:
            return 0
        return sum(int(x.nbytes) for x in jax.tree.leaves(self._device) if not x.is_deleted())


def device_resident_bytes() -> int:
    """Bytes of every live jax array in device memory (not in a host memory kind): what a release must return."""
    total = 0
    for x in jax.live_arrays():
        if x.is_deleted():
            continue
        kind = getattr(x.sharding, "memory_kind", None)
        if kind not in HOST_KINDS:
            total += int(x.nbytes)
    return total
