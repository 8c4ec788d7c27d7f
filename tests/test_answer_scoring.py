"""Scoring generated answers: whitespace-normalised exact match, the data's box format (parsed
strictly; malformed = wrong), IoU at the 0.5 boundary, one-to-one box matching, edit distance on
English and Chinese text; the per-task rules and their means; and the generation prompts cut from a
packed SFT batch (image slots of the second document of a row, a truncated last answer left out)."""
from __future__ import annotations

import numpy as np
import pytest

from glm5v_jax.data.answer_scoring import (box_iou, boxes_match, exact_match, levenshtein, normalise,
                                           parse_boxes, text_similarity)
from glm5v_jax.data.conversations import (GENERATED_SCORING, TASK_IDS, Conversation, Turn, answer_prompts,
                                          generated_metrics, render_conversation, score_generated)
from helpers import FakeTokenizer


def test_exact_match_normalises_whitespace_only():
    assert normalise("  two  red\n\tsquares ") == "two red squares"
    assert exact_match("3", " 3\n") and exact_match("the red  circle", "the red circle")
    assert not exact_match("3.", "3") and not exact_match("Yes", "yes") and not exact_match("", "3")
    assert not exact_match("thered circle", "the red circle")  # spaces are normalised, not removed


def test_parse_boxes_takes_the_data_format_and_nothing_else():
    assert parse_boxes("<|begin_of_box|>[10,20,300,400]<|end_of_box|>") == [(10, 20, 300, 400)]
    assert parse_boxes(" [ 10 , 20 ,300, 400 ] ") == [(10, 20, 300, 400)]
    assert parse_boxes("<|begin_of_box|>[[1,2,3,4],[5,6,7,8]]<|end_of_box|>") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_boxes("[[0,0,1000,1000]]") == [(0, 0, 1000, 1000)]
    malformed = ["", "[]", "[[]]", "[1,2,3]", "[1,2,3,4,5]", "[1,2,3,4", "1,2,3,4]", "[1,2,3,4]]", "[[1,2,3,4],]",
                 "[[1,2,3,4][5,6,7,8]]", "[a,b,c,d]", "[1.5,2,3,4]", "[-1,2,3,4]", "[10,20,5,30]", "[10,40,20,30]",
                 "[0,0,1001,5]", "<|begin_of_box|>[1,2,3,4]", "[1,2,3,4]<|end_of_box|>", "the box is [1,2,3,4]",
                 "<|begin_of_box|>[1,2,3,4]<|end_of_box|>[5,6,7,8]"]
    for text in malformed:
        assert parse_boxes(text) is None, text


def test_iou_at_the_half_boundary():
    assert box_iou((0, 0, 100, 100), (0, 0, 100, 100)) == 1.0
    assert box_iou((0, 0, 100, 100), (0, 0, 100, 50)) == 0.5  # contained half
    assert box_iou((0, 0, 300, 100), (100, 0, 400, 100)) == 0.5  # shifted: 20000 / 40000
    assert box_iou((0, 0, 100, 100), (0, 0, 100, 49)) == pytest.approx(0.49)
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    assert box_iou((5, 5, 5, 9), (5, 5, 5, 9)) == 1.0 and box_iou((5, 5, 5, 9), (6, 5, 6, 9)) == 0.0  # zero area
    assert boxes_match([(0, 0, 100, 50)], [(0, 0, 100, 100)])  # IoU exactly 0.5 counts
    assert not boxes_match([(0, 0, 100, 49)], [(0, 0, 100, 100)])


def test_boxes_pair_off_one_to_one():
    r1, r2 = (0, 0, 100, 100), (0, 0, 100, 50)
    p_both, p_r1 = (0, 0, 100, 70), (0, 20, 100, 100)  # p_both is >= 0.5 with r1 and r2, p_r1 only with r1
    assert box_iou(p_both, r2) >= 0.5 and box_iou(p_r1, r2) < 0.5
    assert boxes_match([p_both, p_r1], [r1, r2])  # a first-come matching would give r1 to p_both and fail
    assert boxes_match([p_r1, p_both], [r2, r1])
    assert not boxes_match([p_both, p_both], [r1, (500, 500, 600, 600)])
    assert boxes_match([r1, r1], [r1, r2])  # IoU(r1, r2) is exactly 0.5: each copy takes one
    assert not boxes_match([r1], [r1, r2])  # a box missing
    assert not boxes_match([r1, r2, r2], [r1, r2])  # one too many
    assert not boxes_match(None, [r1]) and not boxes_match([], [r1])


def test_edit_distance_of_known_strings():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("sitting", "kitten") == 3
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("红色", "绿色") == 1 and levenshtein("三角形", "正方形") == 2
    assert levenshtein("长方形", "方形") == 1 and levenshtein("圆形", "") == 2
    assert text_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert text_similarity("红色", "绿色") == 0.5 and text_similarity("五角星", "五角星") == 1.0
    assert text_similarity("", "") == 1.0 and text_similarity("abc", "") == 0.0 and text_similarity("xyz", "day") == 0.0
    assert text_similarity(" day\n", "day") == 1.0 and text_similarity("dya", "day") == pytest.approx(1 / 3)


