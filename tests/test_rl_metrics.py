"""RL metrics: pass@k equals brute-force enumeration over k-subsets; per-source reward, pass@k, flag rates
and latencies equal hand-computed values; statistics built on 8 shards and merged (or packed, summed and
unpacked as the cross-process gather does) equal those built on everything; the gather across two real
JAX processes sums them; on one process it returns its input."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from glm5v_jax.rl.metrics import (SourceStats, gather_stats, group_stats, merge_stats, pack_stats, pass_at_k, pass_ks,
                                  summary, unpack_stats)
from glm5v_jax.rl.types import Score

SOURCES = ("count", "grounding", "ocr")


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_over_k_subsets():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1) and pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    big = pass_at_k(1000, 3, 10)  # the product form stays finite where C(1000, 10) would be huge
    assert big == pytest.approx(1 - (990 * 989 * 988) / (1000 * 999 * 998))


def test_pass_at_k_refuses_impossible_arguments():
    for n, c, k in [(4, 1, 5), (4, 5, 1), (4, 1, 0), (-1, 0, 1), (4, -1, 1), (4, 1, -2), (4.0, 1, 1), (True, 1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_ks():
    assert pass_ks(1) == [1] and pass_ks(2) == [1, 2] and pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6] and pass_ks(9) == [1, 2, 4, 8, 9] and pass_ks(3) == [1, 2, 3]
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError):
            pass_ks(bad)


def _groups(seed: int = 0, prompts: int = 40):
    """Random scored groups: (source, scores, verifier latencies, judge latencies), group sizes 1..8."""
    rng = np.random.default_rng(seed)
    flag_sets = [(), (), (), ("format",), ("timeout", "fallback"), ("error",), ("fallback",)]
    out = []
    for _ in range(prompts):
        n = int(rng.choice([1, 2, 3, 4, 6, 8]))
        scores = [Score(value=float(rng.choice([0.0, 0.25, 1.0])), flags=flag_sets[int(rng.integers(len(flag_sets)))])
                  for _ in range(n)]
        out.append((SOURCES[int(rng.integers(len(SOURCES)))], scores, list(rng.random(n) * 0.01),
                    list(rng.random(int(rng.integers(0, 3))))))
    return out


def _stats(groups) -> dict[str, SourceStats]:
    return merge_stats(*({source: group_stats(scores, verifier_latency_s=v, judge_latency_s=j)}
                         for source, scores, v, j in groups))


def _expected(groups) -> dict[str, float]:
    """The summary's numbers computed directly from the samples, without SourceStats."""
    out = {}
    for source in SOURCES + ("all",):
        mine = [g for g in groups if source in (g[0], "all")]
        values = [s.value for _, scores, _, _ in mine for s in scores]
        out[f"{source}/reward_mean"] = np.mean(values)
        out[f"{source}/accuracy"] = np.mean([v >= 1.0 for v in values])
        out[f"{source}/timeout_rate"] = np.mean([("timeout" in s.flags) for _, scores, _, _ in mine for s in scores])
        out[f"{source}/verifier_latency_ms"] = 1000 * np.mean([t for g in mine for t in g[2]])
        for k in pass_ks(max(len(g[1]) for g in mine)):
            out[f"{source}/pass@{k}"] = np.mean([
                float(_brute_pass_at_k(len(scores), sum(s.value >= 1.0 for s in scores), k))
                for _, scores, _, _ in mine if len(scores) >= k])
    return out


def test_summary_equals_direct_computation():
    groups = _groups()
    got = summary(_stats(groups))
    for key, want in _expected(groups).items():
        assert got[key] == pytest.approx(want), key
    assert got["all/samples"] == sum(len(g[1]) for g in groups) and got["all/prompts"] == len(groups)


