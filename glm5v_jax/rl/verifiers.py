"""Rule verifiers: `fn(response, reference) -> float in [0, 1]`, one table `VERIFIERS` by name.

  count            one integer (digits or "zero".."twenty") equal to reference["answer"]
  exact            case-insensitive, whitespace-normalised equality, trailing punctuation ignored
  choice           one option letter equal to reference["answer"]; two different letters -> 0
  grounding_iou    mean IoU of an optimal one-to-one box matching over max(#predicted, #reference)
  grounding_match  1 when every box pairs off at IoU >= 0.5 (`answer_scoring.boxes_match`)
  point_in_box     one point `(x, y)` or `[x, y]` inside any reference box (edges included)
  anls             ANLS: 1 - normalised edit distance, 0 when that distance is >= 0.5
  edit_similarity  1 - normalised edit distance (`answer_scoring.text_similarity`), no threshold
  relaxed_number   one number within 5% of reference["answer"] (exact at 0); a text answer: `exact`
  box_format       1 when `answer_scoring.parse_boxes` parses the response (a format gate)

References: "answer" (or a non-empty list "answers", scored by the best) for the text and number
verifiers, "boxes" (a list of [x1, y1, x2, y2] in the data's [0, 1000] frame) for the box and point
ones. A missing or malformed reference field raises ValueError naming it (a task bug, never a model
error); a malformed response scores 0, and so does a response over MAX_SHORT_ANSWER characters for the
verifiers that pick an answer out of a sentence (count, choice, relaxed_number). Every verifier is linear
in the response's length except the edit distances, which are bounded by the reference's length (see
`_bounded_similarity`), so a 1 MB response costs milliseconds. Module-level functions, so they pickle
into a process pool.
"""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Mapping, Sequence

from glm5v_jax.data import answer_scoring
from glm5v_jax.data.answer_scoring import BEGIN_BOX, COORD_MAX, END_BOX
from glm5v_jax.rl.types import Verifier

ANLS_TAU = 0.5  # ANLS keeps a similarity only when the normalised edit distance is below this
RELATIVE_TOLERANCE = 0.05  # relaxed accuracy of chart and table reading
MAX_BOXES = 100  # a response with more predicted boxes scores 0 in grounding_iou (its score is <= #ref/100)
PREFIX_FACTOR = 4  # edit distances read at most this many times the reference's length of the response
MAX_SHORT_ANSWER = 300  # count, choice, relaxed_number read a short answer: longer responses score 0
MAX_NUMBER_CHARS = 40  # relaxed_number: a longer digit run matches nothing (no float() of a 1 MB token)
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
TRAILING_PUNCTUATION = ".!?,;:。！？，；：、"

# -? digits with optional thousands commas and an optional fraction: "3", "-2", "1,000", "12.5", ".5"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+", re.ASCII)
_NUMBER_WORD = re.compile(r"\b(?:" + "|".join(NUMBER_WORDS) + r")\b")


# ---------------------------------------------------------------- references (errors name the field)

def _field(reference: Mapping[str, Any], name: str) -> Any:
    value = reference.get(name) if isinstance(reference, Mapping) else None
    if value is None:
        raise ValueError(f"reference[{name!r}] is missing or None (reference keys: "
                         f"{sorted(reference) if isinstance(reference, Mapping) else type(reference).__name__})")
    return value


def _raw_answers(reference: Mapping[str, Any]) -> list[str | int | float]:
    """The accepted answers: reference["answers"] when given (a non-empty list), else
    [reference["answer"]]; each a non-blank string or a finite number."""
    if isinstance(reference, Mapping) and reference.get("answers") is not None:
        name, values = "answers", reference["answers"]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"reference['answers'] must be a non-empty list of strings, got {values!r}")
    else:
        name, values = "answer", [_field(reference, "answer")]
    for v in values:
        bad_number = isinstance(v, float) and not math.isfinite(v)
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or bad_number:
            raise ValueError(f"reference[{name!r}] must hold strings or finite numbers, got {v!r}")
        if not str(v).strip():
            raise ValueError(f"reference[{name!r}] holds a blank answer")
    return list(values)


def _answers(reference: Mapping[str, Any]) -> list[str]:
    """The accepted answers as strings (`_raw_answers`)."""
    return [str(v) for v in _raw_answers(reference)]


