"""SFT conversations: multi-turn chats about a dataset record, with a task tag on every answer.

One record becomes one `Conversation` (an optional system message and user/assistant
`Turn`s); `render_conversation` turns it into a GLM chat document through
`templates.chat_document`:

    [gMASK]<sop>[<|system|>\\n{system}]<|user|>\\n<|begin_of_image|><|image|> x n<|end_of_image|>{q1}
    <|assistant|>\\n{a1}<|user|>\\n{q2}<|assistant|>\\n{a2} ... <|endoftext|>

Loss mask: the answer tokens plus the token that closes each answer (the next `<|user|>`,
`<|endoftext|>` after the last), never system, user, role-opening or image tokens; the
convention of `glm5v_jax.losses.lm` (the mask is read at the target position). Next to the
mask, `task_ids` (the `TASK_IDS` entry of the answer a target belongs to, 0 elsewhere) and
`answer_ids` (1, 2, ... per answer, 0 elsewhere) let `answer_accuracy` score teacher-forced
answers per task, and `answer_prompts` cut a packed batch into generation prompts whose
generated answers `score_generated` scores per task (`GENERATED_SCORING`).

Image records (shapes world, or any record with the same fields) give turns of the families
count / colour / position (the record's QA pairs by their `kind`; other kinds are "qa"),
grounding (boxes as integers in [0, 1000] between `<|begin_of_box|>` and `<|end_of_box|>`),
ocr and caption, plus at most one "text" turn that needs no image (arithmetic on an earlier
count answer, or a question about shapes, numbers or Chinese words). Text-only records give a
continuation turn and a few text questions. Every choice is drawn from the `rng` the caller
passes (the pipeline seeds it from (seed, record id, epoch)). NumPy only: runs in data workers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, MutableMapping, NamedTuple, Sequence

import numpy as np

from glm5v_jax.data import answer_scoring
from glm5v_jax.data.shapes_world import COLOURS_ZH, CORNERS, SHAPES_ZH
from glm5v_jax.data.templates import (CAPTION_PROMPT_EN, CAPTION_PROMPT_ZH, OCR_PROMPT, SkipSample, as_str,
                                      box_answer_ids, chat_document, format_boxes, grounding_targets, qa_items)

TASKS = ("count", "colour", "position", "grounding", "ocr", "caption", "text", "qa")
TASK_IDS = {t: i + 1 for i, t in enumerate(TASKS)}  # 0 = not a target
QA_KINDS = ("count", "colour", "position")  # shapes-world QA kinds with a family of their own

SYSTEM_PROMPTS = ("You are a helpful assistant.",
                  "You are a visual assistant. Answer questions about the image briefly and exactly.")
GROUNDING_PROMPTS = ("Locate every {label} in the image.", "Give the bounding box of each {label}.")
CONTINUE_PROMPT = "Continue the text:\n{prefix}"
WRITE_PROMPT = "Write a short text."


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user question and its assistant answer; `boxes` makes it a grounding answer
    (`<|begin_of_box|>` + `format_boxes(boxes)` + `<|end_of_box|>`, `answer` its text)."""

    user: str
    answer: str
    task: str
    boxes: tuple[tuple[int, int, int, int], ...] = ()

    def __post_init__(self):
        if self.task not in TASK_IDS:
            raise ValueError(f"Turn.task {self.task!r} is not one of {TASKS}")
        if not self.user or not (self.answer or self.boxes):
            raise ValueError(f"Turn needs a question and an answer, got {self.user!r} -> {self.answer!r}")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Turns in order; `image`: the record's image opens the first user turn."""

    turns: tuple[Turn, ...]
    system: str = ""
    image: bool = True


class SFTDocument(NamedTuple):
    tokens: np.ndarray      # int32 [L]
    loss_mask: np.ndarray   # bool [L]
    task_ids: np.ndarray    # int32 [L]: TASK_IDS of the answer a target belongs to, 0 elsewhere
    answer_ids: np.ndarray  # int32 [L]: 1-based number of that answer in the document, 0 elsewhere