def test_score_generated_by_task():
    assert set(GENERATED_SCORING) <= set(TASK_IDS) and "caption" not in GENERATED_SCORING
    assert score_generated("count", " 3 ", "3") == {"correct": 1.0}
    assert score_generated("position", "top  left", "top left") == {"correct": 1.0}
    assert score_generated("colour", "red.", "red") == {"correct": 0.0}
    ref = "<|begin_of_box|>[[100,100,300,300],[600,600,700,700]]<|end_of_box|>"
    assert score_generated("grounding", "<|begin_of_box|>[[600,600,700,700],[100,100,300,300]]<|end_of_box|>",
                           ref) == {"correct": 1.0}
    assert score_generated("grounding", "<|begin_of_box|>[[610,600,700,700],[100,100,290,300]]<|end_of_box|>",
                           ref) == {"correct": 1.0}  # IoU 0.9 each
    assert score_generated("grounding", "<|begin_of_box|>[100,100,300,300]<|end_of_box|>", ref) == {"correct": 0.0}
    assert score_generated("grounding", "<|begin_of_box|>[[100,100,300,300],[600,600,700", ref) == {"correct": 0.0}
    assert score_generated("ocr", "dya", "day") == {"correct": 0.0, "similarity": pytest.approx(1 / 3)}
    assert score_generated("ocr", "day", "day") == {"correct": 1.0, "similarity": 1.0}
    with pytest.raises(ValueError, match="no scoring rule"):
        score_generated("caption", "a", "a")
    with pytest.raises(ValueError, match="does not parse"):
        score_generated("grounding", "[1,2,3,4]", "[1,2,3]")
    scores = [("count", {"correct": 1.0}), ("count", {"correct": 0.0}), ("count", {"correct": 1.0}),
              ("ocr", {"correct": 0.0, "similarity": 0.5}), ("ocr", {"correct": 1.0, "similarity": 1.0})]
    assert generated_metrics(scores) == {"generated/count": pytest.approx(2 / 3), "generated/ocr": 0.5,
                                         "generated/ocr_similarity": 0.75}
    assert generated_metrics([]) == {}


def test_answer_prompts_of_a_packed_batch():
    """Row 0: two image conversations (the second one's image is slot 1); row 1: one conversation cut
    inside its last answer (left out). M = 2 image slots per row."""
    tok = FakeTokenizer()
    a = Conversation((Turn("How many?", "2", "count"), Turn("Caption?", "A cat.", "caption")))
    b = Conversation((Turn("Word?", "day", "ocr"), Turn("Where is it?", "[1,2,3,4]", "grounding",
                                                         boxes=((1, 2, 3, 4),))), system="Be brief.")
    c = Conversation((Turn("Colour?", "red", "colour"), Turn("Which is higher?", "the star", "position")))
    docs = [render_conversation(conv, tok, n_image_tokens=n) for conv, n in ((a, 2), (b, 3), (c, 1))]
    cut = len(docs[2].tokens) - 3  # inside "the star": its closing <|endoftext|> is gone
    packing = [[(docs[0], None), (docs[1], None)], [(docs[2], cut)]]  # (document, cut) per row
    B, S, M = 2, 160, 2
    batch = {k: np.zeros((B, S), np.int32) for k in ("tokens", "segment_ids", "task_ids", "answer_ids")}
    batch["image_valid"] = np.array([True, True, True, False])  # slots 0, 1 (row 0) and 2 (row 1)
    assert len(batch["image_valid"]) == B * M
    for r, row in enumerate(packing):
        pos, n_answers = 0, 0
        for seg, (doc, end) in enumerate(row, start=1):
            n = len(doc.tokens) if end is None else end
            batch["tokens"][r, pos:pos + n] = doc.tokens[:n]
            batch["segment_ids"][r, pos:pos + n] = seg
            batch["task_ids"][r, pos:pos + n] = doc.task_ids[:n]
            batch["answer_ids"][r, pos:pos + n] = np.where(doc.answer_ids[:n] > 0, doc.answer_ids[:n] + n_answers, 0)
            n_answers += int(doc.answer_ids.max())
            pos += n
    got = answer_prompts(batch, begin_image_id=tok.begin_image_id, closing_ids=(tok.user_id, tok.eos_id))
    assert [p.task for p in got] == ["count", "caption", "ocr", "grounding", "colour"]
    assert [p.image_slots for p in got] == [(0,), (0,), (1,), (1,), (2,)]
    assert [tok.decode(p.reference) for p in got] == ["2", "A cat.", "day", "[1,2,3,4]", "red"]
    assert got[3].reference.tolist() == [tok.begin_box_id] + tok.encode("[1,2,3,4]") + [tok.end_box_id]
    for p, (doc, k) in zip(got, [(docs[0], 1), (docs[0], 2), (docs[1], 1), (docs[1], 2), (docs[2], 1)]):
        first = int(np.flatnonzero(doc.answer_ids == k)[0])
        assert p.prompt.tolist() == doc.tokens[:first].tolist()  # the document up to the answer
        assert p.prompt[-2:].tolist() == [tok.assistant_id] + tok.encode("\n")
    assert tok.decode(got[2].prompt).startswith("\nBe brief.")  # the second document's own start
