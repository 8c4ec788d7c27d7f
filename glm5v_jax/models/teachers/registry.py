"""Teachers by kind: one place that turns (kind, variant, overrides, checkpoint) into a frozen module.

Every teacher takes CogViT's NaFlex inputs `(patches, patch_yx, valid)` (pixels in [-1, 1]; each
teacher normalises them its own way) and returns a dict with `tokens [B, N, D]` (zero at
padding, float32, no gradient). A checkpoint path picks the loader by its suffix; no path means a
random initialisation from `seed` (for tests, and for the random-init DINOv3 baseline). Kind
`cogvit` reads the CogViT encoder of a stage-2 (contrastive, `cogvit_siglip`) run directory.
Checkpoint paths go through `etils.epath` (local or `gs://`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.models.teachers.dinov3 import DINOv3, dinov3_spec
from glm5v_jax.models.teachers.dinov3_loaders import load_dinov3
from glm5v_jax.models.teachers.siglip2 import SigLIP2, siglip2_spec
from glm5v_jax.models.teachers.siglip2_loaders import load_siglip2_big_vision_npz, load_siglip2_hf_safetensors


@dataclasses.dataclass(frozen=True)
class Teacher:
    name: str
    module: nnx.Module
    dim: int  # width of `tokens`
    patch_size: int
    source: str  # checkpoint path or "random init (seed N)"


def _siglip2(variant: str, overrides: Mapping[str, Any], checkpoint: str, seed: int):
    spec = siglip2_spec(variant, **overrides)
    if not checkpoint:
        return SigLIP2(spec, rngs=nnx.Rngs(seed)), spec.width, spec.patch_size
    path = epath.Path(checkpoint)
    loader = load_siglip2_big_vision_npz if path.suffix == ".npz" else load_siglip2_hf_safetensors
    return loader(path, spec), spec.width, spec.patch_size


def _dinov3(variant: str, overrides: Mapping[str, Any], checkpoint: str, seed: int):
    spec = dinov3_spec(variant, **overrides)
    module = load_dinov3(checkpoint, spec) if checkpoint else DINOv3(spec, rngs=nnx.Rngs(seed))
    return module, spec.width, spec.patch_size


def _cogvit(variant: str, overrides: Mapping[str, Any], checkpoint: str, seed: int):
    """The CogViT encoder of a stage-2 (cogvit_siglip) run: `checkpoint` is its run directory or
    `checkpoints` directory (the newest finalized step is read); `variant` is unused. Overrides:
    `dtype` (compute dtype). Without a checkpoint, a random CogViT from the VisionSpec fields in
    `overrides`."""
    from glm5v_jax.models.build import vision_spec_from_config
    from glm5v_jax.models.cogvit import CogViT
    from glm5v_jax.models.two_tower import EncoderTeacher, load_image_encoder

    del variant
    overrides = dict(overrides)
    dtype = overrides.pop("dtype", None)
    if checkpoint:
        if overrides:
            raise TypeError(f"a cogvit checkpoint fixes the architecture; unexpected overrides {sorted(overrides)}")
        encoder, _, _ = load_image_encoder(checkpoint, dtype=dtype)
    else:
        spec = vision_spec_from_config(overrides, path="overrides", dtype=dtype or "float32")
        encoder = CogViT(spec, rngs=nnx.Rngs(seed))
    return EncoderTeacher(encoder), encoder.spec.embed_dim, encoder.spec.patch_size


TEACHER_KINDS: dict[str, Callable[..., tuple[nnx.Module, int, int]]] = {"siglip2": _siglip2, "dinov3": _dinov3,
                                                                       "cogvit": _cogvit}


def build_teacher(name: str, kind: str, variant: str, *, overrides: Mapping[str, Any] | None = None,
                  checkpoint: str = "", seed: int = 0, field: str = "config.teachers") -> Teacher:
    """A frozen teacher; errors name `<field>.<name>.<setting>`."""
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"{field}.{name}.kind",
                          f"unknown teacher kind {kind!r}; expected one of {tuple(TEACHER_KINDS)}")
    if checkpoint and not epath.Path(checkpoint).exists():
        raise FileNotFoundError(f"{field}.{name}.checkpoint: {checkpoint} does not exist")
    try:
        module, dim, patch = TEACHER_KINDS[kind](variant, dict(overrides or {}), checkpoint, seed)
    except TypeError as e:  # an override that is no field of the spec
        raise ConfigError(f"{field}.{name}.overrides", str(e)) from None
    except ConfigError as e:  # a spec field's value (set through the overrides)
        in_overrides = (e.field or "").startswith("overrides")
        raise e.with_prefix(f"{field}.{name}" if in_overrides else f"{field}.{name}.overrides") from None
    return Teacher(name, module, dim, patch, checkpoint or f"random init (seed {seed})")
