"""experiments/bench_judge.py with a tiny N: every concurrency's row is there, the server never held more
requests than the client's limit (and overlapped them), nothing fell back, the time is within 3x of N * D / C, and
the report and files are written."""
import json
from pathlib import Path

import pytest

from helpers import experiment_module

bench = experiment_module("bench_judge")


def test_bench_judge_small(tmp_path):
    r = bench.main(["--requests=8", "--delay_s=0.05", "--concurrency=1,4", f"--out_dir={tmp_path}"],
                   log=lambda line: None)
    assert [x["concurrency"] for x in r["rows"]] == [1, 4]
    for x in r["rows"]:
        assert x["server_requests"] == 8 and x["fallbacks"] == 0
        assert 1 <= x["server_peak_in_flight"] <= x["concurrency"]
        assert x["ideal_seconds"] == pytest.approx(8 * 0.05 / x["concurrency"])
        assert x["seconds"] < 3 * x["ideal_seconds"]
    assert r["rows"][1]["server_peak_in_flight"] >= 2  # requests overlapped
    assert [Path(f).name for f in r["files"]] == ["judge_throughput_cpu.md", "judge_throughput_cpu.json"]
    assert "| 4 | 8 |" in Path(r["files"][0]).read_text()
    assert json.loads(Path(r["files"][1]).read_text())["rows"][1]["concurrency"] == 4
    assert bench.parse_args(["--concurrency", "2,32"]).concurrency == (2, 32)
