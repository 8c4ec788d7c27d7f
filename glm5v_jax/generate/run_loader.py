"""A trained run, ready to answer: `load_run(workdir, step=None) -> (model, tokenizer, config)`, and
the prompt of a chat turn (with an image) in the GLM chat template.

The model is built from the run's `config.json` (the resolved config: vocabulary and `<|image|>` id
from its tokenizer) abstractly, then its parameters are read from the checkpoint (the newest that
reads, or `step`) with the same partial restore as `config.init_from`; nothing is initialised at random.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from glm5v_jax.data.pipeline import preprocess_image
from glm5v_jax.data.tokenizer import RUN_FILE, Tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.paths import as_path
from glm5v_jax.train.init_from import apply_init_from

VLM_TRAINERS = ("vlm_pretrain", "vlm_sft")


class _Run(nnx.Module):
    """The `model` subtree of a TrainState, as the checkpoint holds it."""

    def __init__(self, model: nnx.Module):
        self.model = model


def load_run(workdir: str, step: int | None = None) -> tuple[GLM5V, Tokenizer, ml_collections.ConfigDict]:
    """(the run's VLM with its trained parameters on the default device, its tokenizer, its config)."""
    workdir = as_path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise ConfigError("workdir", f"{config_path} not found: is {workdir} a run directory?")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if config.get("trainer", "") not in VLM_TRAINERS:
        raise ConfigError("workdir", f"{workdir} was trained by {config.get('trainer', '?')!r}; generation needs a "
                                     f"VLM run ({', '.join(VLM_TRAINERS)})")
    tokenizer_path = workdir / RUN_FILE
    if not tokenizer_path.exists():
        raise ConfigError("workdir", f"{tokenizer_path} not found (the VLM stages keep their tokenizer there)")
    spec = vlm_spec_from_config(config.model)
    abstract = nnx.eval_shape(lambda: _Run(GLM5V(spec, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
    state = apply_init_from(f"{workdir}@{step}" if step is not None else str(workdir), state, shardings)
    return nnx.merge(graphdef, state).model, Tokenizer(tokenizer_path), config


def chat_prompt(tokenizer: Tokenizer, prompt: str, *, image_tokens: int = 0, system: str = "") -> list[int]:
    """The ids of one user turn, up to the assistant's answer, in the GLM chat template:
    `[gMASK]<sop>[<|system|>\\n{system}]<|user|>\\n[<image block>]{prompt}<|assistant|>\\n`."""
    t = tokenizer
    ids = [t.gmask_id, t.sop_id]
    if system:
        ids += [t.system_id] + t.encode("\n") + t.encode(system)
    ids += [t.user_id] + t.encode("\n")
    if image_tokens:
        ids += [t.begin_image_id] + [t.image_id] * image_tokens + [t.end_image_id]
    return ids + t.encode(prompt) + [t.assistant_id] + t.encode("\n")


def image_inputs(image: bytes | np.ndarray, spec: Any) -> tuple[dict[str, np.ndarray], int]:
    """An encoded image (or a uint8 `[H, W, 3]` array) as one image slot of a chunk, preprocessed as in
    training (NaFlex at the model's patch budget), and its number of `<|image|>` tokens."""
    v = spec.vision
    try:
        x = preprocess_image(image, patch_size=v.patch_size, max_patches=v.max_patches, merge=v.merge_size)
    except Exception as e:  # noqa: BLE001 - the pipeline's skip reasons (undecodable, too small, empty)
        raise ValueError(f"the image cannot be used: {e}") from None
    arrays = {"patches": x["patches"][None], "patch_yx": x["patch_yx"][None], "patch_valid": x["valid"][None],
              "image_grid": x["grid"][None], "image_valid": np.ones((1,), bool)}
    gh, gw = (int(g) // v.merge_size for g in x["grid"])
    return arrays, gh * gw
