"""The reward system: the one interface from (task, response) to a `Score`, for the trainer and the evaluator.

    rewards = RewardSystem(SPECS, judge=JudgeClient(url), workers=4, rule_timeout_s=5.0)
    score = await rewards.score(task, response)            # inside the RL pipeline's event loop
    scores = rewards.score_many([(task, response), ...])   # from synchronous code (runs its own loop)
    rewards.score_many_detailed(pairs)                     # Scored: + each component's seconds and flag
    rewards.stats()                                        # per verifier / judge rubric: calls, seconds, flags
    rewards.close()                                        # or `with RewardSystem(...) as rewards:`

A task is scored by the `RewardSpec` of its `reward` override, else of its `data_source` (an unknown key is
an `UnknownReward`, a KeyError naming the task, the key and the known ones). Each component is a rule
verifier (a name in the verifier table, default `rl.verifiers.VERIFIERS`) or a judge rubric (`rl.judge`).
Rule verifiers run in worker processes with wall-clock timeouts (`rl.rule_pool`; a hung verifier's worker
is killed and replaced); judges are awaited concurrently with them, and `score_many` gathers every component
of every sample at once, so rule work overlaps judge calls. The spec's aggregator (`AGGREGATORS`) combines
the component values into `Score.value`; `Score.components` keeps every component's value.

Flags (`Score.flags`, each once, in component order): "timeout" (a verifier cut at its deadline, scored 0),
"error" (a verifier that raised or returned no number in [0, 1], scored 0; logged once per verifier name),
"fallback" (a judge without a usable reply, scored the client's fallback), "format" (a "gate" spec whose
gate component is below `GATE_THRESHOLD` by its verdict, not by a flag of its own: a format failure).

Latency: `Score` is frozen and has no place for timings, so they travel beside it. `score_detailed` (and
`score_many_detailed`) return `Scored(score, spec, seconds, flags, ...)` with each component's wall seconds:
a verifier's call in its worker (IPC included, waiting for a free worker not), a judge's request (its wait
for the concurrency limit, retries and backoff included); also split by kind (`verifier_seconds`,
`judge_seconds`: the latency arguments of `rl.metrics.group_stats`). The system also keeps running totals
per "verifier/<name>" and "judge/<rubric>" (`stats()`: calls, seconds, max, flag counts).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import pickle
import threading
from typing import Any, Callable, Iterable, Mapping

from glm5v_jax.rl.rule_pool import RulePool
from glm5v_jax.rl.types import Component, RewardSpec, Score, Task, Verifier

log = logging.getLogger(__name__)

GATE_THRESHOLD = 0.5  # a "gate" spec's gate component counts as passed at or above this value
Aggregator = Callable[[Mapping[str, float], RewardSpec], float]


# --------------------------------------------------------------------------------- aggregation
def weighted_sum(values: Mapping[str, float], spec: RewardSpec, skip: str = "") -> float:
    """sum_i w_i v_i / sum_i w_i over the components (but `skip`)."""
    parts = [(c.weight, values[c.name]) for c in spec.components if c.name != skip]
    return sum(w * v for w, v in parts) / sum(w for w, _ in parts)


def product(values: Mapping[str, float], spec: RewardSpec) -> float:
    """prod_i v_i (weights are not used)."""
    return math.prod(values[c.name] for c in spec.components)


def gate(values: Mapping[str, float], spec: RewardSpec) -> float:
    """[v_gate >= GATE_THRESHOLD] * the weighted sum of the other components: format gate x accuracy."""
    return (1.0 if values[spec.gate] >= GATE_THRESHOLD else 0.0) * weighted_sum(values, spec, skip=spec.gate)


def minimum(values: Mapping[str, float], spec: RewardSpec) -> float:
    """min_i v_i (weights are not used)."""
    return min(values[c.name] for c in spec.components)


AGGREGATORS: dict[str, Aggregator] = {"weighted_sum": weighted_sum, "product": product, "gate": gate,
                                      "min": minimum}


def check_spec(key: str, spec: RewardSpec, verifiers: Mapping[str, Verifier], rubrics: Iterable[str] | None) -> None:
    """ValueError naming the spec and the field for a spec that cannot score (`rubrics` None: no judge)."""
    where = f"reward spec {key!r}"
    if not isinstance(spec, RewardSpec):
        raise ValueError(f"{where}: expected a RewardSpec, got {type(spec).__name__}")
    if not spec.components:
        raise ValueError(f"{where}: components is empty")
    names = [c.name for c in spec.components]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: component names repeat: {names}")
    if spec.aggregate not in AGGREGATORS:
        raise ValueError(f"{where}: aggregate {spec.aggregate!r} is not one of {sorted(AGGREGATORS)}")
    if spec.aggregate == "gate":
        if spec.gate not in names:
            raise ValueError(f"{where}: gate {spec.gate!r} must name one of its components {names}")
        if len(names) < 2:
            raise ValueError(f"{where}: aggregate 'gate' needs a component besides the gate {spec.gate!r}")
    elif spec.gate:
        raise ValueError(f"{where}: gate {spec.gate!r} is only read by aggregate 'gate', not {spec.aggregate!r}")
    for c in spec.components:
        if not (math.isfinite(c.weight) and c.weight >= 0):
            raise ValueError(f"{where}: component {c.name!r}: weight must be finite and >= 0, got {c.weight}")
        if c.verifier:
            _check_verifier(f"{where}: component {c.name!r}", c.verifier, verifiers)
        elif rubrics is None:
            raise ValueError(f"{where}: component {c.name!r} uses judge {c.judge!r} but the RewardSystem has "
                             "no judge (RewardSystem(..., judge=JudgeClient(url)))")
        elif c.judge not in rubrics:
            raise ValueError(f"{where}: component {c.name!r}: judge rubric {c.judge!r} is not one of "
                             f"{sorted(rubrics)}")
    if spec.aggregate in ("weighted_sum", "gate"):
        if sum(c.weight for c in spec.components if c.name != spec.gate) <= 0:
            raise ValueError(f"{where}: the weights of the summed components add up to 0")


def _check_verifier(where: str, name: str, verifiers: Mapping[str, Verifier]) -> None:
    if name not in verifiers:
        raise ValueError(f"{where}: verifier {name!r} is not one of {sorted(verifiers)}")
    fn = verifiers[name]
    if _module(fn) == "__main__":
        raise ValueError(f"{where}: verifier {name!r} is defined in __main__; rule verifiers run in worker "
                         "processes, which import them by module name: define it in a module")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001 - lambdas, closures, bound methods of unpicklable objects
        raise ValueError(f"{where}: verifier {name!r} does not pickle ({e}); use a module-level function") from None


def _module(fn: Any) -> str:
    return getattr(getattr(fn, "func", fn), "__module__", None) or "builtins"  # functools.partial: its func


# --------------------------------------------------------------------------------- the system
class UnknownReward(KeyError):
    """A task whose reward override or data source has no spec (the message names both and the known keys)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Scored:
    """A Score with how it was reached: the spec key used, each component's wall seconds, each flagged
    component's flag ("timeout" | "error" | "fallback"), and the seconds split by kind (rule verifier calls,
    judge calls; what `rl.metrics.group_stats` takes as verifier_latency_s / judge_latency_s)."""

    score: Score
    spec: str
    seconds: Mapping[str, float]
    flags: Mapping[str, str]
    verifier_seconds: tuple[float, ...] = ()
    judge_seconds: tuple[float, ...] = ()


