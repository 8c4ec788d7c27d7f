"""A simulated generation engine for pipeline tests and benchmarks: the `Engine` interface the rollout driver
uses (submit / extend / release / abort / step / idle / capacity / metrics), over a virtual clock.

Each sample's answer length is drawn from a lognormal distribution (the long tail that makes synchronous
rollouts wait); every `step()` admits queued requests FIFO while their samples have free slots (with
`admit_lookahead` and `admit_partial` as the real engine's), then
decodes one token for each live sample and advances `clock` by `step_s`. Answers are `filler` tokens
ending with `stop` (or cut at the turn's budget: finish "length", or at `max_seq_len`: "capacity").
`metrics()` counts busy and total slot-steps, so utilisation = busy / total. `ParityRewards` is a reward
system for it: about half the answers score, so most groups carry signal.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Iterable

import numpy as np

from glm5v_jax.generate.requests import Completion, Request, Sample
from glm5v_jax.rl.rewards import Scored
from glm5v_jax.rl.types import Score


class _SimJob:
    def __init__(self, rid: int, request: Request, length: int):
        self.rid, self.request = rid, request
        self.samples = [Sample() for _ in range(request.n)]
        self.lengths = [length] * request.n  # tokens in each sample's context
        self.targets: list[int] = []
        self.counts: list[int] = []
        self.admitted = [False] * request.n  # this turn's samples holding a slot (or finished)
        self.budget = request.max_new_tokens
        self.state = "queued"


class SimEngine:
    """See the module docstring. `mean_tokens` and `sigma` set the lognormal answer lengths."""

    spec = None  # prompts must be text-only (no image to preprocess)

    def __init__(self, *, filler: int, stop: int, max_slots: int = 16, max_seq_len: int = 4096, step_s: float = 0.01,
                 mean_tokens: float = 32.0, sigma: float = 1.0, seed: int = 0, admit_lookahead: int = 0,
                 admit_partial: bool = False):
        self.admit_lookahead, self.admit_partial = admit_lookahead, admit_partial
        self.filler, self.stop, self.max_slots, self.capacity = filler, stop, max_slots, max_seq_len
        self.step_s, self.mu, self.sigma = step_s, np.log(mean_tokens) - sigma**2 / 2, sigma
        self.rng = np.random.default_rng(seed)
        self.clock = 0.0
        self.version = 0
        self._jobs: dict[int, _SimJob] = {}
        self._queue: collections.deque[_SimJob] = collections.deque()
        self._running: list[_SimJob] = []
        self._next = 0
        self._metrics = collections.Counter()

    # ------------------------------------------------------------------ the Engine interface
    @property
    def idle(self) -> bool:
        return not self._queue and not self._running

    @property
    def queued_samples(self) -> int:
        """Samples waiting for a slot."""
        return sum(not a for j in self._queue for a in j.admitted)

    def submit(self, request: Request) -> int:
        if len(request.tokens) >= self.capacity:
            raise ValueError(f"request {self._next}: {len(request.tokens)} tokens leave no room in max_seq_len")
        job = _SimJob(self._next, request, len(request.tokens))
        self._next += 1
        self._jobs[job.rid] = job
        self._queue.append(job)
        self._metrics["requests"] += 1
        return job.rid

    def extend(self, rid: int, tokens=(), images=None, *, max_new_tokens: int | None = None, **_) -> None:
        job = self._jobs[rid]
        if job.state != "held":
            raise ValueError(f"request {rid} is {job.state}; only a held request can be extended")
        job.lengths = [n + len(tokens) for n in job.lengths]
        job.budget = max_new_tokens or job.request.max_new_tokens
        job.admitted = [False] * job.request.n
        job.state = "queued"
        self._queue.append(job)

    def release(self, rid: int) -> None:
        self._jobs[rid].state = "done"

    def abort(self, ids: Iterable[int]) -> list[Completion]:
        out = []
        for rid in ids:
            job = self._jobs[rid]
            if job.state == "done":
                continue
            if job in self._queue:
                self._queue.remove(job)
            if job in self._running:
                self._running.remove(job)
            for s in job.samples:
                s.finish = s.finish or "abort"
            job.state = "done"
            self._metrics["aborted"] += 1
            out.append(self._completion(job))
        return out

    def update_weights(self, model, version: int) -> None:
        del model
        self.version = version

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics, queued=len(self._queue), held=sum(j.state == "held" for j in self._jobs.values()))

    def step(self) -> list[Completion]:
        live = sum(s.finish is None and a for j in self._running for s, a in zip(j.samples, j.admitted))
        at = 0  # FIFO admission, with the engine's `admit_lookahead` and `admit_partial`
        while at < len(self._queue):
            job = self._queue[at]
            waiting = [i for i, a in enumerate(job.admitted) if not a]
            free = self.max_slots - live
            partial = self.admit_partial and not job.request.keep
            take = len(waiting) if len(waiting) <= free else free if partial else 0
            if take:
                if not any(job.admitted):  # the turn starts
                    job.targets = [max(1, int(round(x))) for x in self.rng.lognormal(self.mu, self.sigma,
                                                                                      job.request.n)]
                    job.counts = [0] * job.request.n
                    for s in job.samples:
                        s.finish = None
                    job.state = "running"
                    self._running.append(job)
                for i in waiting[:take]:
                    job.admitted[i] = True
                live += take
                if take == len(waiting):
                    del self._queue[at]
                    continue
                self._metrics["partial_admissions"] += 1  # the rest of the group waits at its place
            if at >= self.admit_lookahead:
                break
            at += 1
        finished, decoded = [], 0
        for job in list(self._running):
            for i, s in enumerate(job.samples):
                if s.finish is not None or not job.admitted[i]:
                    continue
                decoded += 1
                job.counts[i] += 1
                job.lengths[i] += 1
                last = job.counts[i] >= job.targets[i]
                s.tokens.append(self.stop if last else self.filler)
                s.logp_raw.append(-1.0)
                s.logp_sampled.append(-1.0)
                s.versions.append(self.version)
                if last:
                    s.finish = "stop"
                elif job.counts[i] >= job.budget:
                    s.finish = "length"
                elif job.lengths[i] >= self.capacity:
                    s.finish = "capacity"
            if all(s.finish is not None for s in job.samples):
                self._running.remove(job)
                job.state = "held" if job.request.keep else "done"
                finished.append(self._completion(job))
        self._metrics["busy_slot_steps"] += decoded
        self._metrics["slot_steps"] += self.max_slots
        self._metrics["steps"] += 1
        self.clock += self.step_s
        return finished

    def _completion(self, job: _SimJob) -> Completion:
        return Completion(job.rid, len(job.request.tokens), [s.copy() for s in job.samples])


class ParityRewards:
    """The reward system's `score_detailed` for simulated answers: 1 for an even-length answer, else 0, after
    `delay_s` real seconds."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    async def score_detailed(self, task, response: str) -> Scored:
        await asyncio.sleep(self.delay_s)
        value = float(len(response) % 2 == 0)
        return Scored(Score(value, {"parity": value}), "parity", {}, {})