# ----------------------------------------------------------------------------- generation


def _text_question(rng: np.random.Generator) -> Turn:
    kind = int(rng.integers(4))
    a, b = (int(v) for v in rng.integers(0, 10, 2))
    if kind == 0:
        return Turn(f"What is {a} plus {b}?", str(a + b), "text")
    if kind == 1:
        return Turn(f"What is {a} times {b}?", str(a * b), "text")
    if kind == 2:
        shape = str(rng.choice(sorted(CORNERS)))
        return Turn(f"How many corners does a {shape} have?", str(CORNERS[shape]), "text")
    if rng.random() < 0.5:
        colour = str(rng.choice(sorted(COLOURS_ZH)))
        return Turn(f"What is the Chinese word for {colour}?", COLOURS_ZH[colour], "text")
    shape = str(rng.choice(sorted(SHAPES_ZH)))
    return Turn(f"How do you say {shape} in Chinese?", SHAPES_ZH[shape], "text")


def _follow_up(previous: list[Turn], rng: np.random.Generator) -> Turn:
    """A turn without the image: arithmetic on the last count answer, or a text question."""
    counts = [t for t in previous if t.task == "count" and t.answer.isdigit()]
    if counts and rng.random() < 0.5:
        m = int(rng.integers(1, 5))
        return Turn(f"If I added {m} more, how many would there be?", str(int(counts[-1].answer) + m), "text")
    return _text_question(rng)


def image_turns(record: Mapping[str, Any], rng: np.random.Generator, *, zh_caption_prob: float = 0.3,
                stats: MutableMapping[str, int] | None = None) -> dict[str, list[Turn]]:
    """family -> the turns this image record can give, in TASKS order (families without data left out)."""
    pools: dict[str, list[Turn]] = {}
    for q, a, kind in qa_items(record, stats):
        family = kind if kind in QA_KINDS else "qa"
        pools.setdefault(family, []).append(Turn(q, a, family))
    for label, boxes in grounding_targets(record).items():
        prompt = GROUNDING_PROMPTS[int(rng.integers(len(GROUNDING_PROMPTS)))].format(label=label)
        pools.setdefault("grounding", []).append(
            Turn(prompt, format_boxes(boxes), "grounding", boxes=tuple(tuple(b) for b in boxes)))
    ocr = as_str(record.get("ocr")).strip()
    if ocr:
        pools["ocr"] = [Turn(OCR_PROMPT, ocr, "ocr")]
    en, zh = as_str(record.get("caption_en")).strip(), as_str(record.get("caption_zh")).strip()
    if en or zh:
        use_zh = bool(zh) and (not en or rng.random() < zh_caption_prob)
        prompt, caption = (CAPTION_PROMPT_ZH, zh) if use_zh else (CAPTION_PROMPT_EN, en)
        pools["caption"] = [Turn(prompt, caption, "caption")]
    elif stats is not None:
        stats["dropped/empty_caption"] = stats.get("dropped/empty_caption", 0) + 1
    return {t: pools[t] for t in TASKS if t in pools}


def _system(rng: np.random.Generator, system_prob: float) -> str:
    return SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))] if rng.random() < system_prob else ""


