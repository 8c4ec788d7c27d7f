"""Verifiable RL task families, their reward specs, and a weighted mixture of them.

    FAMILIES["shapes/count"].make(seed, index) -> Task     deterministic in (seed, index)
    reward_specs() -> {data_source: RewardSpec}             for the reward system
    mix = TaskMix({"shapes/count": 2, "tools/tiny_word": 1}, seed=0); mix.task(i); iter(mix)

A family's name is its `data_source` tag; its reward names rule verifiers of `rl.verifiers.VERIFIERS` by
name. The shapes families take shapes-world records (`data.shapes_world`, split "train", the user's seed,
record indices drawn from (seed, family, index), so families do not share images) and keep the SFT
prompts (`data.conversations`, `data.templates`), so an SFT checkpoint is their baseline. The chart,
table and tool families draw their own images (`rl.scenes`). The tool families ("tools/...") are
multi-step: their detail is 2-4 px at the models' patch budgets (`DESIGN_BUDGET`), so they are solvable
only after the on-image tools of `rl.tools` (coordinates in the [0, 1000] frame of the image named);
their Task names the tools, and the gym puts `rl.tools.describe_tools(task.tools)` in the system prompt.
"""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from glm5v_jax.data import shapes_world as sw
from glm5v_jax.data.conversations import GROUNDING_PROMPTS
from glm5v_jax.data.templates import OCR_PROMPT, format_boxes, grounding_targets
from glm5v_jax.errors import ConfigError
from glm5v_jax.rl import scenes
from glm5v_jax.rl.types import Component, RewardSpec, Task

DESIGN_BUDGET = dict(patch_size=16, max_patches=256)  # the tool families need a tool at (or below) this
RECORD_SPLIT = "train"
MAX_TRIES = 200  # shapes-world records tried until one has what a family asks about
LETTERS = "ABCD"
NUMBER_SUFFIX = " Answer with a number."


@dataclasses.dataclass(frozen=True)
class Family:
    """A task family: `name` is the `data_source` tag, `make(seed, index)` a deterministic Task, `weight`
    its default share of a mixture."""

    name: str
    reward: RewardSpec
    make: Callable[[int, int], Task]
    weight: float = 1.0

    @property
    def doc(self) -> str:
        return self.make.__doc__ or ""


def _rng(name: str, seed: int, index: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index, *more])


def _uid(name: str, seed: int, index: int) -> str:
    return f"{name}/{seed}/{index}"


def _record(name: str, seed: int, index: int, pick: Callable[[dict, np.random.Generator], Any]) -> tuple[dict, Any]:
    """The first shapes-world record (of indices drawn from (seed, family, index)) for which
    `pick(record, rng)` is not None, rendered and with its `index`, and that pick."""
    rng = _rng(name, seed, index)
    for _ in range(MAX_TRIES):
        i = int(rng.integers(2**31 - 1))
        choice = pick(sw.generate_image_example(seed, RECORD_SPLIT, i, encode=False), rng)
        if choice is not None:
            return dict(sw.generate_image_example(seed, RECORD_SPLIT, i), index=i), choice
    raise RuntimeError(f"{name}: no shapes-world record in {MAX_TRIES} tries has what the family needs")


def _qa_of(kind: str) -> Callable[[dict, np.random.Generator], tuple[str, str] | None]:
    """A pick: one of the record's QA pairs of `kind` (count / colour / position)."""
    def pick(record: dict, rng: np.random.Generator) -> tuple[str, str] | None:
        items = [(qa["q"], qa["a"]) for qa in json.loads(record["qa_json"]) if qa["kind"] == kind]
        return items[int(rng.integers(len(items)))] if items else None
    return pick


def _shapes_task(name: str, seed: int, index: int, record: dict, prompt: str, reference: dict) -> Task:
    """A single-step task on a shapes-world record; the reference also names the record (`record`: its
    index in split RECORD_SPLIT at `seed`), for provenance, not for the verifiers."""
    return Task(_uid(name, seed, index), name, prompt, (record["image"],), {**reference, "record": record["index"]})


# ---------------------------------------------------------------- shapes-world families

def make_count(seed: int, index: int) -> Task:
    """A counting question of the record ("How many red shapes are there?"); answer an integer."""
    name = "shapes/count"
    rec, (q, a) = _record(name, seed, index, _qa_of("count"))
    return _shapes_task(name, seed, index, rec, q, {"answer": int(a)})


def make_colour(seed: int, index: int) -> Task:
    """"What colour is the star?" (asked only when unambiguous); answer a colour name."""
    name = "shapes/colour"
    rec, (q, a) = _record(name, seed, index, _qa_of("colour"))
    return _shapes_task(name, seed, index, rec, q, {"answer": a})


