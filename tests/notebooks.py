"""Running the notebooks of colabs/ in tests: parameters injected after the cell tagged `parameters`
(papermill's convention), a fresh kernel on one CPU device, Colab-only cells (tag `skip-execution`)
skipped by nbclient."""
from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

COLABS = Path(__file__).parents[1] / "colabs"

# Small data and model for the tests (the notebooks' defaults are what a user runs).
SMALL_DATA = {"data.sources.image.train_size": 48, "data.sources.image.eval_size": 8,
              "data.sources.text.train_size": 24, "data.sources.text.eval_size": 4, "data.tokenizer_vocab_size": 1024,
              "data.batch_size": 2, "data.seq_len": 128}
SMALL_MODEL = {"model.backbone.num_layers": 2, "model.vision.depth": 1}


def with_parameters(nb, assignments: dict[str, object]):
    """A copy of `nb` with a cell assigning `assignments` right after the cell tagged `parameters`,
    so the notebook's own defaults stay as written."""
    nb = nbformat.from_dict(nb)
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if index is None:
        raise AssertionError("the notebook has no cell tagged `parameters`")
    for name in assignments:
        if f"{name} =" not in nb.cells[index].source and f"{name}:" not in nb.cells[index].source:
            raise AssertionError(f"parameter {name} is not defined in the `parameters` cell")
    source = "\n".join(f"{k} = {v!r}" for k, v in assignments.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def execute(name: str, assignments: dict[str, object], timeout: int = 900, compile_cache: str | None = None):
    """Runs colabs/<name>.ipynb with `assignments` in a fresh kernel on one CPU device (conftest's 8
    fake devices are for the in-process tests); returns (executed notebook, seconds). `compile_cache`:
    a directory for JAX's persistent compilation cache, for a notebook that builds the same programs
    from several models (as `helpers.cli_env` does for command-line runs)."""
    nb = with_parameters(nbformat.read(COLABS / f"{name}.ipynb", as_version=4), assignments)
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS: conftest's fast-compile flags
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(COLABS)}})
    t0 = time.time()
    client.execute(env=env)
    return nb, time.time() - t0


def text_outputs(nb) -> str:
    """stdout, markdown and plain-text outputs of every cell, joined."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("name") == "stdout":
                parts.append(out["text"])
            data = out.get("data", {})
            parts.append(data.get("text/markdown", "") or data.get("text/plain", ""))
    return "\n".join(parts)


def has_output(nb, mime: str) -> bool:
    return any(o.get("data", {}).get(mime) for c in nb.cells for o in c.get("outputs", []))
