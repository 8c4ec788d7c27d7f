"""What the RL gym, the task families and the reward system hand each other (host-side, plain Python).

  Task    one prompt of a task family: its `data_source` tag, the user's text and images, the reference
          the verifiers read, and how many turns (and which on-image tools) the episode may use
  Score   a reward with its components (one per verifier or judge) and flags ("timeout", "fallback",
          "format", "error") that say why a component is not a real verdict

A rule verifier is a module-level function `fn(response: str, reference: Mapping[str, Any]) -> float`
(in [0, 1]; picklable, so it runs in a process pool); `response` is the text of the episode's final
answer, stop tokens removed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

Verifier = Callable[[str, Mapping[str, Any]], float]

FLAGS = ("timeout", "fallback", "format", "error")  # why a component is not a real verdict


@dataclasses.dataclass(frozen=True)
class Task:
    """One prompt. `images`: encoded images (PNG bytes) shown before `prompt`, in order; `reference`: what
    the source's verifiers read (e.g. {"answer": "3"}, {"boxes": [[x1, y1, x2, y2]]}); `reward`: a
    per-sample override of the source's reward spec (a registry key), None for the source's own;
    `max_turns` 1 is a single-step task; `tools`: the on-image tools the episode may call."""

    uid: str
    data_source: str
    prompt: str
    images: tuple[bytes, ...] = ()
    reference: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reward: str | None = None
    max_turns: int = 1
    tools: tuple[str, ...] = ()
    system: str = ""


@dataclasses.dataclass(frozen=True)
class Score:
    """A reward: `value`, each component's value by name, and the flags raised while computing them."""

    value: float
    components: Mapping[str, float] = dataclasses.field(default_factory=dict)
    flags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Component:
    """One term of a reward: a rule verifier (`verifier`, a name in `rl.verifiers.VERIFIERS`) or a
    model-based judge (`judge`, a rubric name in `rl.judge`), its value under `name` in `Score.components`."""

    name: str
    verifier: str = ""
    judge: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if bool(self.verifier) == bool(self.judge):
            raise ValueError(f"Component {self.name!r}: give exactly one of verifier= or judge=")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """How a data source is scored: its components and how they combine (`rl.rewards.AGGREGATORS`:
    "weighted_sum", "product", "gate" (the `gate` component, 0 or 1, times the weighted sum of the
    others: format gate x accuracy), "min")."""

    components: tuple[Component, ...]
    aggregate: str = "weighted_sum"
    gate: str = ""
