"""RL metrics per data source: unbiased pass@k, reward means, flag rates, latencies, summed over shards.

    pass_at_k(n, c, k)       1 - C(n-c, k) / C(n, k), the chance that k of n samples hold a correct one
    pass_ks(8) == [1, 2, 4, 8]; pass_ks(6) == [1, 2, 4, 6]
    group_stats(scores, ...) one prompt's n scored samples as a SourceStats (sums and counts only)
    merge_stats(a, b, ...)   {source: SourceStats}, key-wise sums: shards merge by addition
    gather_stats(stats, sources=..., max_k=...)  the same sum across JAX processes (process_allgather)
    summary(stats)           {"{source}/reward_mean": ..., "{source}/pass@4": ..., "all/...": ...}

A sample is correct when its reward is >= `correct_at` (default 1.0). Every statistic is a sum, so
the per-source means computed from shards merged in any order equal those computed on everything.
A group of n samples contributes to pass@k for every k <= n; pass@k of a source is the mean over its
prompts with n >= k, and `summary` reports k in pass_ks(largest n) of that source.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from glm5v_jax.rl.types import FLAGS, Score

ALL = "all"  # the aggregate over every source in `summary`
_COUNTS = ("samples", "prompts", "correct", "format_failures", "timeouts", "fallbacks", "errors",
           "verifier_calls", "judge_calls")
_SUMS = ("reward_sum", "verifier_latency_s", "judge_latency_s")
_FLAG_FIELD = {"format": "format_failures", "timeout": "timeouts", "fallback": "fallbacks", "error": "errors"}
assert set(_FLAG_FIELD) == set(FLAGS)


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"pass_at_k: {name} must be an integer >= 0, got {value!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021) from n samples of which c are correct,
    1 - C(n-c, k) / C(n, k), in the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1.0 when
    n - c < k (every k-subset holds a correct sample)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        _check_int(name, value)
    if k < 1 or k > n or c > n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"pass_ks: n must be an integer >= 1, got {n!r}")
    ks = [1 << i for i in range(int(n).bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [int(n)]


@dataclasses.dataclass
class SourceStats:
    """Sums and counts of one data source (or one shard of it). `pass_sum[k]` sums pass@k over the
    `pass_prompts[k]` prompts with at least k samples; latencies are seconds over `*_calls` calls."""

    samples: int = 0
    prompts: int = 0
    correct: int = 0
    format_failures: int = 0
    timeouts: int = 0
    fallbacks: int = 0
    errors: int = 0
    verifier_calls: int = 0
    judge_calls: int = 0
    reward_sum: float = 0.0
    verifier_latency_s: float = 0.0
    judge_latency_s: float = 0.0
    pass_sum: dict[int, float] = dataclasses.field(default_factory=dict)
    pass_prompts: dict[int, int] = dataclasses.field(default_factory=dict)

    def __add__(self, other: SourceStats) -> SourceStats:
        if not isinstance(other, SourceStats):
            return NotImplemented
        fields = {f: getattr(self, f) + getattr(other, f) for f in _COUNTS + _SUMS}
        ks = sorted(set(self.pass_sum) | set(other.pass_sum))
        return SourceStats(**fields,
                           pass_sum={k: self.pass_sum.get(k, 0.0) + other.pass_sum.get(k, 0.0) for k in ks},
                           pass_prompts={k: self.pass_prompts.get(k, 0) + other.pass_prompts.get(k, 0) for k in ks})

    @property
    def max_k(self) -> int:
        return max((k for k, p in self.pass_prompts.items() if p), default=0)


def group_stats(scores: Sequence[Score], *, correct_at: float = 1.0, verifier_latency_s: Sequence[float] = (),
                judge_latency_s: Sequence[float] = ()) -> SourceStats:
    """The statistics of one prompt's n >= 1 scored samples: their rewards, how many are correct
    (value >= `correct_at`), pass@k for k = 1..n, the samples flagged "format", "timeout", "fallback",
    "error" (each counted once per sample), and the verifier and judge call latencies in seconds."""
    if not scores:
        raise ValueError("group_stats: a group needs at least one scored sample")
    values = []
    flags = {f: 0 for f in FLAGS}
    for s in scores:
        if not isinstance(s, Score):
            raise TypeError(f"group_stats: want rl.types.Score, got {type(s).__name__}")
        if not math.isfinite(s.value):
            raise ValueError(f"group_stats: a reward is not finite ({s.value!r}); flags {s.flags}")
        unknown = set(s.flags) - set(FLAGS)
        if unknown:
            raise ValueError(f"group_stats: unknown flags {sorted(unknown)}; known: {FLAGS}")
        values.append(float(s.value))
        for f in set(s.flags):
            flags[f] += 1
    for name, latencies in (("verifier_latency_s", verifier_latency_s), ("judge_latency_s", judge_latency_s)):
        if any(not math.isfinite(t) or t < 0 for t in latencies):
            raise ValueError(f"group_stats: {name} must be finite seconds >= 0, got {list(latencies)!r}")
    n, c = len(values), sum(v >= correct_at for v in values)
    return SourceStats(
        samples=n, prompts=1, correct=c, **{_FLAG_FIELD[f]: flags[f] for f in FLAGS},
        verifier_calls=len(verifier_latency_s), judge_calls=len(judge_latency_s), reward_sum=math.fsum(values),
        verifier_latency_s=math.fsum(verifier_latency_s), judge_latency_s=math.fsum(judge_latency_s),
        pass_sum={k: pass_at_k(n, c, k) for k in range(1, n + 1)}, pass_prompts={k: 1 for k in range(1, n + 1)})


def merge_stats(*stats: Mapping[str, SourceStats]) -> dict[str, SourceStats]:
    """{source: SourceStats} tables summed key-wise (shards, steps, or groups wrapped as {source: g})."""
    out: dict[str, SourceStats] = {}
    for table in stats:
        for source, s in table.items():
            out[source] = out[source] + s if source in out else s + SourceStats()
    return out


def pack_stats(stats: Mapping[str, SourceStats], sources: Sequence[str], max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed layout for a cross-process sum: int64 counts [S, 9 + max_k] and float64 sums
    [S, 3 + max_k], rows in `sources` order (every process must pass the same `sources` and `max_k`)."""
    extra = set(stats) - set(sources)
    if extra:
        raise ValueError(f"pack_stats: sources {sorted(extra)} are not in sources={list(sources)}")
    counts = np.zeros((len(sources), len(_COUNTS) + max_k), np.int64)
    sums = np.zeros((len(sources), len(_SUMS) + max_k), np.float64)
    for row, source in enumerate(sources):
        s = stats.get(source)
        if s is None:
            continue
        if s.max_k > max_k:
            raise ValueError(f"pack_stats: source {source!r} has groups of {s.max_k} samples, over max_k={max_k}")
        counts[row, :len(_COUNTS)] = [getattr(s, f) for f in _COUNTS]
        sums[row, :len(_SUMS)] = [getattr(s, f) for f in _SUMS]
        for k in range(1, max_k + 1):
            counts[row, len(_COUNTS) + k - 1] = s.pass_prompts.get(k, 0)
            sums[row, len(_SUMS) + k - 1] = s.pass_sum.get(k, 0.0)
    return counts, sums


