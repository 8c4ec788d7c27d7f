"""Translate an ml-collections model config into model specs, in one place.

Errors name the config field (`config.model.backbone.num_kv_heads`), and are
raised here, before anything is built or compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from glm5v_jax.errors import ConfigError, require
from glm5v_jax.layers.attention import ATTENTION_IMPLS
from glm5v_jax.layers.moe import MOE_IMPLS
from glm5v_jax.models.specs import (
    BackboneSpec, MTPSpec, ProjectorSpec, VisionSpec, VLMSpec, as_dtype,
)

_PREFIX = "config.model"


def _fields(section: Any, spec_cls, path: str, **extra) -> Any:
    """spec_cls(**section, **extra) with unknown keys refused and errors prefixed by path."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = set(spec_cls.__dataclass_fields__)
    for key in values:
        if key not in known:
            raise ConfigError(f"{path}.{key}", f"unknown field; {spec_cls.__name__} accepts {sorted(known)}")
    if "mrope_sections" in values and values["mrope_sections"] is not None:
        values["mrope_sections"] = tuple(values["mrope_sections"])
    try:
        return spec_cls(**values, **extra)
    except ConfigError as e:
        raise e.with_prefix(path) from None


def vlm_spec_from_config(model: Any) -> VLMSpec:
    """VLMSpec from `config.model` (a ConfigDict or a dict)."""
    get = model.get
    dtype = as_dtype(get("dtype", "float32"), f"{_PREFIX}.dtype")
    param_dtype = as_dtype(get("param_dtype", "float32"), f"{_PREFIX}.param_dtype")
    common = dict(dtype=dtype, param_dtype=param_dtype)
    attn, moe_impl = get("attention_impl", "xla"), get("moe_impl", "ragged_dot")
    # Checked here so the error names the config field the user sets (the specs check again).
    require(attn in ATTENTION_IMPLS, f"{_PREFIX}.attention_impl",
            f"unknown implementation {attn!r}; known: {sorted(ATTENTION_IMPLS)}")
    require(moe_impl in MOE_IMPLS, f"{_PREFIX}.moe_impl",
            f"unknown implementation {moe_impl!r}; known: {sorted(MOE_IMPLS)}")
    remat = bool(get("remat", False))
    vision = _fields(model["vision"], VisionSpec, f"{_PREFIX}.vision", attention_impl=attn, remat=remat, **common)
    backbone = _fields(model["backbone"], BackboneSpec, f"{_PREFIX}.backbone", attention_impl=attn,
                       moe_impl=moe_impl, remat=remat, **common)
    mtp = _fields(model["mtp"], MTPSpec, f"{_PREFIX}.mtp")
    projector = ProjectorSpec(vision_dim=vision.embed_dim, out_dim=backbone.embed_dim,
                              merge_size=vision.merge_size, **common)
    try:
        return VLMSpec(vision=vision, projector=projector, backbone=backbone, mtp=mtp,
                       image_token_id=int(get("image_token_id", 4)))
    except ConfigError as e:
        raise e.with_prefix(_PREFIX) from None


def vision_spec_from_config(vision: Any, *, path: str = "config.model.vision", dtype: Any = "float32",
                            attention_impl: str = "xla", remat: bool = False) -> VisionSpec:
    """A CogViT spec from a `vision` section alone (the CogViT pre-training stages)."""
    require(attention_impl in ATTENTION_IMPLS, path.rsplit(".", 1)[0] + ".attention_impl",
            f"unknown implementation {attention_impl!r}; known: {sorted(ATTENTION_IMPLS)}")
    return _fields(vision, VisionSpec, path, attention_impl=attention_impl, remat=remat,
                   dtype=as_dtype(dtype, path.rsplit(".", 1)[0] + ".dtype"))


def teachers_from_config(teachers: Any, *, abstract: bool = False) -> dict:
    """{name: Teacher} for the `config.teachers` section (CogViT stage 1): each entry's kind,
    variant, overrides, checkpoint (none: random init from its seed). Errors name
    `config.teachers.<name>.<field>`. `abstract=True`: only the architecture, built with
    `nnx.eval_shape` (no checkpoint read, nothing allocated; for ahead-of-time compiles)."""
    from flax import nnx

    from glm5v_jax.models.teachers.registry import build_teacher

    out = {}
    for name, t in teachers.items():
        overrides = t.overrides.to_dict() if hasattr(t.overrides, "to_dict") else dict(t.overrides)
        if abstract:
            built = {}

            def make(name=name, t=t, overrides=overrides):
                built["t"] = build_teacher(name, t.kind, t.variant, overrides=overrides, seed=int(t.seed))
                return built["t"].module

            module = nnx.eval_shape(make)
            out[name] = dataclasses.replace(built["t"], module=module)
        else:
            out[name] = build_teacher(name, t.kind, t.variant, overrides=overrides, checkpoint=t.checkpoint,
                                      seed=int(t.seed))
    return out
