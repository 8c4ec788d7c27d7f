"""Scoring a generated answer against its reference: exact match, grounding boxes, OCR text.

    normalise(" two  red\\n squares ") == "two red squares"
    exact_match(prediction, reference)           whitespace-normalised equality
    parse_boxes("<|begin_of_box|>[10,20,300,400]<|end_of_box|>") == [(10, 20, 300, 400)]
    box_iou(a, b)                                intersection over union of [x1, y1, x2, y2] boxes
    boxes_match(predicted, reference)            one-to-one matching at IoU >= 0.5, nothing left over
    levenshtein(a, b), text_similarity(a, b)     edit distance over characters, 1 - its normalised value

Boxes are the data's format (`glm5v_jax.data.templates.format_boxes`): integers in [0, 1000],
`[x1,y1,x2,y2]` for one box and `[[...],[...]]` for several, between `<|begin_of_box|>` and
`<|end_of_box|>`. Anything else is unparseable (`parse_boxes` returns None), which scores as wrong.
Which task is scored how is decided where the tasks are defined
(`glm5v_jax.data.conversations.GENERATED_SCORING`). Pure Python, no JAX.
"""
from __future__ import annotations

import re
from typing import Sequence

BEGIN_BOX, END_BOX = "<|begin_of_box|>", "<|end_of_box|>"
IOU_THRESHOLD = 0.5  # a predicted box counts when its IoU with the reference box is at least this
COORD_MAX = 1000  # box coordinates are integers in [0, COORD_MAX]

Box = tuple[int, int, int, int]
_ONE_BOX = r"\[(\d+),(\d+),(\d+),(\d+)\]"
_BOX_LIST = re.compile(rf"\[{_ONE_BOX}(?:,{_ONE_BOX})*\]")


def normalise(text: str) -> str:
    """`text` with leading and trailing whitespace removed and every inner run of whitespace made one
    space (case and punctuation are kept)."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def parse_boxes(text: str) -> list[Box] | None:
    """The boxes of a grounding answer, or None when it is not in the data's format: one `[x1,y1,x2,y2]`
    or a list `[[...],[...]]` of them, optionally between `<|begin_of_box|>` and `<|end_of_box|>`
    (both or neither), whitespace anywhere ignored; coordinates integers in [0, 1000] with
    x1 <= x2 and y1 <= y2."""
    s = "".join(text.split())
    has_begin, has_end = s.startswith(BEGIN_BOX), s.endswith(END_BOX)
    if has_begin != has_end:
        return None
    if has_begin:
        s = s[len(BEGIN_BOX):len(s) - len(END_BOX)]
    if re.fullmatch(_ONE_BOX, s):
        groups = [re.fullmatch(_ONE_BOX, s).groups()]
    elif _BOX_LIST.fullmatch(s):
        groups = [m.groups() for m in re.finditer(_ONE_BOX, s[1:-1])]
    else:
        return None
    boxes = [tuple(int(v) for v in g) for g in groups]
    for x1, y1, x2, y2 in boxes:
        if max(x1, y1, x2, y2) > COORD_MAX or x2 < x1 or y2 < y1:
            return None
    return boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes (x2, y2 exclusive: area (x2-x1)(y2-y1)).
    Two boxes of zero area: 1 when they are equal, else 0."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return float(tuple(a) == tuple(b))
    return inter / union


def boxes_match(predicted: Sequence[Box] | None, reference: Sequence[Box], threshold: float = IOU_THRESHOLD) -> bool:
    """True when the predicted boxes pair off one-to-one with the reference boxes, every pair at
    IoU >= `threshold` (a maximum bipartite matching, so the order does not matter); a missing, an
    extra or an unparseable (None) prediction is wrong."""
    if predicted is None or len(predicted) != len(reference):
        return False
    ok = [[box_iou(p, r) >= threshold for r in reference] for p in predicted]
    owner: dict[int, int] = {}  # reference index -> predicted index

    def assign(p: int, seen: set[int]) -> bool:  # augmenting path from predicted box p
        for r, good in enumerate(ok[p]):
            if good and r not in seen:
                seen.add(r)
                if r not in owner or assign(owner[r], seen):
                    owner[r] = p
                    return True
        return False

    return all(assign(p, set()) for p in range(len(predicted)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each) between `a` and `b`;
    characters are code points, so a Chinese character is one."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_similarity(prediction: str, reference: str) -> float:
    """1 - levenshtein / the longer length, on whitespace-normalised texts: 1 for equal texts (two empty
    ones included), 0 when no character lines up."""
    p, r = normalise(prediction), normalise(reference)
    longest = max(len(p), len(r))
    return 1.0 if longest == 0 else 1.0 - levenshtein(p, r) / longest