def test_summary_of_hand_built_groups():
    a = group_stats([Score(1.0), Score(0.0, flags=("format",)), Score(0.5, flags=("timeout", "fallback", "timeout"))],
                    verifier_latency_s=[0.001, 0.003], judge_latency_s=[0.2])
    b = group_stats([Score(1.0), Score(1.0)], correct_at=0.9)
    got = summary({"x": a, "y": b})
    assert got["x/reward_mean"] == 0.5 and got["x/format_failure_rate"] == pytest.approx(1 / 3)
    assert got["x/timeout_rate"] == pytest.approx(1 / 3) and got["x/fallback_rate"] == pytest.approx(1 / 3)
    assert got["x/error_rate"] == 0.0 and got["x/verifier_latency_ms"] == pytest.approx(2.0)
    assert got["x/judge_latency_ms"] == pytest.approx(200.0)
    assert got["x/pass@1"] == pytest.approx(1 / 3) and got["x/pass@2"] == pytest.approx(2 / 3)
    assert got["x/pass@3"] == 1.0 and "x/pass@4" not in got
    assert "y/judge_latency_ms" not in got and got["y/pass@1"] == 1.0 and "y/pass@3" not in got
    # all/: pass@1 over both prompts, pass@3 only over x's (the one group with n >= 3)
    assert got["all/reward_mean"] == pytest.approx(3.5 / 5) and got["all/pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert got["all/pass@3"] == 1.0 and got["all/timeout_rate"] == pytest.approx(1 / 5)
    assert group_stats([Score(0.99)]).correct == 0 and group_stats([Score(0.99)], correct_at=0.99).correct == 1


def test_bad_inputs_are_refused():
    for bad in ([], [Score(float("nan"))], [Score(1.0, flags=("slow",))]):
        with pytest.raises(ValueError):
            group_stats(bad)
    with pytest.raises(TypeError):
        group_stats([1.0])
    with pytest.raises(ValueError, match="latency"):
        group_stats([Score(1.0)], verifier_latency_s=[-1.0])
    with pytest.raises(ValueError, match="reserved"):
        summary({"all": group_stats([Score(1.0)])})


def test_eight_shards_merged_equal_everything():
    groups = _groups(seed=1, prompts=64)
    whole = summary(_stats(groups))
    rng = np.random.default_rng(2)
    order = rng.permutation(len(groups))
    shards = [_stats([groups[i] for i in order[s::8]]) for s in range(8)]
    merged = summary(merge_stats(*[shards[i] for i in rng.permutation(8)]))
    assert merged.keys() == whole.keys()
    for key in whole:
        assert merged[key] == pytest.approx(whole[key], rel=1e-12), key
    # as the cross-process gather does it: fixed-layout arrays, summed
    packed = [pack_stats(s, SOURCES, max_k=8) for s in shards]
    counts, sums = sum(p[0] for p in packed), sum(p[1] for p in packed)
    gathered = summary(unpack_stats(counts, sums.astype(np.float32).astype(np.float64), SOURCES))
    assert gathered.keys() == whole.keys()
    for key in whole:
        assert gathered[key] == pytest.approx(whole[key], rel=1e-6), key


def test_pack_stats_layout_errors():
    stats = {"count": group_stats([Score(1.0)] * 4)}
    with pytest.raises(ValueError, match="max_k"):
        pack_stats(stats, SOURCES, max_k=2)
    with pytest.raises(ValueError, match="count"):
        pack_stats(stats, ("ocr",), max_k=4)
    assert unpack_stats(*pack_stats({}, SOURCES, max_k=4), SOURCES) == {}


def test_gather_stats_on_one_process_returns_its_input():
    stats = _stats(_groups(seed=3, prompts=10))
    assert gather_stats(stats, sources=SOURCES, max_k=8) == stats
    with pytest.raises(ValueError, match="sources"):  # the layout is checked on one process too
        gather_stats(stats, sources=("ocr",), max_k=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_gather_stats_sums_over_two_processes(tmp_path):
    port = _free_port()
    tests = Path(__file__).parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / f"{i}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    whole = summary(_stats(_groups(seed=4, prompts=30)))
    for i in range(2):
        got = json.loads((tmp_path / f"{i}.json").read_text())
        assert got.keys() == whole.keys()
        for key in whole:
            assert got[key] == pytest.approx(whole[key], rel=1e-6), key


def _gather_worker(process_id: int, port: int, out_path: str) -> None:
    """One of two processes: its half of the groups, gathered; writes the summary of the sum."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2
    mine = _groups(seed=4, prompts=30)[process_id::2]
    gathered = gather_stats(_stats(mine), sources=SOURCES, max_k=8)
    Path(out_path).write_text(json.dumps(summary(gathered)))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _gather_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