def make_position(seed: int, index: int) -> Task:
    """Left-of (yes / no), which is higher (a label, with or without "the"), or a region ("top left")."""
    name = "shapes/position"
    rec, (q, a) = _record(name, seed, index, _qa_of("position"))
    answers = [a, a[4:]] if a.startswith("the ") else [a]
    return _shapes_task(name, seed, index, rec, q, {"answer": a, "answers": answers})


def make_grounding(seed: int, index: int) -> Task:
    """"Locate every red circle in the image."; reference: all boxes of that label."""
    name = "shapes/grounding"

    def pick(rec, rng):
        labels = sorted(grounding_targets(rec))
        return labels[int(rng.integers(len(labels)))], GROUNDING_PROMPTS[int(rng.integers(len(GROUNDING_PROMPTS)))]
    rec, (label, prompt) = _record(name, seed, index, pick)
    return _shapes_task(name, seed, index, rec, prompt.format(label=label), {"boxes": grounding_targets(rec)[label]})


def make_pointing(seed: int, index: int) -> Task:
    """"Point to the red circle." for a label that occurs once; reference: its box."""
    name = "shapes/pointing"

    def pick(rec, rng):
        unique = sorted(k for k, v in grounding_targets(rec).items() if len(v) == 1)
        return unique[int(rng.integers(len(unique)))] if unique else None
    rec, label = _record(name, seed, index, pick)
    prompt = f"Point to the {label}. Answer with its centre as [x,y], integers from 0 to 1000."
    return _shapes_task(name, seed, index, rec, prompt, {"boxes": grounding_targets(rec)[label]})


def make_ocr(seed: int, index: int) -> Task:
    """"What word is written in the image?" on records that have a word."""
    name = "shapes/ocr"
    rec, word = _record(name, seed, index, lambda rec, rng: rec["ocr"] or None)
    return _shapes_task(name, seed, index, rec, OCR_PROMPT, {"answer": word})


def _choice_question(rec: dict, rng: np.random.Generator) -> tuple[str, str, list[str]] | None:
    """(question, correct option, pool of wrong options) about the record, or None."""
    objs = [label.split(" ") for label, boxes in grounding_targets(rec).items() for _ in boxes]  # [colour, kind]
    kinds = {k: {c for c, k2 in objs if k2 == k} for _, k in objs}
    colours = {c: {k for c2, k in objs if c2 == c} for c, _ in objs}
    n_kind = {k: sum(k2 == k for _, k2 in objs) for _, k in objs}
    n_colour = {c: sum(c2 == c for c2, _ in objs) for c, _ in objs}
    cands = [("How many shapes are there?", str(len(objs)), [str(n) for n in range(1, 10) if n != len(objs)])]
    cands += [(f"What colour is the {k}?", next(iter(cs)), [c for c in sw.COLOURS if c not in cs])
              for k, cs in sorted(kinds.items()) if n_kind[k] == 1]
    cands += [(f"What shape is the {c} object?", next(iter(ks)), [k for k in sw.SHAPES if k not in ks])
              for c, ks in sorted(colours.items()) if n_colour[c] == 1]
    if rec["ocr"]:
        cands.append(("Which word is written in the image?", rec["ocr"], [w for w in sw.WORDS if w != rec["ocr"]]))
    return cands[int(rng.integers(len(cands)))]