def _reference_boxes(reference: Mapping[str, Any]) -> list[tuple[float, float, float, float]]:
    boxes = _field(reference, "boxes")
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence) or not boxes or len(boxes) > MAX_BOXES:
        raise ValueError(f"reference['boxes'] must be a list of 1 to {MAX_BOXES} [x1, y1, x2, y2] boxes, got {boxes!r}")
    out = []
    for b in boxes:
        ok = (isinstance(b, Sequence) and not isinstance(b, (str, bytes)) and len(b) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= COORD_MAX for v in b))
        if not ok or b[2] < b[0] or b[3] < b[1]:
            raise ValueError(f"reference['boxes'] holds {b!r}: want [x1, y1, x2, y2] in [0, {COORD_MAX}] "
                             "with x1 <= x2, y1 <= y2")
        out.append(tuple(float(v) for v in b))
    return out


# ---------------------------------------------------------------- responses

def _check(response: str) -> str:
    if not isinstance(response, str):
        raise TypeError(f"a verifier scores the response text (str), got {type(response).__name__}")
    return response


def _short(response: str) -> str | None:
    """The whitespace-normalised response when it is at most MAX_SHORT_ANSWER characters, else None: the
    answer-extracting verifiers read a short answer, so that a long text holding the right number or
    letter somewhere (and nothing else countable) is not rewarded."""
    text = answer_scoring.normalise(_check(response))
    return text if len(text) <= MAX_SHORT_ANSWER else None


def _canonical(text: str) -> str:
    """Text for case-insensitive comparison: NFC (composed and decomposed accents agree), case-folded,
    whitespace-normalised."""
    return answer_scoring.normalise(unicodedata.normalize("NFC", text).casefold())


def _strip_trailing(text: str) -> str:
    return text.rstrip(TRAILING_PUNCTUATION + " ")


def _numbers(text: str, words: bool) -> set[str]:
    """The distinct numbers of `text` as canonical strings ("007" -> "7", "1,000" -> "1000", "-03" -> "-3";
    a fraction is kept as written, so "3.0" is not the integer "3"); NFKC first, so full-width digits
    count; `words`: also the English number words zero..twenty."""
    text = unicodedata.normalize("NFKC", text).casefold()
    found = set()
    for m in _NUMBER.finditer(text):
        token = m.group().replace(",", "")
        sign, token = ("-", token[1:]) if token.startswith("-") else ("", token)
        whole, _, frac = token.partition(".")
        whole = whole.lstrip("0") or "0"
        found.add(sign + whole + ("." + frac if frac else ""))
        if len(found) > 1:  # early exit: the caller wants exactly one
            return found
    if words:
        for m in _NUMBER_WORD.finditer(text):
            found.add(str(NUMBER_WORDS[m.group()]))
            if len(found) > 1:
                return found
    return found


def _bounded_similarity(response: str, answer: str) -> float:
    """`answer_scoring.text_similarity` with a bounded cost: a response longer than
    PREFIX_FACTOR * len(answer) + 16 characters is scored on that prefix, the rest counted as deletions,
    (prefix - levenshtein(prefix, answer)) / len(response): a lower bound of the exact value that is at
    most len(answer) / len(response) < 1 / PREFIX_FACTOR below it. Cost O(len(answer)^2)."""
    r, a = answer_scoring.normalise(response), answer_scoring.normalise(answer)
    cap = PREFIX_FACTOR * len(a) + 16
    if len(r) <= cap:
        return answer_scoring.text_similarity(r, a)
    return max(0.0, (cap - answer_scoring.levenshtein(r[:cap], a)) / len(r))


# ---------------------------------------------------------------- the verifiers

def count(response: str, reference: Mapping[str, Any]) -> float:
    """1 when the distinct numbers of the response (digits, or the words zero..twenty) are exactly one,
    equal to reference["answer"] (an int >= 0 or its digits): "3", "Three.", "There are 3 (three) circles"
    pass; "3 or 4", "3.5", "no circles" (no number) do not. Chinese numerals are not read; a response over
    MAX_SHORT_ANSWER characters scores 0."""
    answer = _field(reference, "answer")
    if isinstance(answer, str) and answer.strip().isascii() and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
        raise ValueError(f"reference['answer'] of a count must be an integer >= 0, got {answer!r}")
    text = _short(response)
    return 0.0 if text is None else float(_numbers(text, words=True) == {str(answer)})


def exact(response: str, reference: Mapping[str, Any]) -> float:
    """1 when the response equals reference["answer"] (or one of reference["answers"]) after NFC,
    case folding, whitespace normalisation and dropping trailing punctuation (.!?,;: and CJK ones)."""
    got = _strip_trailing(_canonical(_check(response)))
    return float(any(got == _strip_trailing(_canonical(a)) for a in _answers(reference)))