def image_conversation(record: Mapping[str, Any], rng: np.random.Generator, *, min_turns: int = 2,
                       max_turns: int = 5, system_prob: float = 0.5, text_turn_prob: float = 0.5,
                       zh_caption_prob: float = 0.3, stats: MutableMapping[str, int] | None = None,
                       tasks: Sequence[str] = ()) -> Conversation:
    """A conversation of min_turns..max_turns turns about an image record (fewer when it has
    less data): families in a random order, one turn each before any repeats, and with
    probability `text_turn_prob` one text turn somewhere after the first. `tasks` (non-empty): only
    turns of those TASKS (a text turn only with "text").
    Raises SkipSample("skipped/empty_text") when the record has nothing to ask about, and
    SkipSample("skipped/task_filter") when it has nothing of `tasks`."""
    pools = image_turns(record, rng, zh_caption_prob=zh_caption_prob, stats=stats)
    if not pools:
        raise SkipSample("skipped/empty_text", "image record without a usable caption, QA, box or OCR word")
    if tasks:
        pools = {t: p for t, p in pools.items() if t in tasks}
        if not pools:
            raise SkipSample("skipped/task_filter", f"image record without a turn of the tasks {list(tasks)}")
    n = int(rng.integers(min_turns, max_turns + 1))
    n_text = int(n >= 2 and rng.random() < text_turn_prob and (not tasks or "text" in tasks))
    families = list(pools)
    order = [families[i] for i in rng.permutation(len(families))]
    for f in order:
        pools[f] = [pools[f][i] for i in rng.permutation(len(pools[f]))]
    turns: list[Turn] = []
    used = dict.fromkeys(order, 0)
    step = 0
    while len(turns) < n - n_text and any(used[f] < len(pools[f]) for f in order):
        f = order[step % len(order)]
        step += 1
        if used[f] < len(pools[f]):
            turns.append(pools[f][used[f]])
            used[f] += 1
    if n_text:
        at = int(rng.integers(1, len(turns) + 1))
        turns.insert(at, _follow_up(turns[:at], rng))
    return Conversation(tuple(turns), system=_system(rng, system_prob), image=True)


def _continuation(text: str) -> Turn:
    mid = len(text) // 2
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    if spaces:
        cut = min(spaces, key=lambda i: abs(i - mid))
        prefix, rest = text[:cut], text[cut + 1:]
    else:
        prefix, rest = text[:mid], text[mid:]
    if not prefix.strip() or not rest.strip():
        return Turn(WRITE_PROMPT, text, "text")
    return Turn(CONTINUE_PROMPT.format(prefix=prefix), rest, "text")


def text_conversation(record: Mapping[str, Any], rng: np.random.Generator, *, min_turns: int = 2,
                      max_turns: int = 5, system_prob: float = 0.5) -> Conversation:
    """A text-only record: continue its text (the second half after the first), then text questions.
    Raises SkipSample("skipped/empty_text") for an empty text."""
    text = as_str(record.get("text")).strip()
    if not text:
        raise SkipSample("skipped/empty_text", "text-only record with empty text")
    n = int(rng.integers(min_turns, max_turns + 1))
    turns = [_continuation(text)] + [_text_question(rng) for _ in range(n - 1)]
    return Conversation(tuple(turns), system=_system(rng, system_prob), image=False)


def make_conversation(record: Mapping[str, Any], rng: np.random.Generator, *, image: bool, min_turns: int = 2,
                      max_turns: int = 5, system_prob: float = 0.5, text_turn_prob: float = 0.5,
                      zh_caption_prob: float = 0.3, stats: MutableMapping[str, int] | None = None,
                      tasks: Sequence[str] = ()) -> Conversation:
    """`image_conversation` for an image record, `text_conversation` for a text-only one; `tasks`
    (non-empty): only turns of those TASKS (a text-only record needs "text": SkipSample otherwise)."""
    if min_turns < 1 or max_turns < min_turns:
        raise ValueError(f"need 1 <= min_turns ({min_turns}) <= max_turns ({max_turns})")
    if image:
        return image_conversation(record, rng, min_turns=min_turns, max_turns=max_turns, system_prob=system_prob,
                                  text_turn_prob=text_turn_prob, zh_caption_prob=zh_caption_prob, stats=stats,
                                  tasks=tasks)
    if tasks and "text" not in tasks:
        raise SkipSample("skipped/task_filter", f"text-only record, and the tasks {list(tasks)} have no 'text'")
    return text_conversation(record, rng, min_turns=min_turns, max_turns=max_turns, system_prob=system_prob)


# ----------------------------------------------------------------------------- rendering


