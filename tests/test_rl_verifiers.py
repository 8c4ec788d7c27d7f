"""Rule verifiers: golden cases per verifier (right, wrong, near misses at each rule's boundary), the
adversarial responses every verifier must survive quickly (empty, 1 MB, unicode, wrong format), bad
references raising ValueError that names the field, the optimal box assignment against brute force,
and the bounded edit distance against the exact one."""
from __future__ import annotations

import itertools
import pickle
import time

import numpy as np
import pytest

from glm5v_jax.data import answer_scoring
from glm5v_jax.rl import verifiers
from glm5v_jax.rl.verifiers import VERIFIERS

NAMES = {"count", "exact", "choice", "grounding_iou", "grounding_match", "point_in_box", "anls", "edit_similarity",
         "relaxed_number", "box_format"}
BOX = "<|begin_of_box|>{}<|end_of_box|>"
# a valid reference for each verifier, and one correct response to it
REFERENCES = {"count": {"answer": 3}, "exact": {"answer": "red circle"}, "choice": {"answer": "B"},
              "grounding_iou": {"boxes": [[100, 100, 300, 300]]}, "grounding_match": {"boxes": [[100, 100, 300, 300]]},
              "point_in_box": {"boxes": [[100, 100, 300, 300]]}, "anls": {"answer": "hello world"},
              "edit_similarity": {"answer": "hello world"}, "relaxed_number": {"answer": 42.5},
              "box_format": {}}
CORRECT = {"count": "3", "exact": "Red circle.", "choice": "(B)", "grounding_iou": BOX.format("[100,100,300,300]"),
           "grounding_match": "[100,100,300,300]", "point_in_box": "(200, 150)", "anls": "Hello World",
           "edit_similarity": "hello world", "relaxed_number": "42.5", "box_format": "[1,2,3,4]"}


def test_the_registry_holds_exactly_the_named_picklable_verifiers():
    assert set(VERIFIERS) == NAMES
    for name, fn in VERIFIERS.items():
        assert pickle.loads(pickle.dumps(fn)) is fn  # module-level: runs in a process pool
        assert fn(CORRECT[name], REFERENCES[name]) == 1.0, name
        assert fn("", REFERENCES[name]) == 0.0, name


def test_count():
    ref = {"answer": 3}
    for good in ["3", " 3 ", "3.", "Three", "three.", "There are 3 circles.", "There are three (3) circles", "003",
                 "３", "THREE"]:
        assert verifiers.count(good, ref) == 1.0, good
    for bad in ["4", "3 or 4", "three or four", "3.5", "3.0", "-3", "33", "no circles", "a few", "2+1", "thirty",
                "3rd of 4", "三", "one, two, three"]:
        assert verifiers.count(bad, ref) == 0.0, bad
    assert verifiers.count("0", {"answer": "0"}) == 1.0 and verifiers.count("zero", {"answer": 0}) == 1.0
    assert verifiers.count("There are no circles", {"answer": 0}) == 0.0  # no number: not read as zero
    assert verifiers.count("1,000", {"answer": 1000}) == 1.0 and verifiers.count("1,2", {"answer": 12}) == 0.0
    assert verifiers.count("twenty", {"answer": 20}) == 1.0 and verifiers.count("twenty-one", {"answer": 21}) == 0.0
    for bad_ref in [{}, {"answer": None}, {"answer": -1}, {"answer": 2.5}, {"answer": True}, {"answer": "three"}]:
        with pytest.raises(ValueError, match="answer"):
            verifiers.count("3", bad_ref)


def test_answers_are_picked_out_of_short_responses_only():
    filler = "x" * (verifiers.MAX_SHORT_ANSWER - 2)
    assert verifiers.count(filler + " 3", {"answer": 3}) == 1.0  # exactly MAX_SHORT_ANSWER characters
    assert verifiers.count(filler + "  3", {"answer": 3}) == 1.0  # whitespace is normalised first
    assert verifiers.count(filler + "x 3", {"answer": 3}) == 0.0
    assert verifiers.choice("B) " + filler[:-1], {"answer": "B"}) == 1.0  # 3 + 297 characters
    assert verifiers.choice("B) " + filler, {"answer": "B"}) == 0.0
    assert verifiers.relaxed_number(filler + "x 3", {"answer": 3}) == 0.0


