"""`python -m glm5v_jax.rl.evaluate` on a tiny run directory: n answers per prompt of each family, scored by the
reward system; the table, summary, samples and plot are written, the summary agrees with the samples, and a
family name that does not exist is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm5v_jax.rl.evaluate import family_tasks
from glm5v_jax.rl.tasks import FAMILIES
from helpers import build_vlm_run

ROOT = Path(__file__).parents[1]
FAMILY_SUBSET = ("shapes/count", "charts/bar", "tools/tiny_word")


def test_command_line_writes_per_family_tables(tmp_path):
    build_vlm_run(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "glm5v_jax.rl.evaluate", f"--workdir={tmp_path / 'run'}", "--n=2",
                          "--prompts=2", f"--families={','.join(FAMILY_SUBSET)}", "--max_new_tokens=4",
                          "--max_slots=8", "--max_seq_len=1024"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = tmp_path / "run" / "rl_eval" / "step_5"
    assert {p.name for p in result.iterdir()} == {"table.md", "summary.json", "samples.jsonl", "pass_at_k.png"}
    rows = [r for r in (result / "table.md").read_text().splitlines() if r.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == [*FAMILY_SUBSET, "all"]
    assert "pass@1" in rows[0] and "pass@2" in rows[0]
    samples = [json.loads(line) for line in (result / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((result / "summary.json").read_text())
    assert len(samples) == len(FAMILY_SUBSET) * 2 * 2
    for family in FAMILY_SUBSET:
        rewards = [s["reward"] for s in samples if s["data_source"] == family]
        assert len(rewards) == 4 and summary[f"{family}/prompts"] == 2
        np.testing.assert_allclose(summary[f"{family}/reward_mean"], np.mean(rewards), atol=1e-6)
        assert 0 <= summary[f"{family}/pass@1"] <= summary[f"{family}/pass@2"] <= 1
    assert all(s["turns"] >= 1 and s["finish"] in ("stop", "length", "capacity") for s in samples)


def test_family_tasks_and_bad_names():
    tasks = family_tasks(None, 1)
    assert [t.data_source for t in tasks] == list(FAMILIES)
    with pytest.raises(ValueError, match="families: .*'nope'.* known"):
        family_tasks(["shapes/count", "nope"], 1)