# "(B)", "B", "B." "B)" alone; "Answer: B", "the correct answer is (B)", "答案是B"; "B) text", "B. text", "(B) text"
_FRAME = r"(?:(?:the\s+)?(?:correct\s+|final\s+)?answer\s*(?:is\s*)?|答案\s*(?:是|为)?\s*)[:：]?\s*"
_WHOLE_LETTER = re.compile(rf"(?:{_FRAME})?\(?([a-z])\)?", re.IGNORECASE)
_LEADING_OPTION = re.compile(rf"(?:{_FRAME})?(?:\(([a-z])\)|([a-z])[).:：])\s", re.IGNORECASE)
# a framed letter anywhere: a capital, or a lower-case letter not followed by a word ("answer is a circle")
_FRAMED = re.compile(r"(?i:\banswer\s*(?:is\s*)?|答案\s*(?:是|为)?\s*)[:：]?\s*"
                     r"\(?(?:([A-Z])|([a-z])(?![\w\s]))\)?(?![\w'’])")
# other mentions of an option letter: "(C)", "C)", "option C", a lone capital (not "A"/"I" before a word)
_MENTIONS = re.compile(r"\(([A-Za-z])\)|(?<![\w(])([A-Z])\)|\b(?i:option)\s+\(?([A-Za-z])\b"
                       r"|(?<![\w'’])((?![AI]\s+[a-z])[A-Z])(?![\w'’])")


def choice(response: str, reference: Mapping[str, Any]) -> float:
    """1 when the response chooses reference["answer"] (one letter): the whole response a letter form
    ("B", "(B)", "B.", "Answer: B", "The answer is (B)"), or led by one ("B) text", "(B) text",
    "B. text"), or holding "answer is B" / "answer: B"; case-insensitive, full-width letters read.
    Every option-like mention ("(C)", "C)", "option C", a lone capital other than the article "A" or
    pronoun "I" before a word, the framed and leading letters) must name that same letter, so a response
    naming two different letters scores 0, and so does one over MAX_SHORT_ANSWER characters."""
    answer = _field(reference, "answer")
    if not isinstance(answer, str) or not re.fullmatch(r"\(?[A-Za-z]\)?", answer.strip()):
        raise ValueError(f"reference['answer'] of a choice must be one letter, got {answer!r}")
    want = answer.strip().strip("()").upper()
    text = _short(response)
    if text is None:
        return 0.0
    text = _strip_trailing(answer_scoring.normalise(unicodedata.normalize("NFKC", text)))
    chosen = set()
    if m := _WHOLE_LETTER.fullmatch(text):
        chosen.add(m.group(1))
    elif m := _LEADING_OPTION.match(text):
        chosen.add(m.group(1) or m.group(2))
    chosen |= {m.group(1) or m.group(2) for m in _FRAMED.finditer(text)}
    if not chosen:
        return 0.0
    named = {g for m in _MENTIONS.finditer(text) for g in m.groups() if g}
    letters = {c.upper() for c in chosen | named}
    return float(letters == {want})


