"""Entry point: `python -m glm5v_jax.main --config=configs/vlm_pretrain.py:tiny --workdir=DIR`.

The config's `trainer` field picks the stage (`glm5v_jax.train.stages.STAGES`): `configs/cogvit_siglip.py`
and `configs/cogvit_mim.py` run CogViT's two pre-training stages, `configs/vlm_pretrain.py` the VLM
pre-training with MMTP, `configs/vlm_sft.py` supervised fine-tuning. `--config.init_from=RUN:SRC=DST`
starts from another run's weights (`glm5v_jax.init_from`).

Config fields can be overridden on the command line (`--config.total_steps=50`,
`--config.data.batch_size=8`). Running the same command again resumes from the
newest good checkpoint in DIR.

Multi-host (TPU pods, multi-node GPU): pass `--multihost` so that
`jax.distributed.initialize()` runs before anything touches a device; every host
runs the same command and reads its own shard of the data.
"""
from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from glm5v_jax.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vlm_pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, metrics).", required=True)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")


def main(argv) -> None:
    del argv
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax, tfds and jax log through absl: quiet
    from glm5v_jax.train.checkpoint import quiet_orbax_logs

    quiet_orbax_logs()  # orbax's errors as one line each, no tracebacks
    logging.getLogger("glm5v_jax").setLevel(logging.INFO)  # progress lines, eval, checkpoints
    from glm5v_jax.train.run import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_cli(main)  # a ConfigError: one line naming the field, exit status 2
