"""The rollout driver: environments against the generation engine, many episodes at once.

    driver = RolloutDriver(engine, tokenizer, max_new_tokens=256, sampling=Sampling(temperature=1.0))
    episodes = driver.run(tasks, n=8)      # task-major: episodes[i * n + j] is sample j of task i

Every episode's first turn is submitted at once and the engine batches them (a single-turn task's n
samples are one group: one prefill, n forks). When a turn ends, its answer text goes to the episode's
environment (`rl.gym`); an observation is rendered in the chat template and appended with
`Engine.extend` to the held cache, so earlier turns and images are never prefilled again.

The bookkeeping keeps exactly the tokens the engine saw, never re-tokenised text:

    tokens     = prompt + answer_1 + observation_1 + answer_2 + ...   (what the cache holds)
    loss_mask  = 0 on the prompt and observations, 1 on the answers' tokens (their stop token included)
    logp_raw / logp_sampled / versions: the engine's, on answer tokens; 0 / 0 / -1 elsewhere

so the trainer's log-probabilities of `tokens` at the masked positions are the rollout's `logp_raw`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from glm5v_jax.generate.chat import chat_stops, render_messages
from glm5v_jax.generate.requests import IMAGE_KEYS, Completion, Request, Sample, Sampling
from glm5v_jax.rl.gym import Env, make_env
from glm5v_jax.rl.types import Task


@dataclasses.dataclass
class Episode:
    """One sample of a task: the conversation as the engine saw it, and how it ended. `finish`: the last
    turn's engine finish ("stop", "length", "capacity") or "capacity" when an observation did not fit."""

    task: Task
    index: int  # the sample's number within its task's group
    tokens: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[bool] = dataclasses.field(default_factory=list)
    logp_raw: list[float] = dataclasses.field(default_factory=list)
    logp_sampled: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    image_slots: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    prompt_length: int = 0
    answers: list[str] = dataclasses.field(default_factory=list)  # each turn's answer text, stops removed
    finish: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def response(self) -> str:
        """The final answer's text (what the verifiers score)."""
        return self.answers[-1] if self.answers else ""

    @property
    def images(self) -> dict[str, np.ndarray] | None:
        """Every image slot of the conversation in the order of its `<|image|>` blocks, concatenated."""
        if not self.image_slots:
            return None
        return {k: np.concatenate([s[k] for s in self.image_slots]) for k in IMAGE_KEYS}

    def _add(self, tokens: Sequence[int], *, sample: Sample | None = None, start: int = 0) -> None:
        """Append context tokens (an observation), or the answer tokens `sample.tokens[start:]`."""
        self.tokens += list(tokens)
        n = len(tokens)
        if sample is None:
            self.loss_mask += [False] * n
            self.logp_raw += [0.0] * n
            self.logp_sampled += [0.0] * n
            self.versions += [-1] * n
        else:
            self.loss_mask += [True] * n
            self.logp_raw += sample.logp_raw[start:]
            self.logp_sampled += sample.logp_sampled[start:]
            self.versions += sample.versions[start:]


class _Live:
    """An episode on the engine: its environment, request id, and how much of its sample is booked."""

    def __init__(self, episode: Episode, env: Env, rid: int = -1, held: bool = False):
        self.episode, self.env, self.rid, self.held = episode, env, rid, held
        self.booked = 0  # generated tokens of the engine's sample already in the episode


class RolloutDriver:
    """Runs tasks' environments against `engine` (an `Engine` with the model `tokenizer` belongs to)."""

    def __init__(self, engine: Any, tokenizer: Any, *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 env_factory: Callable[[Task], Env] = make_env):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.sampling, self.env_factory = max_new_tokens, sampling, env_factory
        self.stops = chat_stops(tokenizer)

    def run(self, tasks: Sequence[Task], n: int = 1) -> list[Episode]:
        """n episodes of every task, task-major; returns when all have ended."""
        episodes: list[Episode] = []
        by_rid: dict[int, list[_Live]] = {}
        for i, task in enumerate(tasks):
            group = [_Live(Episode(task, j), self.env_factory(task)) for j in range(n)]
            episodes += [live.episode for live in group]
            if task.max_turns == 1:  # one answer each: a group request shares the prompt's prefill
                by_rid[self._submit(group, self._seed(i, 0))] = group
            else:  # a held conversation is one sequence per request
                for j, live in enumerate(group):
                    by_rid[self._submit([live], self._seed(i, j))] = [live]
        while by_rid:
            if self.engine.idle:
                raise RuntimeError(f"the engine is idle with {len(by_rid)} requests of this rollout unfinished")
            for completion in self.engine.step():
                group = by_rid.pop(completion.id, None)
                if group is not None and self._turn_done(group, completion):
                    by_rid[completion.id] = group
        return episodes

    def _seed(self, task: int, sample: int) -> int | None:
        """Sample j of task i draws from stream seed + 1000 i + j (a group's samples get + j from the engine);
        None lets the engine choose."""
        return None if self.sampling.seed is None else self.sampling.seed + 1_000 * task + sample

    def _submit(self, group: list[_Live], seed: int | None) -> int:
        messages = [live.env.reset(live.episode.task) for live in group]  # each sample's own environment
        ids, images = render_messages(self.tokenizer, messages[0], self.engine.spec)
        held = group[0].episode.task.max_turns > 1
        sampling = dataclasses.replace(self.sampling, seed=seed)
        rid = self.engine.submit(Request(ids, images, n=len(group), sampling=sampling,
                                         max_new_tokens=self.max_new_tokens, stop=self.stops, keep=held))
        for live in group:
            live.rid, live.held = rid, held
            live.episode.prompt_length = len(ids)
            live.episode._add(ids)
            live.episode.image_slots += _slots(images)
        return rid

    def _turn_done(self, group: list[_Live], completion: Completion) -> bool:
        """Book the turn's answers; True when the (held, single) episode continues with an observation. A
        single-turn task ends after its answer whatever its environment says."""
        for live, sample in zip(group, completion.samples):
            episode = live.episode
            new = sample.tokens[live.booked:]
            episode._add(new, sample=sample, start=live.booked)
            live.booked = len(sample.tokens)
            episode.answers.append(self.tokenizer.decode([t for t in new if t not in self.stops]))
            episode.finish = sample.finish
            if sample.finish in ("capacity", "abort"):
                messages, done, info = None, True, {"truncated": sample.finish}
            else:
                messages, done, info = live.env.step(episode.answers[-1])
            episode.info.update(info)
            if not done and live.held and self._observe(live, messages, sample):
                return True
            if live.held:
                self.engine.release(live.rid)
        return False

    def _observe(self, live: _Live, messages: list[dict], sample: Sample) -> bool:
        """Append an observation to the held conversation; False (episode over) when it does not fit."""
        episode = live.episode
        ids, images = render_messages(self.tokenizer, messages, self.engine.spec, start=False, after=sample.tokens[-1])
        if len(episode.tokens) + len(ids) >= self.engine.capacity:  # no room left to answer in max_seq_len
            episode.finish = episode.info["truncated"] = "capacity"
            return False
        self.engine.extend(live.rid, ids, images, max_new_tokens=self.max_new_tokens)
        episode._add(ids)
        episode.image_slots += _slots(images)
        return True


def _slots(images: dict[str, np.ndarray] | None) -> list[dict[str, np.ndarray]]:
    """Concatenated image slots -> one dict per slot."""
    if images is None:
        return []
    return [{k: images[k][i:i + 1] for k in IMAGE_KEYS} for i in range(len(images[IMAGE_KEYS[0]]))]
