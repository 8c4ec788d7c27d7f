"""experiments/bench_generate.py on a tiny model with tunix missing: every measurement's numbers are there
and well-formed (no compile while sampling parameters change or while batching is timed, one prefill and one
image encoding per group, a float32 logprob gap within 1e-5), tunix's cells say "not installed", and the
report and files are written."""
import dataclasses
import json
from pathlib import Path

import pytest
from flax import nnx

from glm5v_jax.models.vlm import GLM5V
from helpers import experiment_module, small_spec

bench = experiment_module("bench_generate")

SETTINGS = dataclasses.replace(bench.SMOKE, capacities=(48, 96), requests=6, length_max=24)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    mp = pytest.MonkeyPatch()
    mp.setattr(bench, "tunix_version", lambda: None)  # as without google-tunix installed
    try:
        out = bench.run_bench(model, SETTINGS, log=lambda line: None)
    finally:
        mp.undo()
    out["meta"] = bench.meta(["--smoke"], "tiny", "float32", model) | {"smoke": True}
    return out, model, tmp_path_factory.mktemp("bench_generate")


def test_measurements_are_well_formed(result):
    r, model, _ = result
    s = SETTINGS
    c = r["compiles"]
    assert len(c["ours"]) == len(c["calls"]) == 4 and c["ours"][0] > 0
    assert c["ours"][1:] == [0, 0, 0]  # same, changed, greedy parameters: nothing compiles
    cap = r["capacity"]
    assert [x["tokens"] for x in cap["ours"]] == [s.slots * s.capacity_new_tokens] * 2
    assert all(x["decode_s"] > 0 and x["total_s"] >= x["decode_s"] for x in cap["ours"])
    assert cap["ours_ratio"] == pytest.approx(cap["ours"][1]["decode_s"] / cap["ours"][0]["decode_s"])
    b = r["batching"]
    for mode in ("continuous", "static"):
        m = b[mode]
        assert m["completed"] == s.requests and m["compiles"] == 0  # warmed up: nothing compiles while timed
        assert 0 < m["useful_slot_fraction"] <= 1 and m["tokens_per_s"] > 0
        assert m["useful_slot_steps"] == m["tokens"] - s.requests  # every token but the first comes from decode
    assert b["continuous"]["tokens"] == b["static"]["tokens"]  # the same work
    assert b["speedup"] == pytest.approx(b["continuous"]["tokens_per_s"] / b["static"]["tokens_per_s"])
    g = r["group"]
    assert g["ours"] == {"prefill_calls": 1, "images_encoded": 1, "samples": s.group}
    assert g["ours_copies"]["images_encoded"] == s.group and g["ours_copies"]["samples"] == s.group
    lp = r["logprobs"]
    assert lp["dtype"] == "float32" and 0 <= lp["ours"]["max_abs"] <= 1e-5 and lp["ours"]["tokens"] > 0


def test_tunix_missing_is_reported_and_files_are_written(result):
    r, _, out_dir = result
    assert r["tunix"] == "not installed"
    assert r["compiles"]["tunix"] is None and r["capacity"]["tunix"] is None and r["logprobs"]["tunix"] is None
    rows = bench.summary_rows(r)
    assert len(rows) == 7 and all(row[4] == "not installed" for row in rows)
    assert [row[3] for row in rows if "compiles" in row[0] or "prefill" in row[0]] == ["yes"] * 3
    files = bench.write(r, str(out_dir), log=lambda line: None)
    assert [Path(f).name for f in files] == ["generate_cpu_smoke.md", "generate_cpu_smoke.json"]
    text = Path(files[0]).read_text()
    assert "| compiles when only temperature/top_k/top_p change | 0 (tunix reported 2) | 0 | yes |" in text
    assert text.count("\n## ") == 5
    assert json.loads(Path(files[1]).read_text())["group"]["ours"]["prefill_calls"] == 1


def test_flag_parsing():
    args = bench.parse_args(["--preset", "0p5b", "--capacities", "1024,8192", "--slots", "32"])
    assert args.preset == "0p5b" and args.settings.capacities == (1024, 8192) and args.settings.slots == 32
    assert args.settings.requests == bench.Settings().requests
    smoke = bench.parse_args(["--smoke", "--repeats", "3"])
    assert smoke.settings.repeats == 3 and smoke.settings.slots == bench.SMOKE.slots
