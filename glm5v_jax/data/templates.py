"""Training documents from dataset records: token ids, a per-token loss mask, an image slot.

A record (see `glm5v_jax.data.pipeline`) is a dict with an image (PNG bytes, or
b"" for text-only), captions, an OCR word, QA pairs and grounding boxes. One
record becomes one *document*: a GLM chat for image records,

    [gMASK]<sop><|user|>\\n<|begin_of_image|><|image|> x n<|end_of_image|>{prompt}<|assistant|>\\n{answer}<|endoftext|>

and `text<|endoftext|>` for text-only records. Multi-turn QA repeats
`<|user|>\\n{q}<|assistant|>\\n{a}` (the image only in the first user turn).

Loss mask (1 = this token is a training target, the convention of
`glm5v_jax.losses.lm`, where the mask is read at the target position): the
answer tokens and the token that closes each answer -- `<|endoftext|>` after the
last one, `<|user|>` after earlier ones (GLM chat models end a turn by emitting
the next role token) -- and nothing else (no prompt, role, template or image
token). Text-only documents: every token.

`chat_document` renders any list of turns (optionally after a `<|system|>` message) and
also numbers the answers; the SFT conversations of `glm5v_jax.data.conversations` use it.

The task for an image record (caption / qa / grounding / ocr) is drawn from the
`rng` the caller passes, among the tasks the record has data for, so a caller
that seeds `rng` from (seed, record id, epoch) gets a deterministic choice.
NumPy only, so it runs in data workers.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, MutableMapping, Sequence

import numpy as np

from glm5v_jax.errors import ConfigError

TASKS = ("caption", "qa", "grounding", "ocr")
DEFAULT_TASK_WEIGHTS = {"caption": 1.0, "qa": 1.0, "grounding": 0.5, "ocr": 0.5}

CAPTION_PROMPT_EN = "Describe the image."
CAPTION_PROMPT_ZH = "描述这张图片。"
OCR_PROMPT = "What word is written in the image?"
GROUNDING_PROMPT = "Where is the {label}?"


class SkipSample(ValueError):
    """The record cannot become a training document; `reason` is a counter name."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def as_str(x: Any) -> str:
    """A string field that may come back as bytes (TFDS ArrayRecord), str, 0-d array or None."""
    if x is None:
        return ""
    if isinstance(x, np.ndarray):
        x = x.item() if x.ndim == 0 else (x.reshape(-1)[0] if x.size else b"")
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).decode("utf-8", errors="replace")
    return str(x)


def _bump(stats: MutableMapping[str, int] | None, key: str) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + 1


def _json_list(x: Any) -> list:
    s = as_str(x).strip()
    if not s:
        return []
    try:
        out = json.loads(s)
    except (ValueError, TypeError):
        return []
    return out if isinstance(out, list) else []


def qa_items(record: Mapping[str, Any], stats: MutableMapping[str, int] | None = None) -> list[tuple[str, str, str]]:
    """Usable (question, answer, kind) triples (kind "" when the record gives none); items with
    an empty question or answer are dropped and counted."""
    items = []
    for item in _json_list(record.get("qa_json")):
        if not isinstance(item, Mapping):
            continue
        q, a = as_str(item.get("q")).strip(), as_str(item.get("a")).strip()
        if q and a:
            items.append((q, a, as_str(item.get("kind")).strip()))
        else:
            _bump(stats, "dropped/empty_answer")
    return items


def qa_pairs(record: Mapping[str, Any], stats: MutableMapping[str, int] | None = None) -> list[tuple[str, str]]:
    """Usable (question, answer) pairs; pairs with an empty side are dropped and counted."""
    return [(q, a) for q, a, _ in qa_items(record, stats)]


def _valid_box(box: Any) -> list[int] | None:
    try:
        vals = [int(round(float(v))) for v in box]
    except (TypeError, ValueError):
        return None
    if len(vals) != 4:
        return None
    x1, y1, x2, y2 = (min(max(v, 0), 1000) for v in vals)
    if x2 < x1 or y2 < y1:
        return None
    return [x1, y1, x2, y2]


def grounding_targets(record: Mapping[str, Any]) -> dict[str, list[list[int]]]:
    """label -> its boxes ([x1, y1, x2, y2] ints in 0..1000), in record order."""
    out: dict[str, list[list[int]]] = {}
    for item in _json_list(record.get("boxes_json")):
        if not isinstance(item, Mapping):
            continue
        label, box = as_str(item.get("label")).strip(), _valid_box(item.get("box", ()))
        if label and box is not None:
            out.setdefault(label, []).append(box)
    return out


def format_boxes(boxes: list[list[int]]) -> str:
    """`[x1,y1,x2,y2]` for one box, `[[...],[...]]` for several (GLM-4.5V style)."""
    one = ["[" + ",".join(str(v) for v in b) + "]" for b in boxes]
    return one[0] if len(one) == 1 else "[" + ",".join(one) + "]"


def box_answer_ids(tok, boxes: list[list[int]]) -> list[int]:
    """A grounding answer: `<|begin_of_box|>` + `format_boxes(boxes)` + `<|end_of_box|>` as ids."""
    return [tok.begin_box_id] + list(tok.encode(format_boxes(boxes))) + [tok.end_box_id]


class _Doc:
    """Accumulates (ids, mask, answer number) pieces."""

    def __init__(self):
        self.ids: list[int] = []
        self.mask: list[bool] = []
        self.answer: list[int] = []

    def add(self, ids, target: bool, answer: int = 0) -> None:
        ids = [int(i) for i in ids]
        self.ids += ids
        self.mask += [target] * len(ids)
        self.answer += [answer] * len(ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.ids, np.int32), np.asarray(self.mask, bool)