def make_choice(seed: int, index: int) -> Task:
    """A multiple-choice question (count, colour, shape or word) with options A-D, one correct."""
    name = "shapes/choice"
    rec, (q, right, wrong) = _record(name, seed, index, _choice_question)
    rng = _rng(name, seed, index, 1)
    options = [right] + [str(wrong[i]) for i in rng.choice(len(wrong), 3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    prompt = f"{q}\n{lines}\nAnswer with the letter of the correct option."
    return _shapes_task(name, seed, index, rec, prompt, {"answer": LETTERS[options.index(right)], "options": options})


# ---------------------------------------------------------------- charts and tables

def make_bar(seed: int, index: int) -> Task:
    """A bar chart: one bar's value, or how much one bar exceeds another; answer a number."""
    name = "charts/bar"
    rng = _rng(name, seed, index)
    png, info = scenes.bar_chart_scene(rng)
    labels, values = info["labels"], info["values"]
    i, j = (int(v) for v in rng.choice(len(labels), 2, replace=False))
    if values[i] != values[j] and rng.random() < 0.3:
        hi, lo = (i, j) if values[i] > values[j] else (j, i)
        q, answer = f"How much greater is the value of {labels[hi]} than that of {labels[lo]}?", values[hi] - values[lo]
    else:
        q, answer = f"What is the value of the bar labelled {labels[i]}?", values[i]
    return Task(_uid(name, seed, index), name, q + NUMBER_SUFFIX, (png,), {"answer": answer})


def make_table(seed: int, index: int) -> Task:
    """A table: one cell, or a column's total; answer a number."""
    name = "charts/table"
    rng = _rng(name, seed, index)
    png, info = scenes.table_scene(rng)
    col = info["columns"][int(rng.integers(len(info["columns"])))]
    if rng.random() < 0.25:
        q, answer = f"In the table, what is the total {col} of all items?", sum(r[col] for r in info["cells"].values())
    else:
        row = info["rows"][int(rng.integers(len(info["rows"])))]
        q, answer = f"In the table, what is the {col} of {row}?", info["cells"][row][col]
    return Task(_uid(name, seed, index), name, q + NUMBER_SUFFIX, (png,), {"answer": answer})


# ---------------------------------------------------------------- multi-step families (need a tool)

def make_tiny_word(seed: int, index: int) -> Task:
    """A word in 13-16 px type on a small white sign in a large image: read it after cropping."""
    name, tools = "tools/tiny_word", ("crop",)
    png, info = scenes.tiny_word_scene(_rng(name, seed, index))
    prompt = ("What word is written on the small white sign? It is too small to read at this size: zoom in "
              "with the crop tool first. Answer with the word only.")
    return Task(_uid(name, seed, index), name, prompt, (png,),
                {"answer": info["word"], "word_box": info["word_box"], "sign_box": info["sign_box"]},
                max_turns=3, tools=tools)


def make_zoom_count(seed: int, index: int) -> Task:
    """Count the small shapes of one colour inside a region given as a box: crop the region, then count."""
    name, tools = "tools/zoom_count", ("crop",)
    png, info = scenes.zoom_count_scene(_rng(name, seed, index))
    box = "[" + ",".join(str(v) for v in info["region"]) + "]"
    prompt = (f"How many {info['colour']} shapes are inside the region {box} (x1,y1,x2,y2 from 0 to 1000)? "
              "The shapes are small: crop the region to count them. Answer with a number.")
    return Task(_uid(name, seed, index), name, prompt, (png,), {"answer": info["count"], "region": info["region"]},
                max_turns=3, tools=tools)


def make_find_small(seed: int, index: int) -> Task:
    """Ground one small shape among 20-40 look-alikes: crop to find it, optionally check with draw_boxes,
    answer its box in the first image's frame."""
    name, tools = "tools/find_small", ("crop", "draw_boxes")
    png, info = scenes.find_small_scene(_rng(name, seed, index))
    prompt = (f"Locate the {info['label']} in the image. The shapes are small: zoom in with crop, and you may "
              "check a box with draw_boxes. Answer with its box [x1,y1,x2,y2] in the first image's 0-1000 frame.")
    return Task(_uid(name, seed, index), name, prompt, (png,), {"boxes": [info["box"]]},
                max_turns=4, tools=tools)


# ---------------------------------------------------------------- the registry and the mixture

def _one(verifier: str) -> RewardSpec:
    return RewardSpec((Component("accuracy", verifier=verifier),))


GATED_IOU = RewardSpec((Component("format", verifier="box_format"), Component("iou", verifier="grounding_iou")),
                       aggregate="gate", gate="format")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("shapes/count", _one("count"), make_count),
    Family("shapes/colour", _one("exact"), make_colour),
    Family("shapes/position", _one("exact"), make_position),
    Family("shapes/grounding", GATED_IOU, make_grounding),
    Family("shapes/pointing", _one("point_in_box"), make_pointing),
    Family("shapes/ocr", _one("anls"), make_ocr),
    Family("shapes/choice", _one("choice"), make_choice),
    Family("charts/bar", _one("relaxed_number"), make_bar),
    Family("charts/table", _one("relaxed_number"), make_table),
    Family("tools/tiny_word", _one("anls"), make_tiny_word),
    Family("tools/zoom_count", _one("count"), make_zoom_count),
    Family("tools/find_small", GATED_IOU, make_find_small),
)}


def reward_specs(judge_rubric: str = "", judge_weight: float = 0.0) -> dict[str, RewardSpec]:
    """data_source -> its RewardSpec, for every family; with `judge_rubric` (a `rl.judge.RUBRICS` name) and
    `judge_weight` > 0, each spec gains a model-judged component "judge" of that weight (inside a gate's
    weighted part), scored by the reward system's judge client."""
    specs = {name: f.reward for name, f in FAMILIES.items()}
    if judge_rubric and judge_weight > 0:
        extra = Component("judge", judge=judge_rubric, weight=float(judge_weight))
        specs = {k: dataclasses.replace(s, components=s.components + (extra,)) for k, s in specs.items()}
    return specs


