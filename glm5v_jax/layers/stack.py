"""Stacked layers applied with a scan, so compile time does not grow with depth.

`stacked(make, n, rngs)` builds n copies of a layer with parameters stacked on a
leading `layers` axis (recorded in the sharding metadata); `scan_layers` applies
them in order, optionally rematerialising each layer in the backward pass.
"""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` layers made by `make(rngs)`, parameters stacked on axis 0 ('layers')."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def _make(r: nnx.Rngs):
        return make(r)

    return _make(rngs)


def scan_layers(
    layers: nnx.Module,
    carry: Any,
    body: Callable[[nnx.Module, Any], tuple[Any, Any]],
    *,
    remat: bool = False,
) -> tuple[Any, Any]:
    """Run `carry, out_l = body(layer_l, carry)` over the stack; outs stacked on axis 0."""
    fn = nnx.remat(body) if remat else body

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def _step(c, layer):
        return fn(layer, c)

    return _step(carry, layers)


def scan_layers_with(layers: nnx.Module, carry: Any, xs: Any, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]]
                     ) -> tuple[Any, Any]:
    """`scan_layers` with a per-layer input: `carry, out_l = body(layer_l, carry, xs[l])` (e.g. the layer's
    index into a KV cache carried whole); outs stacked on axis 0."""

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def _step(c, layer, x):
        return body(layer, c, x)

    return _step(carry, layers, xs)
