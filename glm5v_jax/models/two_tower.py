"""CogViT stage 2: image and text towers trained with the sigmoid (SigLIP) loss (report 2.1).

    image: CogViT(patches, patch_yx, valid) -> masked mean over valid patches -> linear -> [B, E]
    text:  TextEncoder(tokens)               -> masked mean over the caption   -> linear -> [B, E]
    loss:  sigmoid_contrastive_loss(image, text, t_prime, b)   (glm5v_jax.losses.contrastive)

Image pooling is the masked mean (`CogViT.pool`), not a MAP head: stage 2 exists to train the
encoder's *tokens* (stage 1 distils from them, the VLM projector reads them), and a mean pool
sends the contrastive gradient to every valid token instead of letting a learned probe pick a
few; it also has no parameters, so the pooled feature is the same one the k-NN evaluation of
both stages reads.

Parameter paths, one optimizer group each (`config.optim.groups` of configs/cogvit_siglip.py):
  vision      image/encoder/...                  the CogViT encoder (what later stages keep)
  text        text/encoder/...                   the text tower
  projection  image/proj*, text/proj*, t_prime, b  the heads and the loss scalars

`load_image_encoder` reads the CogViT encoder back from a stage-2 run directory (the
`cogvit` teacher kind of `glm5v_jax.models.teachers.registry`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError, require
from glm5v_jax.layers.params import param, zeros
from glm5v_jax.losses.contrastive import BIAS_INIT, T_PRIME_INIT
from glm5v_jax.models.build import vision_spec_from_config
from glm5v_jax.models.cogvit import CogViT
from glm5v_jax.models.specs import VisionSpec, as_dtype
from glm5v_jax.paths import as_path
from glm5v_jax.models.text_tower import TextEncoder, TextSpec, masked_mean


@dataclasses.dataclass(frozen=True)
class TwoTowerSpec:
    vision: VisionSpec
    text: TextSpec
    embed_dim: int = 128  # the shared embedding width

    def __post_init__(self):
        require(self.embed_dim > 0, "embed_dim", f"must be positive, got {self.embed_dim}")


def two_tower_spec_from_config(model: Any, *, vocab_size: int, pad_id: int, eos_id: int) -> TwoTowerSpec:
    """TwoTowerSpec from `config.model` (vision, text, embed_dim, dtype, attention_impl, remat);
    the text vocabulary and pad/eos ids come from the tokenizer. Errors name the config field."""
    get = model.get
    dtype, impl, remat = get("dtype", "float32"), get("attention_impl", "xla"), bool(get("remat", False))
    vision = vision_spec_from_config(model["vision"], dtype=dtype, attention_impl=impl, remat=remat)
    text = dict(model["text"].to_dict() if hasattr(model["text"], "to_dict") else model["text"])
    for key in ("vocab_size", "pad_id", "eos_id"):
        text.pop(key, None)  # always the tokenizer's
    known = {f.name for f in dataclasses.fields(TextSpec)}
    for key in text:
        if key not in known:
            raise ConfigError(f"config.model.text.{key}", f"unknown field; TextSpec accepts {sorted(known)}")
    try:
        text_spec = TextSpec(vocab_size=int(vocab_size), pad_id=int(pad_id), eos_id=int(eos_id), attention_impl=impl,
                             remat=remat, dtype=as_dtype(dtype, "config.model.dtype"), **text)
        return TwoTowerSpec(vision, text_spec, int(get("embed_dim", 128)))
    except ConfigError as e:
        raise e.with_prefix("config.model.text" if e.field in known else "config.model") from None


class Projection(nnx.Module):
    """x W + c: `[B, D] -> [B, E]`, float32 out."""

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (dim, out_dim), ("embed", "proj"))
        self.bias = param(rngs, zeros(), (out_dim,), ("proj",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class ImageTower(nnx.Module):
    def __init__(self, spec: TwoTowerSpec, *, rngs: nnx.Rngs):
        self.encoder = CogViT(spec.vision, rngs=rngs)
        self.proj = Projection(spec.vision.embed_dim, spec.embed_dim, rngs=rngs)

    def features(self, patches, patch_yx, valid) -> jax.Array:
        """Pooled encoder features `[B, D]` (float32): the mean over valid patches."""
        return masked_mean(self.encoder(patches, patch_yx, valid), valid.astype(bool))

    def __call__(self, patches, patch_yx, valid) -> jax.Array:
        return self.proj(self.features(patches, patch_yx, valid))


class TextTower(nnx.Module):
    def __init__(self, spec: TwoTowerSpec, *, rngs: nnx.Rngs):
        self.encoder = TextEncoder(spec.text, rngs=rngs)
        self.proj = Projection(spec.text.embed_dim, spec.embed_dim, rngs=rngs)

    def __call__(self, tokens) -> jax.Array:
        return self.proj(self.encoder.pool(tokens))


class TwoTower(nnx.Module):
    """(image embeddings, text embeddings), both `[B, E]` float32 and not normalised (the loss
    normalises), plus the learnable loss scalars `t_prime` (t = exp(t')) and `b`."""

    def __init__(self, spec: TwoTowerSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.image = ImageTower(spec, rngs=rngs)
        self.text = TextTower(spec, rngs=rngs)
        self.t_prime = param(rngs, nnx.initializers.constant(T_PRIME_INIT), (), ())
        self.b = param(rngs, nnx.initializers.constant(BIAS_INIT), (), ())

    def __call__(self, patches, patch_yx, valid, text) -> tuple[jax.Array, jax.Array]:
        return self.image(patches, patch_yx, valid), self.text(text)


# ----------------------------------------------------------------------------- stage-2 runs as teachers
def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
    """The checkpoints directory of a stage-2 run (local or `gs://`): `path/checkpoints` if it
    exists, else `path`; absolute."""
    path = as_path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_image_encoder(path: str | os.PathLike, *, dtype: Any = None) -> tuple[CogViT, int, dict]:
    """(CogViT encoder, step, saved config) from the newest finalized step of a stage-2 run
    (`path`: the run directory or its `checkpoints`, local or `gs://`). Read-only: nothing in the
    run is changed.

    The encoder is built abstractly from the step's saved config (`model.vision`) and only its
    parameters are read (`model/image/encoder`), so neither the text tower nor the optimizer
    state is loaded. `dtype` overrides the compute dtype (e.g. bfloat16 for a teacher)."""
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no stage-2 checkpoints directory")
    steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
                   and (p / "state").is_dir() and (p / "config").is_dir())
    if not steps:
        raise FileNotFoundError(f"{directory}: no finalized checkpoint step")
    step = steps[-1]
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        config = dict(ckptr.restore(directory / str(step) / "config"))  # what config.json holds
    model_cfg = config.get("model", {})
    if "vision" not in model_cfg or config.get("trainer") != "cogvit_siglip":
        raise ValueError(f"{directory / str(step)}: not a cogvit_siglip checkpoint (trainer "
                         f"{config.get('trainer')!r})")
    spec = vision_spec_from_config(model_cfg["vision"], dtype=dtype or model_cfg.get("dtype", "float32"),
                                   attention_impl=model_cfg.get("attention_impl", "xla"))
    abstract = nnx.eval_shape(lambda: CogViT(spec, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"model": {"image": {"encoder": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)}}}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(directory / str(step) / "state", args=args)
    encoder = nnx.merge(graphdef, restored["model"]["image"]["encoder"])
    return encoder, step, config


class EncoderTeacher(nnx.Module):
    """A CogViT encoder as a frozen teacher: `{"tokens": [B, N, D]}` float32, no gradient,
    zero at padding (the interface of `glm5v_jax.models.teachers`)."""

    def __init__(self, encoder: CogViT):
        self.encoder = encoder

    def __call__(self, patches: jax.Array, patch_yx: jax.Array, valid: jax.Array) -> Mapping[str, jax.Array]:
        tokens = self.encoder(patches, patch_yx, valid).astype(jnp.float32)
        tokens = jnp.where(valid.astype(bool)[..., None], tokens, 0.0)
        return {"tokens": jax.lax.stop_gradient(tokens)}
