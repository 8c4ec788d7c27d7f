#!/usr/bin/env bash
# Set up a virtual environment with the test extras and run the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test,tpu]'
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
# Lint first (ruff.toml: pyflakes, pycodestyle, line length 120; .venv*, runs/ and notebooks excluded)
python -m ruff check .
# --dist loadscope: a module's tests share one worker, so module fixtures (a training run, an AOT
# compile, a notebook run) run once instead of once per worker
python -m pytest -q -n 2 --dist loadscope --durations=25 tests
