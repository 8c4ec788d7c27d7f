"""Golden file: the Muon routing table of the `tiny` VLM preset (configs/vlm_pretrain.py).

The table (`glm5v_jax.optim.routing.format_table` with the `rms` scale) is compared line
by line with tests/golden/routing_tiny_vlm.txt; a change in which parameters Muon takes,
how it views them as matrices, or their update scale shows up as a diff. The model is
built abstractly (`nnx.eval_shape`), so nothing is allocated.

After an intended change, regenerate the golden file and review the diff:

    GLM5V_UPDATE_GOLDEN=1 python -m pytest -q tests/test_routing_golden.py

(The error for a >= 2-D parameter no rule classifies is tested in tests/test_muon.py,
test_unnamed_matrix_is_an_error.)
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from flax import nnx

from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.muon import SCALE_MODES
from glm5v_jax.optim.routing import format_table

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden" / "routing_tiny_vlm.txt"


def _load_config(preset: str):
    spec = importlib.util.spec_from_file_location("_vlm_pretrain_config", ROOT / "configs" / "vlm_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _tiny_table() -> str:
    spec = vlm_spec_from_config(_load_config("tiny").model)
    model = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))
    return format_table(model, scale_fn=SCALE_MODES["rms"]) + "\n"


def test_routing_table_of_tiny_vlm_matches_golden():
    text = _tiny_table()
    if os.environ.get("GLM5V_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        return
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with GLM5V_UPDATE_GOLDEN=1"
    expected = GOLDEN.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                            fromfile=str(GOLDEN.relative_to(ROOT)), tofile="format_table(tiny)"))
        raise AssertionError("the Muon routing table of the tiny VLM changed (review, then regenerate with "
                             f"GLM5V_UPDATE_GOLDEN=1):\n{diff}")