def _hungarian_max(weights: list[list[float]]) -> float:
    """The largest total weight of a one-to-one assignment of the rows to the columns of a non-negative
    rows x cols matrix (the shorter side fully assigned); the O(n^2 m) shortest-augmenting-path
    Hungarian algorithm with potentials, on costs -weight."""
    if not weights or not weights[0]:
        return 0.0
    if len(weights) > len(weights[0]):
        weights = [list(col) for col in zip(*weights)]
    n, m = len(weights), len(weights[0])
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) assigned to column j, 0 for none
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        dist, prev, used = [inf] * (m + 1), [0] * (m + 1), [False] * (m + 1)
        while owner[j0]:
            used[j0], i0, delta, j1 = True, owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = -weights[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < dist[j]:
                        dist[j], prev[j] = cur, j0
                    if dist[j] < delta:
                        delta, j1 = dist[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    dist[j] -= delta
            j0 = j1
        while j0:
            j1 = prev[j0]
            owner[j0], j0 = owner[j1], j1
    return sum(weights[owner[j] - 1][j - 1] for j in range(1, m + 1) if owner[j])


def grounding_iou(response: str, reference: Mapping[str, Any]) -> float:
    """The total IoU of the best one-to-one matching of the parsed boxes to reference["boxes"], divided
    by max(#predicted, #reference): a missing or an extra box costs its share. Unparseable, or more than
    MAX_BOXES boxes: 0."""
    ref = _reference_boxes(reference)
    pred = answer_scoring.parse_boxes(_check(response))
    if not pred or len(pred) > MAX_BOXES:
        return 0.0
    total = _hungarian_max([[answer_scoring.box_iou(p, r) for r in ref] for p in pred])
    return min(1.0, total / max(len(pred), len(ref)))


def grounding_match(response: str, reference: Mapping[str, Any]) -> float:
    """1 when the parsed boxes pair off one-to-one with reference["boxes"], every pair at IoU >= 0.5."""
    ref = _reference_boxes(reference)
    return float(answer_scoring.boxes_match(answer_scoring.parse_boxes(_check(response)), ref))


_POINT = re.compile(r"\((\d{1,4}),(\d{1,4})\)|\[(\d{1,4}),(\d{1,4})\]", re.ASCII)


def point_in_box(response: str, reference: Mapping[str, Any]) -> float:
    """1 when the response is exactly one point "(x, y)" or "[x, y]" (integers in [0, 1000], optionally
    between <|begin_of_box|> and <|end_of_box|>, whitespace ignored) inside any of reference["boxes"],
    edges included; anything else (text around it, several points) scores 0."""
    ref = _reference_boxes(reference)
    s = "".join(_check(response).split())
    if s.startswith(BEGIN_BOX) and s.endswith(END_BOX):
        s = s[len(BEGIN_BOX):len(s) - len(END_BOX)]
    m = _POINT.fullmatch(s)
    if m is None:
        return 0.0
    x, y = (int(g) for g in m.groups() if g is not None)
    if max(x, y) > COORD_MAX:
        return 0.0
    return float(any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in ref))


def anls(response: str, reference: Mapping[str, Any]) -> float:
    """ANLS (DocVQA): the best over the answers of 1 - normalised edit distance, kept when the distance
    is below ANLS_TAU (so a similarity of exactly 0.5 scores 0), on NFC, case-folded, whitespace-normalised
    text. Exact for any length: when one text is over twice the other, the distance is >= 0.5 unseen."""
    got = _canonical(_check(response))
    best = 0.0
    for answer in _answers(reference):
        want = _canonical(answer)
        if len(got) > 2 * len(want) or len(want) > 2 * len(got):
            continue
        similarity = answer_scoring.text_similarity(got, want)
        if 1.0 - similarity < ANLS_TAU:
            best = max(best, similarity)
    return best


def edit_similarity(response: str, reference: Mapping[str, Any]) -> float:
    """The best over the answers of `answer_scoring.text_similarity` (case-sensitive: OCR keeps case;
    whitespace-normalised), no threshold; a response over PREFIX_FACTOR times an answer's length is scored
    on its prefix (`_bounded_similarity`)."""
    got = _check(response)
    return max(_bounded_similarity(got, a) for a in _answers(reference))


def _as_number(text: str) -> float | None:
    """The value of a reference answer that is one number ("12.5", "1,000", "45%", "$3"), else None."""
    found = _numbers(text, words=False)
    stripped = re.sub(r"[\s%$€£¥,]", "", unicodedata.normalize("NFKC", text))
    if len(found) != 1 or not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", stripped):
        return None
    return float(next(iter(found)))


def relaxed_number(response: str, reference: Mapping[str, Any]) -> float:
    """Chart and table reading: when reference["answer"] (or each of "answers") is a number (or a string of
    one, "%" and currency signs ignored), 1 when the distinct numbers of the response are exactly one, within
    RELATIVE_TOLERANCE of a reference relative to it, boundary included (equal when it is 0); "1e2" and
    number words are not read; a response over MAX_SHORT_ANSWER characters scores 0. A text answer is
    scored by `exact`."""
    answers = _raw_answers(reference)
    values = [float(a) if isinstance(a, (int, float)) else _as_number(a) for a in answers]
    if any(v is None for v in values):  # a text answer (or a list mixing text and numbers): exact match
        return exact(response, {"answers": [str(a) for a in answers]})
    text = _short(response)
    found = set() if text is None else _numbers(text, words=False)
    if len(found) != 1:
        return 0.0
    token = next(iter(found))
    if len(token) > MAX_NUMBER_CHARS:
        return 0.0
    x = float(token)
    return float(any(abs(x - v) <= (RELATIVE_TOLERANCE + 1e-12) * abs(v) for v in values))  # 5% itself passes


def box_format(response: str, reference: Mapping[str, Any]) -> float:
    """1 when `answer_scoring.parse_boxes` parses the response (the data's box format), else 0; the
    reference is not read. A format gate for grounding rewards."""
    return float(answer_scoring.parse_boxes(_check(response)) is not None)


VERIFIERS: dict[str, Verifier] = {
    "count": count,
    "exact": exact,
    "choice": choice,
    "grounding_iou": grounding_iou,
    "grounding_match": grounding_match,
    "point_in_box": point_in_box,
    "anls": anls,
    "edit_similarity": edit_similarity,
    "relaxed_number": relaxed_number,
    "box_format": box_format,
}
