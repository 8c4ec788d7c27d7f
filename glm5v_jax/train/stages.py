"""The one registry of training stages: `config.trainer` -> the stage module.

A stage module holds only what is its own and exposes two functions:
  setup(config, workdir, plan) -> glm5v_jax.train.run.Job     (used by `glm5v_jax.main`)
  abstract_program(config, devices) -> glm5v_jax.train.parallel.TrainProgram
                                                              (used by `glm5v_jax.tools.aot`)
The run layer (`glm5v_jax.train.run`) does the rest. Adding a stage = a module here, a config, a test.
Modules are imported when a stage is asked for, so importing the registry stays cheap.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from glm5v_jax.errors import ConfigError

STAGES = {
    "cogvit_mim": "glm5v_jax.train.cogvit_mim",  # CogViT stage 1: masked distillation from teachers
    "cogvit_siglip": "glm5v_jax.train.cogvit_siglip",  # CogViT stage 2: contrastive image-text (SigLIP)
    "vlm_pretrain": "glm5v_jax.train.vlm_pretrain",  # VLM pre-training with MMTP
    "vlm_sft": "glm5v_jax.train.vlm_sft",  # supervised fine-tuning on chat conversations
    "rl": "glm5v_jax.train.rl",  # joint multimodal RL over the task families
}


def stage_module(config) -> ModuleType:
    """The stage module named by `config.trainer` (default vlm_pretrain)."""
    name = config.get("trainer", "vlm_pretrain")
    if name not in STAGES:
        raise ConfigError("config.trainer", f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[name])
