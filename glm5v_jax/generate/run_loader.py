"""A trained run, ready to answer: `load_run(workdir, step=None) -> (model, tokenizer, config)`.

The model is built from the run's `config.json` (the resolved config: vocabulary and `<|image|>` id
from its tokenizer) abstractly, then its parameters are read from the checkpoint (the newest that
reads, or `step`) with the same partial restore as `config.init_from`; nothing is initialised at random.
"""
from __future__ import annotations

import json

import jax
import ml_collections
from flax import nnx

from glm5v_jax.data.tokenizer import RUN_FILE, Tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.paths import as_path
from glm5v_jax.init_from import restore_from_run

VLM_TRAINERS = ("vlm_pretrain", "vlm_sft", "rl")


class _Run(nnx.Module):
    """The `model` subtree of a TrainState, as the checkpoint holds it."""

    def __init__(self, model: nnx.Module):
        self.model = model


def load_run(workdir: str, step: int | None = None) -> tuple[GLM5V, Tokenizer, ml_collections.ConfigDict]:
    """(the run's VLM with its trained parameters on the default device, its tokenizer, its config with
    `loaded_step`: the checkpoint step read)."""
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
    state, config.loaded_step = restore_from_run(f"{workdir}@{step}" if step is not None else str(workdir), state,
                                                 shardings)  # loaded_step: the checkpoint the parameters came from
    return nnx.merge(graphdef, state).model, Tokenizer(tokenizer_path), config
