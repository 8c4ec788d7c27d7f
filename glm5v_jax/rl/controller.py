"""The rollout controller: rounds of RL groups from a stream of tasks, rewards overlapped with generation.

    worker = RewardWorker(RewardSystem(reward_specs(), judge=...))
    controller = RolloutController(driver, worker, iter(TaskMix()), group_size=8, groups_per_batch=32,
                                   over_sample=1.5, abort_after_s=300.0, max_off_policy_steps=1)
    batch = controller.next_batch(version)    # a Round: accepted groups (n scored episodes each) and counters

What the report's section 2.4 asks of the pipeline, and where it happens here:
  * a reward starts as soon as its episode ends: the driver's `on_episode` callback hands the episode to
    the `RewardWorker` (an event loop in a background thread) while the engine keeps stepping;
  * over-sampling with a dynamic filter: groups are started until accepted + active reach
    ceil(groups_per_batch * over_sample) and twice the engine's slots are in flight (it never idles on
    the long tail); a group whose rewards are all equal carries no signal and is dropped
    (`filter_equal`), and another group takes its place;
  * two early-abort modes: by completion count (`abort_on_count`: once `groups_per_batch` groups are
    accepted the rest are aborted) and by time (`abort_after_s`: at the deadline whatever is active is
    aborted and the round returns what it has);
  * aborted groups are cached with their partial tokens, weight versions and what each turn had left of
    its budget (never past the engine's max_seq_len: `RolloutDriver.resume`), and are served first the
    next round; their pending reward calls (judges included) are cancelled, not awaited;
  * bounded staleness: a cached group whose oldest generated token is older than
    `max_off_policy_steps` weight versions is dropped instead of resumed (counted).
Every group started is accounted for exactly once: accepted, filtered, dropped stale, cached (aborted) or
carried (complete beyond a full batch: it opens the next one, staleness checked again).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import threading
import time
from typing import Any, Callable, Iterator

from glm5v_jax.rl.rollout import Episode, RolloutDriver
from glm5v_jax.rl.types import Task


class RewardWorker:
    """Scores (task, response) pairs on an event loop in a background thread: `submit` returns at once with
    a concurrent Future of the reward system's `Scored`; cancelling it cancels the scoring task (a judge's
    HTTP request is dropped, not awaited)."""

    def __init__(self, rewards: Any):
        self.rewards = rewards
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="reward-worker", daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task] = set()

    def submit(self, task: Task, response: str) -> concurrent.futures.Future:
        async def score():
            current = asyncio.current_task()
            self._tasks.add(current)
            try:
                return await self.rewards.score_detailed(task, response)
            finally:
                self._tasks.discard(current)

        return asyncio.run_coroutine_threadsafe(score(), self.loop)

    @property
    def running(self) -> int:
        """Scoring tasks not finished yet (a cancelled one leaves as soon as the loop has cancelled it)."""
        return len(self._tasks)

    def close(self) -> None:
        """Stop the loop (closing the judge's HTTP session on it) and the reward system's worker processes."""
        async def drain():  # cancel what is still scoring, so that no coroutine is left unawaited
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            judge = getattr(self.rewards, "judge", None)
            if judge is not None:
                await judge.aclose()

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        if hasattr(self.rewards, "close"):
            self.rewards.close()


@dataclasses.dataclass
class Group:
    """One task's n episodes, their rewards (None until scored) and the futures scoring them."""

    task: Task
    episodes: list[Episode]
    scores: list[Any]
    futures: list[concurrent.futures.Future | None]

    @property
    def complete(self) -> bool:
        return all(e.done for e in self.episodes) and all(s is not None for s in self.scores)

    @property
    def rewards(self) -> list[float]:
        return [s.score.value for s in self.scores]

    def oldest_version(self) -> int | None:
        """The oldest weight version of any generated token (None before any was generated)."""
        versions = [v for e in self.episodes for v in e.versions if v >= 0]
        return min(versions) if versions else None


@dataclasses.dataclass
class Round:
    """A batch: `groups` accepted in completion order, and what else happened in the round."""

    groups: list[Group]
    filtered: int = 0       # groups dropped because their rewards were all equal
    filtered_groups: list[Group] = dataclasses.field(default_factory=list)  # those groups (for unbiased metrics)
    aborted: int = 0        # groups cut by the early abort, cached for the next round
    resumed: int = 0        # cached groups served at the start of this round
    stale: int = 0          # cached groups dropped as too far off-policy
    stale_groups: list[Group] = dataclasses.field(default_factory=list)
    cancelled_rewards: int = 0  # pending reward calls cancelled by the abort
    abort_reason: str | None = None  # "count" | "time" | None (every group finished)
    seconds: float = 0.0
    ended: int = 0          # episodes that ended in this round (each reward started at that moment)
    first_reward_at: float | None = None     # seconds into the round when the first reward started
    last_generation_at: float | None = None  # ... when the last episode of the round ended


class RolloutController:
    """Rounds of scored groups over a `RolloutDriver` and a `RewardWorker`; see the module docstring."""

    def __init__(self, driver: RolloutDriver, worker: RewardWorker, tasks: Iterator[Task], *, group_size: int,
                 groups_per_batch: int, over_sample: float = 1.5, abort_on_count: bool = True,
                 abort_after_s: float | None = None, filter_equal: bool = True, max_off_policy_steps: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        if group_size < 1 or groups_per_batch < 1 or over_sample < 1:
            raise ValueError(f"RolloutController: group_size ({group_size}) and groups_per_batch "
                             f"({groups_per_batch}) must be >= 1 and over_sample ({over_sample}) >= 1")
        self.driver, self.worker, self.tasks = driver, worker, tasks
        self.group_size, self.groups_per_batch = group_size, groups_per_batch
        self.target = math.ceil(groups_per_batch * over_sample)  # accepted + active groups in a round
        self.abort_on_count, self.abort_after_s, self.filter_equal = abort_on_count, abort_after_s, filter_equal
        self.max_off_policy_steps, self.clock = max_off_policy_steps, clock
        driver.on_episode = self._episode_done
        self.active: list[Group] = []  # started this round (or resumed), not accepted or dropped yet
        self.cached: list[Group] = []  # aborted groups, served first next round
        self.carried: list[Group] = []  # complete groups beyond a batch (abort_on_count=False), served first
        self.requeued: list[Task] = []  # tasks to start before the stream's (a restart's cached and carried ones)
        self._group_of: dict[int, Group] = {}
        self._round: Round | None = None
        self._t0 = 0.0
        self.version = 0
        self.started = 0  # groups started from the task stream, ever

    # ------------------------------------------------------------------ a round
    def next_batch(self, version: int) -> Round:
        """Generate and score until `groups_per_batch` groups are accepted (or the deadline); abort the rest."""
        self.version, self._t0 = version, self.clock()
        r = self._round = Round([])
        while self.carried and len(r.groups) < self.groups_per_batch:
            g = self.carried.pop(0)
            if self._stale(g):
                r.stale += 1
                r.stale_groups.append(g)
            else:
                r.groups.append(g)
        self._serve_cached()
        self._fill()
        while len(r.groups) < self.groups_per_batch or (not self.abort_on_count and self.active):
            self._collect()
            if len(r.groups) >= self.groups_per_batch and (self.abort_on_count or not self.active):
                break
            if self.abort_after_s is not None and self.clock() - self._t0 >= self.abort_after_s:
                r.abort_reason = "time"
                break
            if self.driver.in_flight:
                self.driver.step()
            elif self.active:  # every episode generated: wait a little for rewards
                pending = [f for g in self.active for f in g.futures if f is not None and not f.done()]
                concurrent.futures.wait(pending, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
            else:
                raise RuntimeError("RolloutController: the task stream ran dry")
            self._fill()
        if self.active:
            r.abort_reason = r.abort_reason or "count"
            self._abort_active()
        if len(r.groups) > self.groups_per_batch:  # groups that completed together: the surplus opens the next batch
            self.carried += r.groups[self.groups_per_batch:]
            del r.groups[self.groups_per_batch:]
        r.seconds = self.clock() - self._t0
        return r

    def pending_tasks(self) -> list[Task]:
        """The tasks whose groups are held between rounds (cached, carried, requeued): what a checkpoint keeps,
        so that a restart (`requeue`) starts them again and no prompt is lost or served twice."""
        return [g.task for g in self.cached + self.carried] + list(self.requeued)

    def requeue(self, tasks: list[Task]) -> None:
        """Start `tasks` (from scratch) before any task of the stream."""
        self.requeued += list(tasks)

    def _fill(self) -> None:
        """Start fresh groups until accepted + active reach the over-sampling target, twice the engine's slots
        are in flight and a slot's worth of samples waits in the engine's queue (a request holds its episodes
        until its last sample ends, so episodes in flight overstate the work left: the queue keeps a sample
        ready for every slot that frees; the long tail is cut by the abort, and what it generated is cached;
        groups aborted before they start carry no tokens, so they are never stale). Without the count abort
        every started group runs to its end, so only the first two conditions start groups."""
        r = self._round
        engine = self.driver.engine
        slots = getattr(engine, "max_slots", 0)
        while (self.abort_on_count or len(r.groups) < self.groups_per_batch) and (
                len(r.groups) + len(self.active) < self.target or len(self.driver.in_flight) < 2 * slots
                or self.abort_on_count and getattr(engine, "queued_samples", slots) < slots):
            task = self.requeued.pop(0) if self.requeued else next(self.tasks, None)
            if task is None:
                return
            episodes = self.driver.start([task], self.group_size)
            self._add(Group(task, episodes, [None] * len(episodes), [None] * len(episodes)))
            self.started += 1

    def _serve_cached(self) -> None:
        """Resume cached groups first: too-stale ones are dropped; finished episodes get their reward again."""
        r = self._round
        cached, self.cached = self.cached, []
        for g in cached:
            if self._stale(g):
                r.stale += 1
                r.stale_groups.append(g)
                for e in g.episodes:
                    self._group_of.pop(id(e), None)
                continue
            r.resumed += 1
            self.active.append(g)
            self.driver.resume([e for e in g.episodes if not e.done])
            for i, e in enumerate(g.episodes):
                if e.done and g.scores[i] is None:
                    self._score(g, i)

    def _stale(self, group: Group) -> bool:
        """More than `max_off_policy_steps` weight versions behind (by its oldest generated token)."""
        oldest = group.oldest_version()
        return oldest is not None and oldest < self.version - self.max_off_policy_steps

    def _add(self, group: Group) -> None:
        self.active.append(group)
        for e in group.episodes:
            self._group_of[id(e)] = group

    # ------------------------------------------------------------------ rewards
    def _episode_done(self, episode: Episode) -> None:
        """The driver's on_episode: the reward starts now."""
        group = self._group_of.get(id(episode))
        if group is None:
            return
        r = self._round
        at = self.clock() - self._t0
        r.ended += 1
        r.last_generation_at = at
        if r.first_reward_at is None:
            r.first_reward_at = at
        self._score(group, next(i for i, e in enumerate(group.episodes) if e is episode))

    def _score(self, group: Group, i: int) -> None:
        future = self.worker.submit(group.task, group.episodes[i].response)
        group.futures[i] = future

    def _collect(self) -> None:
        """Move finished rewards into their groups, and complete groups out of `active`."""
        r = self._round
        for g in list(self.active):
            for i, f in enumerate(g.futures):
                if f is not None and g.scores[i] is None and f.done():
                    g.scores[i] = f.result()
            if not g.complete:
                continue
            self.active.remove(g)
            for e in g.episodes:
                self._group_of.pop(id(e), None)
            if self.filter_equal and len(set(g.rewards)) == 1:
                r.filtered += 1
                r.filtered_groups.append(g)
            else:
                r.groups.append(g)

    # ------------------------------------------------------------------ abort
    def _abort_active(self) -> None:
        """Abort every active group: stop its generation (partials kept), cancel its pending rewards, cache it."""
        r = self._round
        self.driver.abort([e for g in self.active for e in g.episodes if not e.done])
        for g in self.active:
            for i, f in enumerate(g.futures):
                if f is not None and g.scores[i] is None:
                    if f.done() and not f.cancelled():
                        g.scores[i] = f.result()
                    else:
                        f.cancel()
                        g.futures[i] = None
                        r.cancelled_rewards += 1
            r.aborted += 1
            self.cached.append(g)
        self.active = []
