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
    expert_ids (an engine with record_routing): the routed experts `[L_moe, top_k]` of every token the
               engine fed, from position 0 (the last sampled token is never fed): for routing replay

so the trainer's log-probabilities of `tokens` at the masked positions are the rollout's `logp_raw`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from glm5v_jax.generate.chat import chat_stops, render_messages
from glm5v_jax.generate.requests import IMAGE_KEYS, Request, Sample, Sampling
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
    expert_ids: list[np.ndarray] = dataclasses.field(default_factory=list)  # per fed token: `[L_moe, top_k]`
    done: bool = False  # ended (not merely aborted: an aborted episode may be resumed)

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
    """An episode on the engine: its environment, request id, how much of its sample is booked, and the
    tokens of the turn being answered (a turn interrupted by an abort goes on when resumed)."""

    def __init__(self, episode: Episode, env: Env):
        self.episode, self.env = episode, env
        self.rid, self.held = -1, episode.task.max_turns > 1
        self.booked = 0  # generated tokens of the engine's current sample already in the episode
        self.turn: list[int] = []  # this turn's answer tokens so far


class RolloutDriver:
    """Runs tasks' environments against `engine` (an `Engine` with the model `tokenizer` belongs to).

    `run(tasks, n)` returns when every episode has ended. The same in steps, for a controller that
    overlaps rewards with generation: `start(tasks, n)`, then `step()` (one engine step; returns the
    episodes that ended, after calling `on_episode` for each), `abort(episodes)` (their partial answers
    booked, finish "abort", pages freed) and `resume(episodes)` (they go on where they stopped: the
    conversation so far is the new request's prompt, the turn keeps what was left of its budget)."""

    def __init__(self, engine: Any, tokenizer: Any, *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 env_factory: Callable[[Task], Env] = make_env, on_episode: Callable[[Episode], None] | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.sampling, self.env_factory = max_new_tokens, sampling, env_factory
        self.on_episode = on_episode
        self.stops = chat_stops(tokenizer)
        self._live: dict[int, list[_Live]] = {}  # request id -> its episodes (a single-turn group shares one)
        self._aborted: dict[int, _Live] = {}  # id(episode) -> its state, until resumed
        self._requests = 0  # requests submitted: request r samples from stream seed + 1000 r (+ j in a group)

    @property
    def in_flight(self) -> list[Episode]:
        return [live.episode for group in self._live.values() for live in group]

    def run(self, tasks: Sequence[Task], n: int = 1) -> list[Episode]:
        """n episodes of every task, task-major; returns when all have ended."""
        episodes = self.start(tasks, n)
        while not all(e.done for e in episodes):
            if self.engine.idle:
                raise RuntimeError(f"the engine is idle with {sum(not e.done for e in episodes)} episodes unfinished")
            self.step()
        return episodes

    def start(self, tasks: Sequence[Task], n: int = 1) -> list[Episode]:
        """Submit n episodes of every task (task-major); a single-turn task's n samples are one request."""
        episodes = []
        for task in tasks:
            group = [_Live(Episode(task, j), self.env_factory(task)) for j in range(n)]
            episodes += [live.episode for live in group]
            messages = [live.env.reset(task) for live in group][0]  # each sample's own environment
            ids, images = render_messages(self.tokenizer, messages, self.engine.spec)
            for live in group:
                live.episode.prompt_length = len(ids)
                live.episode._add(ids)
                live.episode.image_slots += _slots(images)
            if task.max_turns == 1:  # one answer each: one request shares the prompt's prefill
                self._submit(group, ids, images, self.max_new_tokens)
            else:  # a held conversation is one sequence per request
                for live in group:
                    self._submit([live], ids, images, self.max_new_tokens)
        return episodes

    def step(self) -> list[Episode]:
        """One engine step; the episodes that ended in it (`on_episode` already called for each)."""
        ended = []
        for completion in self.engine.step():
            group = self._live.pop(completion.id, None)
            if group is None:  # not ours (the engine may serve others)
                continue
            for live, sample in zip(group, completion.samples):
                if self._turn_done(live, sample):
                    self._live[completion.id] = [live]
                else:
                    ended.append(live.episode)
        for episode in ended:
            episode.done = True
            if self.on_episode is not None:
                self.on_episode(episode)
        return ended

    def abort(self, episodes: Sequence[Episode] | None = None) -> list[Episode]:
        """Stop episodes now (every one in flight by default; the others of a single-turn group too): their
        partial answers are booked with finish "abort" and their pages freed. Returns them."""
        wanted = None if episodes is None else {id(e) for e in episodes}
        rids = [rid for rid, group in self._live.items()
                if wanted is None or any(id(live.episode) in wanted for live in group)]
        out = []
        for completion in self.engine.abort(rids):
            for live, sample in zip(self._live.pop(completion.id), completion.samples):
                self._book(live, sample)
                live.episode.finish = "abort"
                live.episode.info["aborts"] = live.episode.info.get("aborts", 0) + 1
                self._aborted[id(live.episode)] = live
                out.append(live.episode)
        return out

    def resume(self, episodes: Sequence[Episode]) -> None:
        """Continue aborted episodes: each is one request whose prompt is its conversation so far (images
        included), with what its turn had left of `max_new_tokens`, within the engine's max_seq_len."""
        for episode in episodes:
            live = self._aborted.pop(id(episode), None)
            if live is None:
                raise ValueError(f"episode {episode.task.uid}#{episode.index} was not aborted by this driver")
            budget = self.max_new_tokens - len(live.turn)
            if budget < 1 or len(episode.tokens) >= self.engine.capacity:  # (the engine ends such turns itself)
                episode.finish = episode.info["truncated"] = "length" if budget < 1 else "capacity"
                episode.answers.append(self._text(live.turn))
                episode.done = True
                if self.on_episode is not None:
                    self.on_episode(episode)
                continue
            episode.finish = None
            self._submit([live], episode.tokens, episode.images, budget)

    def _submit(self, group: list[_Live], ids: Sequence[int], images: dict | None, budget: int) -> None:
        seed = None if self.sampling.seed is None else self.sampling.seed + 1_000 * self._requests
        self._requests += 1
        rid = self.engine.submit(Request(ids, images, n=len(group), sampling=dataclasses.replace(self.sampling,
                                                                                                 seed=seed),
                                         max_new_tokens=budget, stop=self.stops, keep=group[0].held))
        for live in group:
            live.rid, live.booked = rid, 0
        self._live[rid] = group

    def _book(self, live: _Live, sample: Sample) -> None:
        """The sample's tokens not booked yet join the episode (loss mask 1) and the current turn."""
        new = sample.tokens[live.booked:]
        live.episode._add(new, sample=sample, start=live.booked)
        if sample.expert_ids:  # the request's prompt is the conversation from its start: positions 0, 1, ...
            live.episode.expert_ids = sample.expert_ids
        live.booked = len(sample.tokens)
        live.turn += new

    def _text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.stops])

    def _turn_done(self, live: _Live, sample: Sample) -> bool:
        """Book a finished turn; True when the (held) episode goes on with an observation. A single-turn
        task ends after its answer whatever its environment says."""
        episode = live.episode
        self._book(live, sample)
        episode.answers.append(self._text(live.turn))
        live.turn = []
        episode.finish = sample.finish
        if sample.finish == "capacity":
            messages, done, info = None, True, {"truncated": "capacity"}
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
