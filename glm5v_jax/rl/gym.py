"""The VLM RL gym: one environment protocol for single-step and multi-step tasks.

    env = make_env(task)
    messages = env.reset(task)              # the first turn: chat messages (text and image parts)
    messages, done, info = env.step(text)   # the model's answer -> the next observation, or done

Observations are chat messages (`generate.chat`: roles system / user / observation, content of text
parts and `{"type": "image", "image": png_bytes}` parts), so a tool's new image joins the conversation
like any other and the rollout driver (`rl.rollout`) renders every turn with one template. A single-step
task is an environment that is done after the first answer; a tool task parses the answer for a tool
call (`rl.tools`) and answers it with an observation until the model answers without one or the turns
run out. Environments know nothing of tokens: the driver keeps the engine's tokens.
"""
from __future__ import annotations

from typing import Any, Protocol

from glm5v_jax.rl import tools
from glm5v_jax.rl.types import Task

Messages = list[dict[str, Any]]


class Env(Protocol):
    """reset(task) -> the first messages; step(the model's answer text) -> (next messages or None, done, info)."""

    def reset(self, task: Task) -> Messages: ...

    def step(self, text: str) -> tuple[Messages | None, bool, dict[str, Any]]: ...


def first_messages(task: Task, system: str = "") -> Messages:
    """The task's opening turn: an optional system message, then the user's images and prompt."""
    system = "\n\n".join(s for s in (task.system, system) if s)
    content = [{"type": "image", "image": image} for image in task.images] + [{"type": "text", "text": task.prompt}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


class SingleTurnEnv:
    """One question, one answer."""

    def reset(self, task: Task) -> Messages:
        self.task = task
        return first_messages(task)

    def step(self, text: str) -> tuple[Messages | None, bool, dict[str, Any]]:
        return None, True, {"turns": 1}


class ToolEnv:
    """Answers with on-image tools: each answer that holds a tool call gets the tool's result (text and
    any new image) as an observation, until an answer holds no call (the final answer) or `max_turns`
    answers have been given (then the episode ends, `info["truncated"]`). A malformed call is an
    observation saying what was wrong."""

    def reset(self, task: Task) -> Messages:
        unknown = [t for t in task.tools if t not in tools.TOOLS]
        if unknown:
            raise ValueError(f"task {task.uid}: tools {unknown} are not in rl.tools.TOOLS ({sorted(tools.TOOLS)})")
        self.task, self.turns = task, 0
        self.images = list(task.images)  # every image of the conversation, in order (tool calls index them)
        self.calls = self.errors = 0
        return first_messages(task, tools.describe_tools(task.tools))

    def step(self, text: str) -> tuple[Messages | None, bool, dict[str, Any]]:
        self.turns += 1
        result = tools.call_tools(text, self.images, self.task.tools)
        info = {"turns": self.turns, "tool_calls": self.calls, "tool_errors": self.errors}
        if result is None:
            return None, True, info
        if self.turns >= self.task.max_turns:
            return None, True, {**info, "truncated": "max_turns"}
        self.calls += 1
        self.errors += result.error is not None
        self.images += result.images
        content = [{"type": "image", "image": image} for image in result.images]
        content.append({"type": "text", "text": result.text})
        info.update(tool_calls=self.calls, tool_errors=self.errors)
        return [{"role": "observation", "content": content}], False, info


def make_env(task: Task) -> Env:
    """The environment a task needs: tools or more than one turn -> ToolEnv, else SingleTurnEnv."""
    return ToolEnv() if task.tools or task.max_turns > 1 else SingleTurnEnv()