def test_exact():
    ref = {"answer": "Red circle"}
    for good in ["red circle", "  RED\n circle ", "Red circle.", "red circle!", "red circle 。"]:
        assert verifiers.exact(good, ref) == 1.0, good
    for bad in ["redcircle", "red circles", "a red circle", ".red circle", "red, circle", "blue circle"]:
        assert verifiers.exact(bad, ref) == 0.0, bad
    assert verifiers.exact("Café", {"answer": "cafe\u0301"}) == 1.0  # composed == decomposed accent
    assert verifiers.exact("红色", {"answer": "红色。"}) == 1.0 and verifiers.exact("绿色", {"answer": "红色"}) == 0.0
    assert verifiers.exact("🔴", {"answer": "🔴"}) == 1.0 and verifiers.exact("🔵", {"answer": "🔴"}) == 0.0
    assert verifiers.exact("Blue", {"answers": ["red", "blue"]}) == 1.0
    assert verifiers.exact("green", {"answers": ["red", "blue"]}) == 0.0
    assert verifiers.exact("7", {"answer": 7}) == 1.0
    for bad_ref in [{}, {"answer": None}, {"answer": "  "}, {"answers": []}, {"answers": "red"}, {"answer": ["red"]},
                    {"answers": ["red", None]}]:
        with pytest.raises(ValueError, match="answer"):
            verifiers.exact("red", bad_ref)


def test_choice():
    ref = {"answer": "B"}
    for good in ["B", "b", "(B)", "B.", "B)", "B) a red circle", "(B) a red circle", "B. A red circle", "Answer: B",
                 "answer:B", "The answer is B", "The correct answer is (B).", "The answer is B because it is red",
                 "Ｂ", "答案是B", "答案：(B)", "B) I think so"]:
        assert verifiers.choice(good, ref) == 1.0, good
    for bad in ["A", "C.", "A or B", "B or C", "The answer is B or C", "(A) (B)", "B) not C)",
                "Answer: B. Option A is wrong", "B, C", "Blue", "Because", "a blue circle", "The answer is Blue",
                "I think B", "answer is b c", "BB", "B B C"]:
        assert verifiers.choice(bad, ref) == 0.0, bad
    assert verifiers.choice("B", {"answer": "(b)"}) == 1.0
    a = {"answer": "A"}
    assert verifiers.choice("A", a) == 1.0 and verifiers.choice("A. A red circle", a) == 1.0
    assert verifiers.choice("The answer is A because", a) == 1.0 and verifiers.choice("answer: a", a) == 1.0
    assert verifiers.choice("A red circle", a) == 0.0  # the article, not an option
    assert verifiers.choice("The answer is a red circle", a) == 0.0
    for bad_ref in [{}, {"answer": None}, {"answer": "AB"}, {"answer": 1}, {"answer": ""}]:
        with pytest.raises(ValueError, match="answer"):
            verifiers.choice("B", bad_ref)


def test_grounding_iou_matches_boxes_optimally_and_charges_extras_and_misses():
    r1, r2 = [0, 0, 100, 100], [0, 0, 100, 50]
    one = {"boxes": [r1]}
    assert verifiers.grounding_iou("[0,0,100,100]", one) == 1.0
    assert verifiers.grounding_iou("[0,0,100,50]", one) == 0.5
    assert verifiers.grounding_iou("[0,0,100,49]", one) == pytest.approx(0.49)
    assert verifiers.grounding_iou("[500,500,600,600]", one) == 0.0
    assert verifiers.grounding_iou("[[0,0,100,100],[500,500,600,600]]", one) == 0.5  # an extra box halves it
    assert verifiers.grounding_iou("[0,0,100,100]", {"boxes": [r1, [500, 500, 600, 600]]}) == 0.5  # a miss
    # p1 prefers r1 (IoU 2/3 against 1/4 with r3), but p2 overlaps r1 only: a greedy pairing of p1 first
    # gives (2/3 + 0) / 2, the optimal one (1/4 + 1) / 2
    r3, p1, p2 = [100, 0, 200, 100], [0, 0, 150, 100], [0, 0, 100, 100]
    want = (answer_scoring.box_iou(p1, r3) + answer_scoring.box_iou(p2, r1)) / 2
    assert want == pytest.approx(0.625)
    for pred in ([p1, p2], [p2, p1]):
        text = BOX.format(str(pred).replace(" ", ""))
        assert verifiers.grounding_iou(text, {"boxes": [r1, r3]}) == pytest.approx(want)
        assert verifiers.grounding_iou(text, {"boxes": [r3, r1]}) == pytest.approx(want)
    assert verifiers.grounding_iou(BOX.format("[[0,0,100,50],[0,0,100,100]]"), {"boxes": [r1, r2]}) == 1.0
    for bad in ["", "[0,0,100]", "the box [0,0,100,100]", "[0,0,1001,100]", "[0.5,0,100,100]", "[[0,0,100,100]"]:
        assert verifiers.grounding_iou(bad, one) == 0.0, bad
    too_many = "[" + ",".join(["[0,0,100,100]"] * (verifiers.MAX_BOXES + 1)) + "]"
    assert verifiers.grounding_iou(too_many, one) == 0.0