def render_conversation(conv: Conversation, tokenizer, *, n_image_tokens: int | None = None) -> SFTDocument:
    """The GLM chat document of `conv` (see the module docstring).

    n_image_tokens: merged image tokens of the record's image, (gh/merge) * (gw/merge); required
      (positive) when `conv.image`, None otherwise.
    """
    tok = tokenizer
    if conv.image and not (n_image_tokens and n_image_tokens > 0):
        raise ValueError(f"an image conversation needs n_image_tokens > 0, got {n_image_tokens}")
    if not conv.image and n_image_tokens:
        raise ValueError(f"a text-only conversation takes no image tokens, got {n_image_tokens}")
    turns = [(t.user, box_answer_ids(tok, [list(b) for b in t.boxes]) if t.boxes else tok.encode(t.answer))
             for t in conv.turns]
    ids, mask, answers = chat_document(tok, turns, n_image_tokens=n_image_tokens, system=conv.system)
    lut = np.asarray([0] + [TASK_IDS[t.task] for t in conv.turns], np.int32)
    return SFTDocument(ids, mask, lut[answers], answers)


# ----------------------------------------------------------------------------- evaluation


def answer_accuracy(predictions: Any, batch: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Teacher-forced answer accuracy: task -> (answers all right, answers), for every task
    in TASKS and "all"; sums, so that batches (and hosts) add up (`add_counts`).

    predictions: [B, S] predicted ids, where entry i is the prediction for token i+1 (the
      argmax of the main head at i, as in `losses.lm`), or logits [B, S, V] (argmax taken).
    batch: tokens, task_ids, answer_ids [B, S] (and segment_ids, if present, to tell apart
      answers numbered per document). An answer is right when every one of its target tokens
      (answer tokens and closing token) is predicted exactly.
    """
    preds = np.asarray(predictions)
    if preds.ndim == 3:
        preds = preds.argmax(-1)
    tokens, tasks, answers = (np.asarray(batch[k]) for k in ("tokens", "task_ids", "answer_ids"))
    if not preds.shape == tokens.shape == tasks.shape == answers.shape:
        raise ValueError(f"predictions {preds.shape}, tokens {tokens.shape}, task_ids {tasks.shape} and "
                         f"answer_ids {answers.shape} must all be [B, S]")
    hit = np.zeros(tokens.shape, bool)
    hit[:, 1:] = preds[:, :-1] == tokens[:, 1:]  # a target at position 0 has no prediction: wrong
    rows, cols = np.nonzero(answers > 0)
    seg = np.asarray(batch["segment_ids"])[rows, cols] if "segment_ids" in batch else np.zeros_like(rows)
    keys = np.stack([rows, seg, answers[rows, cols]], axis=1)
    out = {t: (0, 0) for t in (*TASKS, "all")}
    if not len(keys):
        return out
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    right = np.ones(len(uniq), bool)
    np.logical_and.at(right, inv, hit[rows, cols])
    task = np.zeros(len(uniq), np.int64)
    task[inv] = tasks[rows, cols]
    for name, tid in TASK_IDS.items():
        sel = task == tid
        out[name] = (int(right[sel].sum()), int(sel.sum()))
    out["all"] = (int(right.sum()), len(uniq))
    return out


def add_counts(a: Mapping[str, tuple[int, int]], b: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Sum of two `answer_accuracy` results."""
    return {k: (a.get(k, (0, 0))[0] + b.get(k, (0, 0))[0], a.get(k, (0, 0))[1] + b.get(k, (0, 0))[1])
            for k in {**a, **b}}


def accuracy_metrics(counts: Mapping[str, tuple[int, int]], prefix: str = "answer_acc/") -> dict[str, float]:
    """{prefix + task: accuracy} for the tasks with at least one answer."""
    return {prefix + k: c / n for k, (c, n) in counts.items() if n}


# ----------------------------------------------------------------------------- generated answers

# How a generated answer is scored, per task (`score_generated`): "exact" (exact match after whitespace
# normalisation), "boxes" (the boxes parse, and pair off one-to-one with the reference boxes at IoU >= 0.5:
# `answer_scoring.boxes_match`) or "text" (exact match, and the edit-distance similarity
# `answer_scoring.text_similarity`). Caption and text answers (free text, document continuations) are not
# generated: no rule scores them.
GENERATED_SCORING = {"count": "exact", "colour": "exact", "position": "exact", "qa": "exact",
                     "grounding": "boxes", "ocr": "text"}


class AnswerPrompt(NamedTuple):
    """One complete answer of a packed SFT batch, as a generation prompt and its reference."""

    task: str
    prompt: np.ndarray  # int32 [L]: its conversation up to the answer (`...<|assistant|>\n`), earlier answers in
    reference: np.ndarray  # int32 [K]: the answer's tokens, without the token that closes it
    image_slots: tuple[int, ...]  # the batch's image slots of the prompt's image blocks, in order


def answer_prompts(batch: Mapping[str, Any], *, begin_image_id: int,
                   closing_ids: Sequence[int]) -> list[AnswerPrompt]:
    """Every answer of an SFT batch (`glm5v_jax.data.pipeline`, document_kind "sft") whose closing token
    (`closing_ids`: `<|user|>`, `<|endoftext|>`) is in the row (a document cut at seq_len loses its last
    answers), row by row in order. The prompt is the answer's document from its first token (so the
    chat template and the earlier turns with their reference answers, as in training) to the answer's
    first token; its image blocks are the row's image slots in order of appearance (row b owns slots
    b*M .. b*M+M-1)."""
    tokens, segments, tasks, answers = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "task_ids",
                                                                        "answer_ids"))
    rows = tokens.shape[0]
    slots_per_row = len(np.asarray(batch["image_valid"])) // rows if "image_valid" in batch else 0
    names = {tid: name for name, tid in TASK_IDS.items()}
    closing = np.asarray(list(closing_ids))
    out = []
    for r in range(rows):
        blocks = np.flatnonzero(tokens[r] == begin_image_id)  # the j-th block's image is in slot r*M + j
        for k in range(1, int(answers[r].max(initial=0)) + 1):
            at = np.flatnonzero(answers[r] == k)
            if len(at) < 2 or not np.isin(tokens[r, at[-1]], closing):
                continue
            start = int(np.argmax(segments[r] == segments[r, at[0]]))
            images = tuple(r * slots_per_row + j for j in np.flatnonzero((blocks >= start) & (blocks < at[0])))
            out.append(AnswerPrompt(names[int(tasks[r, at[0]])], tokens[r, start:at[0]].copy(),
                                    tokens[r, at[:-1]].copy(), images))
    return out