class RewardSystem:
    """Scores (task, response) pairs by data source; see the module docstring."""

    def __init__(self, specs: Mapping[str, RewardSpec], verifiers: Mapping[str, Verifier] | None = None,
                 judge: Any = None, workers: int = 2, rule_timeout_s: float = 5.0):
        if verifiers is None:
            from glm5v_jax.rl.verifiers import VERIFIERS as verifiers
        self.specs, self.verifiers, self.judge = dict(specs), dict(verifiers), judge
        rubrics = None if judge is None else judge.rubrics
        for key, spec in self.specs.items():
            check_spec(key, spec, self.verifiers, rubrics)
        used = {c.verifier for s in self.specs.values() for c in s.components if c.verifier}
        preload = sorted({_module(self.verifiers[v]) for v in used} - {"builtins"})
        self.pool = RulePool(workers, rule_timeout_s, preload=preload)  # processes start on first use
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rule-verifier")
        self._lock = threading.Lock()
        self._stats: dict[str, collections.Counter] = {}
        self._logged: set[tuple[str, str]] = set()

    def spec_for(self, task: Task) -> tuple[str, RewardSpec]:
        """(key, spec) scoring `task`: its `reward` override, else its `data_source`."""
        key = task.reward or task.data_source
        if key not in self.specs:
            what = f"reward override {key!r}" if task.reward else f"data_source {key!r}"
            raise UnknownReward(f"task {task.uid!r}: {what} has no reward spec; known: {sorted(self.specs)}")
        return key, self.specs[key]

    # ------------------------------------------------------------------ scoring
    async def score(self, task: Task, response: str) -> Score:
        return (await self.score_detailed(task, response)).score

    async def score_detailed(self, task: Task, response: str) -> Scored:
        """Every component of the task's spec at once (rules in the pool, judges over HTTP), then aggregated."""
        key, spec = self.spec_for(task)
        response = "" if response is None else str(response)
        results = await asyncio.gather(*(self._rule(c, response, task.reference) if c.verifier
                                         else self._judge(c, task, response) for c in spec.components))
        values = {c.name: v for c, (v, _, _) in zip(spec.components, results)}
        flags = {c.name: f for c, (_, f, _) in zip(spec.components, results) if f}
        raised = list(dict.fromkeys(flags.values()))
        if spec.aggregate == "gate" and values[spec.gate] < GATE_THRESHOLD and spec.gate not in flags:
            raised.append("format")
        self._record(spec.components, results)
        score = Score(float(AGGREGATORS[spec.aggregate](values, spec)), values, tuple(raised))
        seconds = {c.name: t for c, (_, _, t) in zip(spec.components, results)}
        return Scored(score, key, seconds, flags, tuple(seconds[c.name] for c in spec.components if c.verifier),
                      tuple(seconds[c.name] for c in spec.components if c.judge))

    def score_many(self, pairs: Iterable[tuple[Task, str]]) -> list[Score]:
        """Scores of (task, response) pairs, in order, all scored concurrently (from synchronous code)."""
        return [s.score for s in self.score_many_detailed(pairs)]

    def score_many_detailed(self, pairs: Iterable[tuple[Task, str]]) -> list[Scored]:
        pairs = list(pairs)
        for task, _ in pairs:
            self.spec_for(task)  # refuse an unknown source before any work starts
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._many(pairs))
        raise RuntimeError("score_many runs its own event loop; inside a running loop, await score() or "
                           "score_detailed()")

    async def _many(self, pairs: list[tuple[Task, str]]) -> list[Scored]:
        try:
            return list(await asyncio.gather(*(self.score_detailed(t, r) for t, r in pairs)))
        finally:
            if self.judge is not None:
                await self.judge.aclose()  # its session belongs to this loop, which ends here

    async def _rule(self, c: Component, response: str, reference: Mapping[str, Any]) -> tuple[float, str | None, float]:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._threads, self.pool.run, self.verifiers[c.verifier], response,
                                         dict(reference))
        status, value, message = out.status, out.value, out.message
        if status == "ok" and not -1e-6 <= value <= 1 + 1e-6:
            status, message = "error", f"returned {value}, outside [0, 1]"
        if status == "ok":
            return min(max(value, 0.0), 1.0), None, out.seconds
        if (c.verifier, status) not in self._logged:
            self._logged.add((c.verifier, status))
            log.warning("rule verifier %r: %s; scored 0 with flag %r (logged once per verifier and kind)",
                        c.verifier, message, status)
        return 0.0, status, out.seconds

    async def _judge(self, c: Component, task: Task, response: str) -> tuple[float, str | None, float]:
        r = await self.judge.judge(c.judge, task, response)
        return r.value, r.flag, r.seconds

    # ------------------------------------------------------------------ latency and flag counts
    def _record(self, components, results) -> None:
        with self._lock:
            for c, (_, flag, seconds) in zip(components, results):
                key = f"verifier/{c.verifier}" if c.verifier else f"judge/{c.judge}"
                s = self._stats.setdefault(key, collections.Counter())
                s["calls"] += 1
                s["seconds"] += seconds
                s["max_seconds"] = max(s["max_seconds"], seconds)
                if flag:
                    s[flag] += 1

    def stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Per "verifier/<name>" and "judge/<rubric>": calls, seconds (total), mean_seconds, max_seconds and
        the count of each flag raised; plus "pool": the rule workers restarted (killed or lost)."""
        with self._lock:
            out = {k: dict(v, mean_seconds=v["seconds"] / v["calls"]) for k, v in self._stats.items()}
            if reset:
                self._stats.clear()
        out["pool"] = {"restarts": self.pool.restarts}
        return out

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the rule workers (a judge's HTTP session is closed by `aclose`, or after each `score_many`)."""
        self.pool.close()
        self._threads.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        if self.judge is not None:
            await self.judge.aclose()
        self.close()

    def __enter__(self) -> "RewardSystem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "RewardSystem":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