def test_grounding_match_and_box_format():
    ref = {"boxes": [[0, 0, 100, 100], [0, 0, 100, 50]]}
    assert verifiers.grounding_match("[[0,20,100,100],[0,0,100,70]]", ref) == 1.0  # needs the optimal pairing
    assert verifiers.grounding_match("[[0,0,100,100]]", ref) == 0.0
    assert verifiers.grounding_match("[[0,0,100,100],[0,0,100,49]]", {"boxes": [[0, 0, 100, 100]] * 2}) == 0.0
    assert verifiers.grounding_match("[0,0,100,50]", {"boxes": [[0, 0, 100, 100]]}) == 1.0  # IoU exactly 0.5
    assert verifiers.box_format(BOX.format("[[1,2,3,4],[5,6,7,8]]"), {}) == 1.0
    for bad in ["", "[1,2,3]", "box: [1,2,3,4]", BOX.format("[1,2,3,4]") + ".", "<|begin_of_box|>[1,2,3,4]"]:
        assert verifiers.box_format(bad, {}) == 0.0, bad


def test_point_in_box():
    ref = {"boxes": [[100, 100, 300, 300], [600, 600, 700, 700]]}
    for good in ["(200,200)", "( 200 , 200 )", "[650, 650]", BOX.format("(100,300)"), BOX.format("[700,600]")]:
        assert verifiers.point_in_box(good, ref) == 1.0, good  # edges included
    for bad in ["(99,200)", "(200,301)", "(500,500)", "(200,200),(650,650)", "[[200,200]]", "(200,200,300)",
                "The point is (200,200)", "(200.5,200)", "(-1,200)", "(1001,200)", "(200,200)" + "<|end_of_box|>",
                "200,200", "[200,200,300,300]"]:
        assert verifiers.point_in_box(bad, ref) == 0.0, bad


def test_anls_and_edit_similarity():
    ref = {"answer": "Hello World"}
    assert verifiers.anls("hello  world", ref) == 1.0
    assert verifiers.anls("hello worle", ref) == pytest.approx(1 - 1 / 11)
    assert verifiers.anls("ab", {"answer": "ax"}) == 0.0  # distance exactly tau: dropped
    assert verifiers.anls("abcd", {"answer": "abcx"}) == 0.75
    assert verifiers.anls("hello", ref) == 0.0  # similarity 5/11 < 0.5
    assert verifiers.anls("xyz", {"answers": ["abc", "xyw"]}) == pytest.approx(2 / 3)
    assert verifiers.anls("五角星", {"answer": "五角形"}) == pytest.approx(2 / 3)
    assert verifiers.anls("😀😀😀", {"answer": "😀😀😁"}) == pytest.approx(2 / 3)
    want = answer_scoring.text_similarity("hello", "Hello World")
    assert verifiers.edit_similarity("hello", ref) == pytest.approx(want)
    assert verifiers.edit_similarity("Hello World", ref) == 1.0
    assert verifiers.edit_similarity("hello world", ref) == pytest.approx(1 - 2 / 11)  # OCR keeps case
    assert verifiers.edit_similarity("xyz", {"answers": ["abc", "xyw"]}) == pytest.approx(2 / 3)
    for fn in (verifiers.anls, verifiers.edit_similarity):
        with pytest.raises(ValueError, match="answer"):
            fn("hello", {"answer": None})


def test_bounded_edit_similarity_is_a_close_lower_bound():
    rng = np.random.default_rng(0)
    for _ in range(30):
        answer = "".join(rng.choice(list("abc"), int(rng.integers(1, 8))))
        response = "".join(rng.choice(list("abc"), int(rng.integers(1, 120))))
        exact = answer_scoring.text_similarity(response, answer)
        bounded = verifiers._bounded_similarity(response, answer)
        assert exact - len(answer) / len(response) - 1e-12 <= bounded <= exact + 1e-12
        if len(response) <= verifiers.PREFIX_FACTOR * len(answer) + 16:
            assert bounded == exact


