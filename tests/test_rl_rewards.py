"""The reward system: aggregators equal hand-computed values; specs that cannot score are refused by name; a
hung rule verifier is cut at its wall-clock timeout (its worker killed and replaced) and flagged while the
other components and samples still score; a raising or crashing verifier scores 0 with flag "error" (logged
once); judges run beside the rules against a fake OpenAI server, and a judge server killed mid-evaluation
gives flagged fallback scores while the evaluation finishes. No jax here: the rule workers import this module."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_judge import FakeJudge
from glm5v_jax.rl.judge import JudgeClient
from glm5v_jax.rl.rewards import AGGREGATORS, RewardSystem, UnknownReward
from glm5v_jax.rl.rule_pool import RulePool
from glm5v_jax.rl.types import Component, RewardSpec, Task


# Rule verifiers: module-level, so the worker processes import them by name.
def exact(response, reference):
    return float(response.strip() == str(reference.get("answer", "")))


def tagged(response, reference):
    return float(response.startswith("<answer>"))


def hang(response, reference):
    time.sleep(3600)


def boom(response, reference):
    raise ValueError("boom")


def die(response, reference):
    os._exit(3)


def too_big(response, reference):
    return 2.0


VERIFIERS = {"exact": exact, "tagged": tagged, "hang": hang, "boom": boom, "die": die, "too_big": too_big}


def spec(*components, aggregate="weighted_sum", gate=""):
    return RewardSpec(tuple(Component(n, verifier=v, weight=w) for n, v, w in components), aggregate, gate)


def task(source, answer="3", uid="t", **kw):
    return Task(uid=uid, data_source=source, prompt="How many?", reference={"answer": answer}, **kw)


# --------------------------------------------------------------------------------- aggregation
def test_aggregators_match_hand_computed_values():
    s = spec(("a", "exact", 1.0), ("b", "exact", 2.0), ("c", "exact", 1.0))
    values = {"a": 0.5, "b": 1.0, "c": 0.2}
    assert AGGREGATORS["weighted_sum"](values, s) == pytest.approx((0.5 + 2.0 + 0.2) / 4)
    assert AGGREGATORS["product"](values, s) == pytest.approx(0.1)
    assert AGGREGATORS["min"](values, s) == pytest.approx(0.2)
    open_gate = spec(("a", "exact", 1.0), ("b", "exact", 2.0), ("c", "exact", 3.0), aggregate="gate", gate="b")
    assert AGGREGATORS["gate"](values, open_gate) == pytest.approx((0.5 + 3 * 0.2) / 4)
    closed = spec(("a", "exact", 1.0), ("b", "exact", 1.0), ("c", "exact", 1.0), aggregate="gate", gate="c")
    assert AGGREGATORS["gate"](values, closed) == 0.0


def test_specs_that_cannot_score_are_refused_by_name():
    def refused(specs, match, **kw):
        with pytest.raises(ValueError, match=match):
            RewardSystem(specs, verifiers=VERIFIERS, **kw)

    refused({"count": spec(("a", "exact", 1.0), aggregate="mean")}, r"'count': aggregate 'mean' is not one of")
    refused({"count": spec(("a", "nope", 1.0))}, r"component 'a': verifier 'nope' is not one of")
    refused({"count": spec(("a", "exact", 1.0), ("b", "tagged", 1.0), aggregate="gate", gate="fmt")},
            r"gate 'fmt' must name one of its components")
    refused({"count": spec(("a", "exact", 1.0), gate="a")}, r"gate 'a' is only read by aggregate 'gate'")
    refused({"count": spec(("a", "exact", 0.0))}, r"weights of the summed components add up to 0")
    refused({"count": spec(("a", "exact", 1.0), ("a", "tagged", 1.0))}, r"component names repeat")
    refused({"cap": RewardSpec((Component("j", judge="caption"),))}, r"'cap': component 'j' uses judge .* no judge")
    refused({"cap": RewardSpec((Component("j", judge="nope"),))}, r"judge rubric 'nope' is not one of",
            judge=JudgeClient("http://127.0.0.1:9"))
    with pytest.raises(ValueError, match=r"verifier 'lam' does not pickle"):
        RewardSystem({"count": spec(("a", "lam", 1.0))}, verifiers={"lam": lambda r, ref: 1.0})


def test_unknown_source_names_the_task_the_source_and_the_known_ones():
    with RewardSystem({"count": spec(("acc", "exact", 1.0))}, verifiers=VERIFIERS) as rewards:
        known = r"task 't': data_source 'colour' has no reward spec; known: \['count'\]"
        with pytest.raises(UnknownReward, match=known):
            rewards.score_many([(task("colour"), "3")])
        with pytest.raises(KeyError, match=r"reward override 'strict' has no reward spec"):
            rewards.spec_for(task("count", reward="strict"))


# --------------------------------------------------------------------------------- rule verifiers
def test_rule_scores_components_overrides_and_format_gate():
    specs = {"count": spec(("acc", "exact", 1.0)),
             "count_strict": spec(("fmt", "tagged", 1.0), ("acc", "exact", 1.0), aggregate="gate", gate="fmt")}
    with RewardSystem(specs, verifiers=VERIFIERS) as rewards:
        scores = rewards.score_many([(task("count"), "3"), (task("count"), "4"),
                                     (task("count", reward="count_strict"), "3"),
                                     (task("count", reward="count_strict"), "<answer>3")])
    assert [s.value for s in scores] == [1.0, 0.0, 0.0, 0.0]
    assert scores[0].components == {"acc": 1.0} and scores[0].flags == ()
    assert scores[2].components == {"fmt": 0.0, "acc": 1.0} and scores[2].flags == ("format",)
    assert scores[3].components == {"fmt": 1.0, "acc": 0.0} and scores[3].flags == ()


def test_a_hung_verifier_is_cut_at_its_timeout_and_the_rest_still_scores():
    specs = {"count": spec(("acc", "exact", 3.0), ("slow", "hang", 1.0)),
             "gated": spec(("slow", "hang", 1.0), ("acc", "exact", 1.0), aggregate="gate", gate="slow")}
    with RewardSystem(specs, verifiers=VERIFIERS, workers=2, rule_timeout_s=0.5) as rewards:
        t0 = time.perf_counter()
        out = rewards.score_many_detailed([(task("count", uid=str(i)), "3") for i in range(4)])
        elapsed = time.perf_counter() - t0
        for d in out:
            assert d.score.components == {"acc": 1.0, "slow": 0.0} and d.score.value == pytest.approx(0.75)
            assert d.score.flags == ("timeout",) and d.flags == {"slow": "timeout"}
            assert 0.5 <= d.seconds["slow"] < 5 and d.seconds["acc"] < 5
            assert d.verifier_seconds == (d.seconds["acc"], d.seconds["slow"]) and d.judge_seconds == ()
        assert elapsed < 30  # four 0.5 s hangs on two workers (and the restarts), not an hour
        # a gate cut at its timeout is flagged "timeout", not counted as a format failure
        gated = rewards.score_many([(task("count", reward="gated"), "3")])[0]
        assert gated.value == 0.0 and gated.flags == ("timeout",)
        stats = rewards.stats()
        assert stats["pool"]["restarts"] == 5 and rewards.pool.restarts == 5
        assert stats["verifier/hang"]["timeout"] == 5 and stats["verifier/hang"]["calls"] == 5
        assert stats["verifier/exact"]["calls"] == 5 and "timeout" not in stats["verifier/exact"]
        # the replaced workers keep serving
        again = rewards.score_many([(task("count"), "3")] * 3)
        assert all(s.components["acc"] == 1.0 for s in again)


def test_raising_crashing_and_out_of_range_verifiers_score_zero_with_error(caplog):
    specs = {"count": spec(("acc", "exact", 1.0), ("bad", "boom", 1.0)),
             "crash": spec(("acc", "exact", 1.0), ("bad", "die", 1.0)),
             "range": spec(("acc", "exact", 1.0), ("bad", "too_big", 1.0))}
    with RewardSystem(specs, verifiers=VERIFIERS, workers=2) as rewards, caplog.at_level(logging.WARNING):
        scores = rewards.score_many([(task(source, uid=str(i)), "3") for source in specs for i in range(3)])
        for s in scores:
            assert s.components == {"acc": 1.0, "bad": 0.0} and s.value == 0.5 and s.flags == ("error",)
        assert rewards.pool.restarts == 3  # the crashed workers, replaced
    boom_logs = [r for r in caplog.records if "'boom'" in r.getMessage()]
    assert len(boom_logs) == 1 and "ValueError: boom" in boom_logs[0].getMessage()
    assert any("worker died" in r.getMessage() for r in caplog.records)
    assert any("outside [0, 1]" in r.getMessage() for r in caplog.records)


def test_pool_directly_and_after_close():
    pool = RulePool(workers=1, timeout_s=0.3, preload=(__name__,))  # the verifiers' module imported at start,
    # outside the calls' deadlines (as RewardSystem does); imported on first call it can take > 0.3 s on a busy host
    assert pool.run(exact, "3", {"answer": "3"})[:2] == ("ok", 1.0)
    assert pool.run(hang, "", {}).status == "timeout"
    assert pool.run(exact, "3", {"answer": "4"})[:2] == ("ok", 0.0)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(exact, "3", {})


# --------------------------------------------------------------------------------- judges beside the rules
@pytest.fixture
def fake():
    server = FakeJudge().start()
    yield server
    server.stop()


def test_judges_run_beside_rules_and_fall_back_with_a_flag(fake):
    judge = JudgeClient(fake.url, concurrency=4, timeout_s=2.0, retries=1, backoff_s=0.01, fallback=0.25)
    specs = {"caption": RewardSpec((Component("fmt", verifier="tagged"), Component("judge", judge="caption")),
                                   aggregate="gate", gate="fmt"),
             "caption_any": RewardSpec((Component("judge", judge="caption"),), aggregate="min")}
    with RewardSystem(specs, verifiers=VERIFIERS, judge=judge) as rewards:
        out = rewards.score_many_detailed([
            (task("caption"), "<answer>REPLY=8"),
            (task("caption"), "REPLY=8"),  # format gate closed
            (task("caption_any"), "REPLY=not a number"),
            (task("caption_any"), "FAIL=5"),  # 500 on every attempt
        ])
    s = [d.score for d in out]
    assert s[0].value == pytest.approx(0.8) and s[0].components == {"fmt": 1.0, "judge": 0.8} and s[0].flags == ()
    assert s[1].value == 0.0 and s[1].flags == ("format",)
    assert s[2].value == 0.25 and s[2].flags == ("fallback",) and out[2].flags == {"judge": "fallback"}
    assert s[3].value == 0.25 and s[3].flags == ("fallback",)
    assert sum("FAIL=5" in str(b["messages"]) for b in fake.requests) == 2  # first try and one retry
    assert rewards.stats()["judge/caption"]["fallback"] == 2
    assert all(d.seconds["judge"] > 0 and d.judge_seconds == (d.seconds["judge"],) for d in out)
    assert out[0].verifier_seconds == (out[0].seconds["fmt"],) and out[2].verifier_seconds == ()


def test_score_many_inside_a_running_loop_is_refused():
    with RewardSystem({"count": spec(("acc", "exact", 1.0))}, verifiers=VERIFIERS) as rewards:
        async def inside():
            with pytest.raises(RuntimeError, match="await score"):
                rewards.score_many([(task("count"), "3")])
            return await rewards.score(task("count"), "3")
        assert asyncio.run(inside()).value == 1.0


def test_a_judge_server_killed_mid_evaluation_gives_flagged_fallbacks_and_the_evaluation_finishes():
    die_after = 6
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_judge.py"),
                             f"--die_after={die_after}"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[-1]
        judge = JudgeClient(url, concurrency=2, timeout_s=5.0, retries=2, backoff_s=0.01, fallback=0.0)
        specs = {"caption": RewardSpec((Component("acc", verifier="exact"), Component("judge", judge="caption")))}
        with RewardSystem(specs, verifiers=VERIFIERS, judge=judge) as rewards:
            scores = rewards.score_many([(task("caption", uid=str(i)), "REPLY=10") for i in range(20)])
        assert proc.wait(timeout=30) == 1  # it died
    finally:
        proc.kill()
    judged = [s for s in scores if not s.flags]
    fell_back = [s for s in scores if s.flags == ("fallback",)]
    # the requests answered before it died were judged (one in flight at its death may be lost), the rest fell back
    assert 1 <= len(judged) <= die_after - 1 and len(judged) + len(fell_back) == 20 and fell_back
    assert all(s.components == {"acc": 0.0, "judge": 1.0} for s in judged)
    assert all(s.components == {"acc": 0.0, "judge": 0.0} for s in fell_back)
    assert judge.counts["fallbacks"] == len(fell_back)