def chat_document(tok, turns: Sequence[tuple[str, Sequence[int]]], *, n_image_tokens: int | None = None,
                  system: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GLM chat -> (ids int32 [L], loss_mask bool [L], answer_ids int32 [L]).

        [gMASK]<sop>[<|system|>\n{system}]<|user|>\n[<image block>]{prompt}<|assistant|>\n{answer}
        <|user|>\n{prompt}<|assistant|>\n{answer} ... <|endoftext|>

    turns: (user prompt, answer ids); the image block (`n_image_tokens` `<|image|>` tokens
      between `<|begin_of_image|>` and `<|end_of_image|>`) opens the first user turn, and is
      left out when n_image_tokens is None or 0.
    loss_mask: the answer tokens and the token that closes each answer (the next `<|user|>`,
      `<|endoftext|>` after the last); answer_ids: k on the targets of answer k (1-based),
      0 elsewhere.
    """
    if not turns:
        raise ValueError("chat_document needs at least one turn")
    d = _Doc()
    d.add([tok.gmask_id, tok.sop_id], False)
    newline = tok.encode("\n")
    if system:
        d.add([tok.system_id], False)
        d.add(newline, False)
        d.add(tok.encode(system), False)
    for t, (prompt, answer_ids) in enumerate(turns):
        d.add([tok.user_id], t > 0, t)  # <|user|> after an answer closes that answer: a target
        d.add(newline, False)
        if t == 0 and n_image_tokens:
            d.add([tok.begin_image_id] + [tok.image_id] * n_image_tokens + [tok.end_image_id], False)
        d.add(tok.encode(prompt), False)
        d.add([tok.assistant_id], False)
        d.add(newline, False)
        d.add(answer_ids, True, t + 1)
    d.add([tok.eos_id], True, len(turns))
    ids, mask = d.arrays()
    return ids, mask, np.asarray(d.answer, np.int32)


def available_tasks(record: Mapping[str, Any], stats: MutableMapping[str, int] | None = None) -> dict[str, Any]:
    """task -> its data, for the tasks this image record can serve."""
    out: dict[str, Any] = {}
    en, zh = as_str(record.get("caption_en")).strip(), as_str(record.get("caption_zh")).strip()
    if en or zh:
        out["caption"] = (en, zh)
    else:
        _bump(stats, "dropped/empty_caption")
    pairs = qa_pairs(record, stats)
    if pairs:
        out["qa"] = pairs
    boxes = grounding_targets(record)
    if boxes:
        out["grounding"] = boxes
    ocr = as_str(record.get("ocr")).strip()
    if ocr:
        out["ocr"] = ocr
    return out


def build_document(record: Mapping[str, Any], tokenizer, *, n_image_tokens: int | None,
                   rng: np.random.Generator, task_weights: Mapping[str, float] | None = None,
                   zh_caption_prob: float = 0.3, qa_all_prob: float = 0.5,
                   stats: MutableMapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (ids int32 [L], loss_mask bool [L]).

    n_image_tokens: merged image tokens, (gh/merge) * (gw/merge), for an image record;
      None for a text-only document (`text<|endoftext|>`, all targets).
    rng: draws the task, the caption language, the QA turns and the grounded label.
    task_weights: relative weights over TASKS (default DEFAULT_TASK_WEIGHTS); tasks the
      record has no data for, or of weight 0, are left out.
    qa_all_prob: probability that a QA task uses all pairs as turns (else one pair).
    stats: optional counter dict; empty fields dropped on the way are counted there.
    Raises SkipSample("skipped/empty_text") when nothing usable is left.
    """
    tok = tokenizer
    if n_image_tokens is None:
        text = as_str(record.get("text"))
        if not text.strip():
            raise SkipSample("skipped/empty_text", "text-only record with empty text")
        d = _Doc()
        d.add(tok.encode(text), True)
        d.add([tok.eos_id], True)
        return d.arrays()
    if n_image_tokens <= 0:
        raise ValueError(f"n_image_tokens must be positive for an image record, got {n_image_tokens}")
    weights = dict(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ConfigError("task_weights", f"unknown tasks {sorted(unknown)}; known: {TASKS}")
    data = available_tasks(record, stats)
    names = [t for t in TASKS if t in data and weights.get(t, 0.0) > 0]
    if not names:
        raise SkipSample("skipped/empty_text", "image record without a usable caption, QA, box or OCR word")
    p = np.asarray([weights[t] for t in names], np.float64)
    task = names[int(rng.choice(len(names), p=p / p.sum()))]
    if task == "caption":
        en, zh = data["caption"]
        use_zh = bool(zh) and (not en or rng.random() < zh_caption_prob)
        prompt, answer = (CAPTION_PROMPT_ZH, zh) if use_zh else (CAPTION_PROMPT_EN, en)
        turns = [(prompt, tok.encode(answer))]
    elif task == "qa":
        pairs = data["qa"]
        if len(pairs) > 1 and rng.random() < qa_all_prob:
            chosen = pairs
        else:
            chosen = [pairs[int(rng.integers(len(pairs)))]]
        turns = [(q, tok.encode(a)) for q, a in chosen]
    elif task == "grounding":
        labels = list(data["grounding"])
        label = labels[int(rng.integers(len(labels)))]
        turns = [(GROUNDING_PROMPT.format(label=label), box_answer_ids(tok, data["grounding"][label]))]
    else:  # ocr
        turns = [(OCR_PROMPT, tok.encode(data["ocr"]))]
    ids, mask, _ = chat_document(tok, turns, n_image_tokens=n_image_tokens)
    return ids, mask
