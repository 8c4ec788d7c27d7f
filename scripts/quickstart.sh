#!/usr/bin/env bash
# Quick start: set up a virtual environment, install the package, and train the tiny
# GLM-5V-style model with MMTP on the embedded shapes-world data (built on first use).
# Extra arguments go to the trainer, e.g. --config.total_steps=50.
# Run it again with the same WORKDIR to resume from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-runs/tiny}"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
python -m glm5v_jax.main --config=configs/vlm_pretrain.py:tiny --workdir="$WORKDIR" "$@"
echo "Done: curves in $WORKDIR/loss_curves.png, metrics in $WORKDIR/metrics.jsonl," \
     "TensorBoard: tensorboard --logdir $WORKDIR/tensorboard"
