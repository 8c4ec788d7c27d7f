"""The notebooks in colabs/: each .ipynb is in sync with its py:percent twin, and the quick start and the
generation notebook run to the end with small settings. (The MMTP ablation notebook runs in tests/test_mmtp_ablation.py,
whose checks of the experiment's outputs read that one run.)"""
from __future__ import annotations

import jupytext
import nbformat
import pytest

from helpers import STAGE_RUNS
from notebooks import COLABS, SMALL_DATA, SMALL_MODEL, execute, has_output, text_outputs, with_parameters

NOTEBOOKS = ("quickstart", "mmtp_ablation", "generate")


def _cells(nb, kind: str) -> list[tuple[str, list[str]]]:
    return [(c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells if c.cell_type == kind]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_sync_with_its_py_percent_twin(name):
    ipynb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    script = jupytext.read(COLABS / f"{name}.py")
    assert ipynb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    hint = f"colabs/{name}.ipynb and colabs/{name}.py differ: run `jupytext --sync colabs/{name}.py`"
    assert _cells(ipynb, "code") == _cells(script, "code"), hint
    assert [s for s, _ in _cells(ipynb, "markdown")] == [s for s, _ in _cells(script, "markdown")], hint
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    # The Colab install cell is the only one the suite skips, and every notebook takes parameters.
    skipped = [c for c in ipynb.cells if "skip-execution" in c.metadata.get("tags", [])]
    assert len(skipped) == 1 and "pip install" in skipped[0].source
    assert any("parameters" in c.metadata.get("tags", []) for c in ipynb.cells)


def test_with_parameters_injects_after_the_parameters_cell():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("A = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("print(A)")])
    out = with_parameters(nb, {"A": 2})
    assert [c.source for c in out.cells] == ["A = 1", "A = 2", "print(A)"]
    assert len(nb.cells) == 2  # the original is untouched
    with pytest.raises(AssertionError, match="parameter B"):
        with_parameters(nb, {"B": 3})


def test_quickstart_runs(tmp_path):
    nb, seconds = execute("quickstart", {"STEPS": 3, "WORKDIR": str(tmp_path / "work"),
                                         "OVERRIDES": {**SMALL_DATA, **SMALL_MODEL}})
    text = text_outputs(nb)
    assert "restored step 3: parameters equal: True, next batch equal: True" in text
    assert "step   3  main loss" in text and "MTP logits per depth [(2, 128, 1024)]" in text
    assert has_output(nb, "text/html"), "treescope rendered nothing"
    assert has_output(nb, "image/png")  # the sample image and the loss curve
    assert (tmp_path / "work" / "checkpoints" / "3").is_dir()
    print(f"quickstart notebook: {seconds:.0f} s")


def test_generate_runs(tmp_path):
    """A 2-step SFT run of a 2-layer model from the command line, then every section: its answers are
    noise, so the checks are on what is printed, not on what the model says."""
    _, sft_flags = STAGE_RUNS["vlm_sft"]  # the small data of the command-line stage tests
    flags = ["--config.eval_every=0", "--config.log_every=1", *sft_flags,
             *(f"--config.{k}={v}" for k, v in SMALL_MODEL.items())]
    workdir = tmp_path / "sft"
    nb, seconds = execute("generate", {"WORKDIR": str(workdir), "DATA_DIR": str(tmp_path / "data"), "STEPS": 2,
                                       "FLAGS": flags, "IMAGES": 2, "N": 3, "MAX_NEW_TOKENS": 6})
    text = text_outputs(nb)
    print(text)
    assert "step 2/2" in text and (workdir / "checkpoints" / "2").is_dir()
    assert has_output(nb, "image/png")  # the shapes-world images
    # Section 2: a caption and the questions of both images, each with the model's answer and the reference.
    for i in range(2):
        assert f"image {i}\n  caption   model: " in text
    assert text.count("reference: ") >= 2 + 2 * 2 and "exact answers:" in text
    assert "'prefill_calls': " in text and "'useful_slot_fraction': " in text
    # Section 3: the group's samples cost one prefill (the others are forks).
    assert "prefill calls for the 3 samples: 1" in text
    assert "3 samples at temperature 1.0:" in text and "logp_sampled" in text
    # Section 4: held, extended, released.
    assert "held conversations: 1" in text and "held after release: 0" in text
    # Section 5: the command line ran and printed an answer.
    assert "$ python -m glm5v_jax.generate --workdir=" in text and "command line: " in text
    print(f"generate notebook: {seconds:.0f} s")
