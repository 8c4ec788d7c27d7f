"""experiments/bench_rl_pipeline.py with a few rounds: the barrier and the four controller rows
(without and with early abort, admission lookahead, partial admission) are there, the
controller fills every batch and keeps the simulated engine's slots far busier than the barrier, and the report
and files are written."""
import json
from pathlib import Path

from helpers import experiment_module

bench = experiment_module("bench_rl_pipeline")


def test_bench_rl_pipeline_small(tmp_path):
    r = bench.main(["--rounds=6", "--slots=16", "--groups=4", f"--out_dir={tmp_path}"], log=lambda line: None)
    barrier, no_abort, fifo, ahead, partial = r["rows"]
    assert barrier["mode"] == "barrier" and no_abort["mode"] == "controller (no early abort, lookahead 0)"
    assert fifo["mode"] == "controller (early abort, lookahead 0)"
    assert ahead["mode"] == "controller (early abort, lookahead 16)"
    assert partial["mode"] == "controller (early abort, lookahead 16, partial admission)"
    for row in (fifo, ahead, partial):
        assert row["groups_per_round"] == 4 and row["occupancy"] > barrier["occupancy"] + 0.2
        assert row["aborted"] >= row["resumed"] > 0
    assert no_abort["aborted"] == 0 and no_abort["groups_per_round"] == 4
    assert partial["occupancy"] >= 0.99 > fifo["occupancy"]
    assert barrier["speedup_per_group"] == 1.0
    assert [Path(f).name for f in r["files"]] == ["rl_pipeline_sim.md", "rl_pipeline_sim.json"]
    assert "| barrier |" in Path(r["files"][0]).read_text()
    assert json.loads(Path(r["files"][1]).read_text())["settings"]["groups"] == 4