def score_generated(task: str, prediction: str, reference: str) -> dict[str, float]:
    """{"correct": 1.0 or 0.0} of a generated answer (decoded text) against the reference answer, by the
    task's rule in GENERATED_SCORING, with "similarity" (1 - normalised edit distance) for "text"."""
    rule = GENERATED_SCORING.get(task)
    if rule is None:
        raise ValueError(f"no scoring rule for task {task!r}; scored tasks: {sorted(GENERATED_SCORING)}")
    if rule == "boxes":
        reference_boxes = answer_scoring.parse_boxes(reference)
        if reference_boxes is None:
            raise ValueError(f"the reference grounding answer {reference!r} does not parse")
        return {"correct": float(answer_scoring.boxes_match(answer_scoring.parse_boxes(prediction),
                                                            reference_boxes))}
    out = {"correct": float(answer_scoring.exact_match(prediction, reference))}
    if rule == "text":
        out["similarity"] = answer_scoring.text_similarity(prediction, reference)
    return out


def generated_metrics(scores: Sequence[tuple[str, Mapping[str, float]]],
                      prefix: str = "generated/") -> dict[str, float]:
    """Means over (task, `score_generated` result) pairs: {prefix + task: accuracy,
    prefix + task + "_similarity": mean similarity} for the tasks present."""
    sums: dict[str, list[float]] = {}
    for task, score in scores:
        for name, value in score.items():
            key = prefix + task + ("" if name == "correct" else f"_{name}")
            sums.setdefault(key, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in sums.items()}