def unpack_stats(counts: np.ndarray, sums: np.ndarray, sources: Sequence[str]) -> dict[str, SourceStats]:
    """The inverse of `pack_stats`; sources with no sample are left out."""
    max_k = counts.shape[1] - len(_COUNTS)
    out = {}
    for row, source in enumerate(sources):
        if counts[row, 0] == 0:
            continue
        c, s = counts[row], sums[row]
        ks = [k for k in range(1, max_k + 1) if c[len(_COUNTS) + k - 1]]
        out[source] = SourceStats(
            **{f: int(c[i]) for i, f in enumerate(_COUNTS)}, **{f: float(s[i]) for i, f in enumerate(_SUMS)},
            pass_sum={k: float(s[len(_SUMS) + k - 1]) for k in ks},
            pass_prompts={k: int(c[len(_COUNTS) + k - 1]) for k in ks})
    return out


def gather_stats(stats: Mapping[str, SourceStats], *, sources: Sequence[str], max_k: int) -> dict[str, SourceStats]:
    """Every process's statistics summed, on every process (`process_allgather` of the packed arrays,
    then a sum). All processes must call it with the same `sources` (every data source that any shard
    may hold) and `max_k` (the largest group size). One process: its own statistics, unchanged. Without
    jax_enable_x64 the arrays travel as int32 and float32."""
    import jax
    from jax.experimental import multihost_utils

    counts, sums = pack_stats(stats, sources, max_k)  # checks the layout on one process too
    if jax.process_count() == 1:
        return dict(stats)
    if not jax.config.jax_enable_x64:  # what JAX would truncate them to, made explicit
        counts, sums = counts.astype(np.int32), sums.astype(np.float32)
    counts, sums = multihost_utils.process_allgather((counts, sums))
    return unpack_stats(np.asarray(counts).sum(0), np.asarray(sums, np.float64).sum(0), sources)


def _source_summary(prefix: str, s: SourceStats) -> dict[str, float]:
    out = {f"{prefix}/reward_mean": s.reward_sum / s.samples, f"{prefix}/accuracy": s.correct / s.samples,
           f"{prefix}/samples": float(s.samples), f"{prefix}/prompts": float(s.prompts),
           f"{prefix}/format_failure_rate": s.format_failures / s.samples,
           f"{prefix}/timeout_rate": s.timeouts / s.samples, f"{prefix}/fallback_rate": s.fallbacks / s.samples,
           f"{prefix}/error_rate": s.errors / s.samples}
    if s.max_k:
        for k in pass_ks(s.max_k):
            if s.pass_prompts.get(k):
                out[f"{prefix}/pass@{k}"] = s.pass_sum[k] / s.pass_prompts[k]
    if s.verifier_calls:
        out[f"{prefix}/verifier_latency_ms"] = 1000.0 * s.verifier_latency_s / s.verifier_calls
    if s.judge_calls:
        out[f"{prefix}/judge_latency_ms"] = 1000.0 * s.judge_latency_s / s.judge_calls
    return out


def summary(stats: Mapping[str, SourceStats]) -> dict[str, float]:
    """Means and rates per source and over all of them ("all/..."): reward_mean, accuracy (the fraction
    of correct samples), pass@k for k in pass_ks(largest group of the source), format_failure_rate,
    timeout_rate, fallback_rate, error_rate (per sample), verifier_latency_ms and judge_latency_ms (per
    call, when there were calls), samples, prompts. Sources with no sample are left out."""
    if ALL in stats:
        raise ValueError(f"summary: {ALL!r} is reserved for the aggregate, not a data source")
    out: dict[str, float] = {}
    total = SourceStats()
    for source in sorted(stats):
        s = stats[source]
        total = total + s
        if s.samples:
            out.update(_source_summary(source, s))
    if total.samples:
        out.update(_source_summary(ALL, total))
    return out
