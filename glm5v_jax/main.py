"""Entry point: `python -m glm5v_jax.main --config=configs/vlm_pretrain.py:tiny --workdir=DIR`.

The config's `trainer` field picks the stage (`TRAINERS`): `configs/cogvit_mim.py` runs CogViT's
masked distillation, `configs/vlm_pretrain.py` the VLM pre-training.

Config fields can be overridden on the command line (`--config.total_steps=50`,
`--config.data.batch_size=8`). Running the same command again resumes from the
newest good checkpoint in DIR.

Multi-host (TPU pods, multi-node GPU): pass `--multihost` so that
`jax.distributed.initialize()` runs before anything touches a device; every host
runs the same command and reads its own shard of the data.
"""
from __future__ import annotations

import importlib
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vlm_pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, metrics).", required=True)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")

# `config.trainer` -> the module whose `train_and_evaluate(config, workdir)` runs it (one file per stage).
TRAINERS = {
    "vlm_pretrain": "glm5v_jax.train.vlm_pretrain",  # stage 3: VLM pre-training with MMTP
    "cogvit_mim": "glm5v_jax.train.cogvit_mim",  # CogViT stage 1: masked distillation from teachers
    "cogvit_siglip": "glm5v_jax.train.cogvit_siglip",  # CogViT stage 2: contrastive image-text (SigLIP)
}


def trainer_module(config):
    """The trainer module named by `config.trainer` (default vlm_pretrain)."""
    name = config.get("trainer", "vlm_pretrain")
    if name not in TRAINERS:
        raise ValueError(f"config.trainer: unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[name])


def main(argv) -> None:
    del argv
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax, tfds and jax log through absl: quiet
    logging.getLogger("glm5v_jax").setLevel(logging.INFO)  # progress lines, eval, checkpoints
    trainer_module(_CONFIG.value).train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