class TaskMix:
    """Tasks drawn from families by weight: `task(index)` picks a family from (seed, index) and returns its
    task (seed, index), so a mixture is deterministic, indexable in any order, and its uids are unique.
    `families`: name -> weight (0 leaves a family out); None: every family at its default weight."""

    def __init__(self, families: Mapping[str, float] | None = None, seed: int = 0):
        weights = {n: f.weight for n, f in FAMILIES.items()} if families is None else dict(families)
        unknown = sorted(set(weights) - set(FAMILIES))
        if unknown:
            raise ConfigError("families", f"unknown task families {unknown}; known: {', '.join(FAMILIES)}")
        bad = {n: w for n, w in weights.items() if not (math.isfinite(float(w)) and w >= 0)}
        if bad:
            raise ConfigError("families", f"weights must be finite and >= 0, got {bad}")
        self.names = tuple(sorted(n for n, w in weights.items() if w > 0))
        if not self.names:
            raise ConfigError("families", "every weight is 0: no family to draw from")
        w = np.array([float(weights[n]) for n in self.names])
        self.weights = dict(zip(self.names, (w / w.sum()).tolist()))
        self._cum = np.cumsum(w / w.sum())
        self.seed = seed

    def family(self, index: int) -> str:
        u = np.random.default_rng([self.seed, zlib.crc32(b"TaskMix"), index]).random()
        return self.names[min(int(np.searchsorted(self._cum, u, side="right")), len(self.names) - 1)]

    def task(self, index: int) -> Task:
        return FAMILIES[self.family(index)].make(self.seed, index)

    def __iter__(self) -> Iterator[Task]:
        index = 0
        while True:
            yield self.task(index)
            index += 1


# ---------------------------------------------------------------- gold answers (SFT on the families' formats)

def _number(x: Any) -> str:
    return str(int(x)) if float(x) == int(x) else f"{float(x):g}"


def _centre(box: Sequence[int]) -> str:
    return f"[{(box[0] + box[2]) // 2},{(box[1] + box[3]) // 2}]"


GOLD: dict[str, Callable[[Mapping[str, Any]], str]] = {  # family -> reference -> an answer scoring 1
    "shapes/count": lambda r: str(r["answer"]),
    "shapes/colour": lambda r: str(r["answer"]),
    "shapes/position": lambda r: str(r["answer"]),
    "shapes/grounding": lambda r: format_boxes(r["boxes"]),
    "shapes/pointing": lambda r: _centre(r["boxes"][0]),
    "shapes/ocr": lambda r: str(r["answer"]),
    "shapes/choice": lambda r: str(r["answer"]),
    "charts/bar": lambda r: _number(r["answer"]),
    "charts/table": lambda r: _number(r["answer"]),
}
SFT_FAMILIES = ("shapes/pointing", "shapes/choice", "charts/bar", "charts/table")  # formats SFT has not shown


def gold_answer(task: Task) -> str:
    """A correct answer to a single-turn task, in its family's answer format. KeyError for the tool
    families (their answers need tool calls first)."""
    return GOLD[task.data_source](task.reference)


class GoldRecords:
    """Tasks of `families` (seed, index) as SFT records in the shapes-world layout: the task's image and one
    QA item (its prompt, `gold_answer`), for a random-access data source (`data.source_registry` kind
    "rl_tasks"), so SFT can show the answer formats RL will reward."""

    def __init__(self, families: Sequence[str], seed: int, size: int):
        unknown = [f for f in families if f not in GOLD]
        if unknown:
            raise ConfigError("families", f"{unknown} have no gold answers; families with them: {sorted(GOLD)}")
        self.mix, self.size = TaskMix({f: 1.0 for f in families}, seed=seed), int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        task = self.mix.task(int(index))
        return {"id": task.uid, "image": task.images[0],
                "qa_json": json.dumps([{"q": task.prompt, "a": gold_answer(task), "kind": "rl"}])}


class TaskStream:
    """A `TaskMix` read in order from `position`, remembering each task's index by uid, so that a run can
    checkpoint where it is (the position, and the indices of the tasks it holds) and start again there."""

    def __init__(self, mix: TaskMix, position: int = 0):
        self.mix, self.position = mix, int(position)
        self._index: dict[str, int] = {}

    def __iter__(self) -> Iterator[Task]:
        return self

    def __next__(self) -> Task:
        task = self.mix.task(self.position)
        self._index[task.uid] = self.position
        self.position += 1
        return task

    def task(self, index: int) -> Task:
        """The task at `index` (remembered like a streamed one)."""
        task = self.mix.task(index)
        self._index[task.uid] = index
        return task

    def index_of(self, task: Task) -> int:
        """The index of a task this stream produced. KeyError for another."""
        return self._index[task.uid]
