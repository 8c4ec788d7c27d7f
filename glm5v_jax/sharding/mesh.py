"""The device mesh from a config: named axes (data, fsdp, tensor, expert), one -1 allowed.

    config.mesh.shape = (1, -1, 1, 1)      # data, fsdp, tensor, expert over one slice (ICI)
    config.mesh.dcn_shape = (2, 1, 1, 1)   # across slices (DCN), multi-slice only

The -1 entry takes whatever the other axes leave of the device count. A shape whose
product is not the device count, or that has several -1s, zeros or negative sizes,
is refused with a `ConfigError` naming the field, before anything is compiled. Axes
are `AxisType.Auto`, so the logical-rule (GSPMD) style works: see `rules.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from glm5v_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the named mesh axes inside a slice (`shape`) and across slices (`dcn_shape`)."""

    shape: tuple[int, ...] = (1, -1, 1, 1)
    dcn_shape: tuple[int, ...] | None = None
    axes: tuple[str, ...] = MESH_AXES


def resolve_shape(shape: Sequence[int], num_devices: int, field: str = "config.mesh.shape") -> tuple[int, ...]:
    """`shape` with its -1 filled in so that the product is `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if sum(s == -1 for s in shape) > 1:
        raise ConfigError(field, f"at most one axis may be -1, got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(field, f"axis sizes must be positive (or one -1), got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(field, f"{shape}: the fixed axes ({known} devices) do not divide the "
                                     f"{num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(field, f"{shape} has {math.prod(shape)} devices but {num_devices} are available")
    return shape


def make_mesh(spec: MeshSpec, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with `spec`'s named axes, all `AxisType.Auto`."""
    devices = list(jax.devices() if devices is None else devices)
    if len(spec.shape) != len(spec.axes):
        raise ConfigError("config.mesh.shape", f"needs one size per axis {spec.axes}, got {spec.shape}")
    types = (AxisType.Auto,) * len(spec.axes)
    if spec.dcn_shape is None:
        shape = resolve_shape(spec.shape, len(devices))
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # noqa: BLE001 - CPU/fake devices have no physical topology
            grid = np.asarray(devices).reshape(shape)
        return Mesh(grid, spec.axes, axis_types=types)
    if len(spec.dcn_shape) != len(spec.axes):
        raise ConfigError("config.mesh.dcn_shape", f"needs one size per axis {spec.axes}, got {spec.dcn_shape}")
    slices = {getattr(d, "slice_index", 0) for d in devices}
    dcn = resolve_shape(spec.dcn_shape, len(slices), "config.mesh.dcn_shape")
    ici = resolve_shape(spec.shape, len(devices) // len(slices))
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, spec.axes, axis_types=types)


def mesh_spec_from_config(cfg) -> MeshSpec:
    """MeshSpec from `config.mesh` (fields `shape`, optional `dcn_shape`)."""
    shape = tuple(cfg.shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError("config.mesh.shape", f"needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {shape}")
    dcn = cfg.get("dcn_shape") if hasattr(cfg, "get") else None
    return MeshSpec(shape=shape, dcn_shape=tuple(dcn) if dcn else None)