def test_relaxed_number():
    ref = {"answer": 100}
    for good in ["100", "105", "95", "about 104.9", "100.0", "1e2 is not read: 100", "100%"]:
        assert verifiers.relaxed_number(good, ref) == (0.0 if "1e2" in good else 1.0), good
    for bad in ["105.1", "94.9", "100 or 101", "one hundred", "", "-100"]:
        assert verifiers.relaxed_number(bad, ref) == 0.0, bad
    assert verifiers.relaxed_number("0", {"answer": 0}) == 1.0
    assert verifiers.relaxed_number("0.01", {"answer": 0}) == 0.0
    assert verifiers.relaxed_number("-2.1", {"answer": "-2"}) == 1.0  # 5% exactly
    assert verifiers.relaxed_number("2", {"answer": "-2"}) == 0.0
    assert verifiers.relaxed_number("-2.11", {"answer": "-2"}) == 0.0
    assert verifiers.relaxed_number("1,020", {"answer": "1,000"}) == 1.0
    assert verifiers.relaxed_number("45", {"answer": "45%"}) == 1.0
    assert verifiers.relaxed_number("Paris.", {"answer": "paris"}) == 1.0  # a text answer: exact match
    assert verifiers.relaxed_number("Pari", {"answer": "paris"}) == 0.0
    assert verifiers.relaxed_number("3 apples", {"answer": "3 apples"}) == 1.0
    assert verifiers.relaxed_number("3", {"answer": "3 apples"}) == 0.0
    assert verifiers.relaxed_number("52", {"answers": [10, 50]}) == 1.0
    assert verifiers.relaxed_number("1.02e20 is not read", {"answer": 1e20}) == 0.0
    assert verifiers.relaxed_number("102000000000000000000", {"answer": 1e20}) == 1.0
    for bad_ref in [{}, {"answer": None}, {"answer": float("nan")}, {"answer": True}]:
        with pytest.raises(ValueError, match="answer"):
            verifiers.relaxed_number("3", bad_ref)


@pytest.mark.parametrize("name", sorted(NAMES - {"box_format"}))
def test_bad_box_or_answer_references_name_the_field(name):
    field = "boxes" if "box" in name or "grounding" in name else "answer"
    bad_refs = [{}, {field: None}]
    if field == "boxes":
        bad_refs += [{"boxes": []}, {"boxes": [[1, 2, 3]]}, {"boxes": [[10, 0, 5, 5]]}, {"boxes": [[0, 0, 5, 1001]]},
                     {"boxes": "[1,2,3,4]"}, {"boxes": [[0, 0, 5, True]]}]
    for ref in bad_refs:
        with pytest.raises(ValueError, match=field):
            VERIFIERS[name](CORRECT[name], ref)
    with pytest.raises(TypeError, match="str"):
        VERIFIERS[name](None, REFERENCES[name])


ADVERSARIAL = {
    "1 MB of letters": "x" * 1_000_000,
    "1 MB of digits": "1" * 1_000_000,
    "1 MB of boxes": "[" + ",".join(["[1,2,3,4]"] * 100_000) + "]",
    "1 MB of letter options": "A B " * 250_000,
    "1 MB of brackets": "(" * 1_000_000,
    "1 MB of answer frames": "the answer is " * 75_000,
    "1 MB of spaces": " " * 1_000_000,
    "chinese": "答案是三个红色的圆形",
    "emoji": "🔴🔵🟢" * 10,
    "combining marks": "e\u0301\u0302\u0303" * 10,
    "control characters": "\x00\x1b[31m\u200b\ufeff",
    "wrong format": "<|begin_of_box|>[[1,2],[3]]<|end_of_box|>",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_adversarial_responses_score_zero_quickly(name):
    fn, ref = VERIFIERS[name], REFERENCES[name]
    for label, response in ADVERSARIAL.items():
        start = time.perf_counter()
        value = fn(response, ref)
        elapsed = time.perf_counter() - start
        if name == "box_format" and label == "1 MB of boxes":
            assert value == 1.0  # in the format, however many boxes
        elif name == "edit_similarity":  # continuous: a few characters may line up by chance
            assert 0.0 <= value < 0.1, label
        else:
            assert value == 0.0, label
        assert elapsed < 1.0, f"{name} took {elapsed:.2f}s on {label}"
    # a 1 MB response that starts with the right answer still costs little, and gains little
    start = time.perf_counter()
    value = fn(CORRECT[name] + " " + "x" * 1_000_000, ref)
    assert time.perf_counter() - start < 1.0 and value < 0.01


def _brute_force_assignment(weights: np.ndarray) -> float:
    rows, cols = weights.shape
    if rows > cols:
        weights, rows, cols = weights.T, cols, rows
    return max(sum(weights[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))


def test_optimal_assignment_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 6, size=2))
        weights = rng.random(shape) * (rng.random(shape) < 0.7)  # some zeros, as disjoint boxes give
        assert verifiers._hungarian_max(weights.tolist()) == pytest.approx(_brute_force_assignment(weights))
    assert verifiers._hungarian_max([]) == 0.0
