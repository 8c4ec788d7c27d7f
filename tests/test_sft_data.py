"""SFT data: shapes-world conversations, the GLM chat rendering and its loss mask (a golden
sequence), SFT batches from the grain pipeline, and teacher-forced answer accuracy per task.

A SentencePiece tokenizer trained on a few shapes-world sentences (well under a second)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from glm5v_jax.data import shapes_world as sw
from glm5v_jax.data.batch import validate_vlm_batch
from glm5v_jax.data.conversations import (TASK_IDS, TASKS, Conversation, Turn, accuracy_metrics, add_counts,
                                          answer_accuracy, make_conversation, render_conversation)
from glm5v_jax.data.pipeline import PipelineConfig, make_batch_iterator, preprocess_image
from glm5v_jax.data.tokenizer import train_tokenizer

# The pre-training batch contract (glm5v_jax.train.vlm_pretrain.batch_contract); SFT adds two keys.
CONTRACT = {"tokens", "segment_ids", "loss_mask", "patches", "patch_yx", "patch_valid", "image_grid", "image_valid"}
SFT_EXTRA = {"task_ids", "answer_ids"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = list(sw.iter_texts(0, dict(train=20, text_train=10)))
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "spm.model"), vocab_size=500)


def png(h, w, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- rendering (golden)


def test_golden_two_turn_conversation(tok):
    record = dict(image=png(32, 64), width=64, height=32, kind="image", id="golden")
    grid = preprocess_image(record["image"], patch_size=16, max_patches=16)["grid"]
    n_img = int((grid[0] // 2) * (grid[1] // 2))
    assert n_img == 2  # 32x64 px -> 2x4 patches -> 1x2 merged tokens
    system, q1 = "You are a helpful assistant.", "How many shapes are there?"
    q2 = "Locate every red circle in the image."
    conv = Conversation(turns=(Turn(q1, "2", "count"),
                               Turn(q2, "[10,20,300,400]", "grounding", boxes=((10, 20, 300, 400),))),
                        system=system)
    doc = render_conversation(conv, tok, n_image_tokens=n_img)

    E, NL = tok.encode, tok.encode("\n")
    count, grounding = TASK_IDS["count"], TASK_IDS["grounding"]
    # (tokens, target?, task, answer) role by role
    expected = [
        ([tok.gmask_id, tok.sop_id], 0, 0, 0),
        ([tok.system_id] + NL + E(system), 0, 0, 0),
        ([tok.user_id] + NL + [tok.begin_image_id] + [tok.image_id] * n_img + [tok.end_image_id] + E(q1), 0, 0, 0),
        ([tok.assistant_id] + NL, 0, 0, 0),
        (E("2"), 1, count, 1),                       # answer 1
        ([tok.user_id], 1, count, 1),                # ... closed by the next <|user|>
        (NL + E(q2), 0, 0, 0),
        ([tok.assistant_id] + NL, 0, 0, 0),
        ([tok.begin_box_id] + E("[10,20,300,400]") + [tok.end_box_id], 1, grounding, 2),  # answer 2
        ([tok.eos_id], 1, grounding, 2),             # ... closed by <|endoftext|>
    ]
    ids = [i for piece, *_ in expected for i in piece]
    mask = [bool(t) for piece, t, _, _ in expected for _ in piece]
    task = [k for piece, _, k, _ in expected for _ in piece]
    answer = [a for piece, _, _, a in expected for _ in piece]
    assert doc.tokens.dtype == np.int32 and doc.loss_mask.dtype == bool
    assert doc.task_ids.dtype == np.int32 and doc.answer_ids.dtype == np.int32
    assert doc.tokens.tolist() == ids
    assert doc.loss_mask.tolist() == mask
    assert doc.task_ids.tolist() == task and doc.answer_ids.tolist() == answer
    assert tok.decode(doc.tokens) == (
        f"[gMASK]<sop><|system|>\n{system}<|user|>\n<|begin_of_image|>{'<|image|>' * n_img}<|end_of_image|>{q1}"
        f"<|assistant|>\n2<|user|>\n{q2}<|assistant|>\n<|begin_of_box|>[10,20,300,400]<|end_of_box|><|endoftext|>")
    # text-only conversation: no image block, no system message
    text = render_conversation(Conversation((Turn("What is 2 plus 3?", "5", "text"),), image=False), tok)
    assert tok.decode(text.tokens) == "[gMASK]<sop><|user|>\nWhat is 2 plus 3?<|assistant|>\n5<|endoftext|>"
    assert tok.decode(text.tokens[text.loss_mask]) == "5<|endoftext|>"
    with pytest.raises(ValueError, match="n_image_tokens"):
        render_conversation(conv, tok)
    with pytest.raises(ValueError, match="task"):
        Turn("q", "a", "weather")


# ----------------------------------------------------------------------------- the generator


def _records(n=16):
    return [sw.generate_image_example(0, "train", i, encode=False) for i in range(n)]


def _conversations(records, seed, epoch=0, image=True):
    return [make_conversation(r, np.random.default_rng([seed, i, epoch]), image=image) for i, r in enumerate(records)]


def test_generator_is_deterministic_and_covers_every_task(tok):
    records = _records()
    a, b = _conversations(records, 0), _conversations(records, 0)
    assert a == b
    assert a != _conversations(records, 1) and a != _conversations(records, 0, epoch=1)
    tasks = [t.task for c in a for t in c.turns]
    assert set(tasks) >= set(TASKS) - {"qa"}, sorted(set(tasks))  # shapes-world QA all have a known kind
    assert np.mean([len(c.turns) for c in a]) >= 2.5 and all(1 <= len(c.turns) <= 5 for c in a)
    assert any(c.system for c in a) and not all(c.system for c in a)
    for c, r in zip(a, records):
        assert c.image and c.turns[0].task != "text"  # the image's turn comes first
        boxes = {tuple(x["box"]) for x in json.loads(r["boxes_json"])}
        for t in c.turns:
            if t.task == "grounding":
                assert set(t.boxes) <= boxes and all(0 <= v <= 1000 for bx in t.boxes for v in bx)
        doc = render_conversation(c, tok, n_image_tokens=3)
        assert (doc.loss_mask == (doc.task_ids > 0)).all() and (doc.loss_mask == (doc.answer_ids > 0)).all()
        assert doc.answer_ids.max() == len(c.turns)
        for k, t in enumerate(c.turns, start=1):
            assert (doc.task_ids[doc.answer_ids == k] == TASK_IDS[t.task]).all()
        assert (doc.tokens == tok.image_id).sum() == 3
    texts = [sw.generate_text_example(0, "text_train", i) for i in range(4)]
    for c, r in zip(_conversations(texts, 0, image=False), texts):
        assert not c.image and {t.task for t in c.turns} == {"text"} and len(c.turns) >= 2
        first = c.turns[0]
        assert first.user.split("\n", 1)[1] + " " + first.answer == r["text"]  # a continuation
        doc = render_conversation(c, tok)
        assert not (doc.tokens == tok.image_id).any() and doc.answer_ids.max() == len(c.turns)


# ----------------------------------------------------------------------------- the pipeline


def _sft_records():
    good = [dict(sw.generate_image_example(0, "train", i), id=f"im{i}") for i in range(6)]
    good += [dict(sw.generate_text_example(0, "text_train", i), id=f"tx{i}") for i in range(3)]
    bad = [dict(good[0], image=b"\x89PNG not really a png", id="corrupt"),
           dict(sw.generate_text_example(0, "text_train", 9), text="  ", id="empty")]
    return good[:4] + bad[:1] + good[4:] + bad[1:]


def _cfg(**kw):
    base = dict(seq_len=256, rows_per_batch=2, max_images_per_row=2, max_patches=64, seed=0, num_epochs=1,
                document_kind="sft")
    return PipelineConfig(**{**base, **kw})


def _check_sft_batch(b, c, tok):
    assert set(b) == CONTRACT | SFT_EXTRA
    B, S = c.rows_per_batch, c.seq_len
    for key in SFT_EXTRA:
        assert b[key].shape == (B, S) and b[key].dtype == np.int32
    validate_vlm_batch(b, image_token_id=tok.image_id, vocab_size=tok.vocab_size, merge=c.merge)
    mask = b["loss_mask"]
    assert (mask == (b["task_ids"] > 0)).all() and (mask == (b["answer_ids"] > 0)).all()
    never = [tok.gmask_id, tok.sop_id, tok.system_id, tok.assistant_id, tok.image_id, tok.begin_image_id,
             tok.end_image_id]
    assert not mask[np.isin(b["tokens"], never)].any()
    for r in range(B):
        ans = b["answer_ids"][r]
        n = int(ans.max())
        assert sorted(set(ans[ans > 0].tolist())) == list(range(1, n + 1))  # numbered through the row
        for k in range(1, n + 1):
            at = np.flatnonzero(ans == k)
            assert len(set(b["task_ids"][r, at].tolist())) == 1
            assert len(set(b["segment_ids"][r, at].tolist())) == 1  # an answer never straddles documents
            # the closing token: <|user|> (a later turn) or <|endoftext|> (the last one)
            assert b["tokens"][r, at[-1]] in (tok.user_id, tok.eos_id)


def test_sft_batches_have_the_pretraining_contract_plus_task_ids(tok):
    c = _cfg()
    it = make_batch_iterator(_sft_records(), tok, c)
    batches = list(it)
    for b in batches:
        _check_sft_batch(b, c, tok)
    s = it.stats
    assert s["skipped/undecodable_image"] == 1 and s["skipped/empty_text"] == 1
    assert s["skipped/error"] == 0
    assert s["examples"] == 9 == sum(int(b["segment_ids"].max(1).sum()) for b in batches)
    assert s["images"] == 6 == sum(int(b["image_valid"].sum()) for b in batches)
    assert any((b["segment_ids"].max(1) >= 2).any() for b in batches)  # rows of several conversations
    # perfect teacher-forced predictions get every answer right; the counts add up over batches
    total = {}
    for b in batches:
        perfect = np.concatenate([b["tokens"][:, 1:], b["tokens"][:, :1]], axis=1)
        total = add_counts(total, answer_accuracy(perfect, b))
    n_answers = sum(int(b["answer_ids"].max(1).sum()) for b in batches)
    assert total["all"] == (n_answers, n_answers) and n_answers >= 9 * 2
    assert sum(total[t][1] for t in TASKS) == n_answers and total["text"][1] >= 3
    assert accuracy_metrics(total)["answer_acc/all"] == 1.0
    # pre-training batches from the same records keep exactly the contract's keys
    pre = next(make_batch_iterator(_sft_records(), tok, _cfg(document_kind="pretrain")))
    assert set(pre) == CONTRACT


def test_sft_tasks_keep_only_those_turns_and_count_the_records_without_one(tok):
    convs = [make_conversation(r, np.random.default_rng(i), image=True, tasks=("count", "colour"))
             for i, r in enumerate(_records(8))]
    assert {t.task for c in convs for t in c.turns} == {"count", "colour"}  # no text turn without "text"
    it = make_batch_iterator(_sft_records(), tok, _cfg(sft_tasks=("count",)))
    batches = list(it)
    for b in batches:
        _check_sft_batch(b, _cfg(), tok)
        assert set(np.unique(b["task_ids"])) <= {0, TASK_IDS["count"]}
    # the four text-only records (the empty one too: filtered before its text is read); the corrupt image
    assert it.stats["skipped/task_filter"] == 4 and it.stats["skipped/undecodable_image"] == 1
    assert it.stats["examples"] == 6  # every good image record asks a count
    with pytest.raises(Exception, match="sft_tasks"):
        _cfg(sft_tasks=("counting",))


def test_sft_iterator_checkpoint_restores_exactly(tok):
    c = _cfg(num_epochs=None, rows_per_batch=1, seq_len=200)
    it = make_batch_iterator(_sft_records(), tok, c)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["layout"]["document_kind"] == "sft" and state["keep"]  # a carried document: the replay path
    want = [next(it) for _ in range(3)]
    it2 = make_batch_iterator(_sft_records(), tok, c)
    it2.set_state(state)
    for a, b in zip(want, [next(it2) for _ in range(3)]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="layout"):  # a pre-training state is not an SFT state
        make_batch_iterator(_sft_records(), tok, _cfg(num_epochs=None, rows_per_batch=1, seq_len=200,
                                                       document_kind="pretrain")).set_state(state)
    with pytest.raises(ValueError, match="document_kind"):
        _cfg(document_kind="chat")


# ----------------------------------------------------------------------------- evaluation


def test_answer_accuracy_counts():
    # row 0: answer 1 (count) at 3..4, answer 2 (text) at 7..9; row 1: answer 1 (ocr) at 2..3
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0, 0, 0]], np.int32)
    answer_ids = np.array([[0, 0, 0, 1, 1, 0, 0, 2, 2, 2], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]], np.int32)
    task_row0 = [0, 0, 0, 1, 1, 0, 0, 7, 7, 7]
    task_ids = np.array([[TASK_IDS["count"] if t == 1 else TASK_IDS["text"] if t == 7 else 0 for t in task_row0],
                         [0, 0, TASK_IDS["ocr"], TASK_IDS["ocr"], 0, 0, 0, 0, 0, 0]], np.int32)
    batch = dict(tokens=tokens, answer_ids=answer_ids, task_ids=task_ids,
                 segment_ids=(tokens != 0).astype(np.int32))
    preds = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], axis=1)  # position i predicts i+1
    preds[0, 7] = 99  # the second token of the text answer (position 8) is wrong
    acc = answer_accuracy(preds, batch)
    assert acc["count"] == (1, 1) and acc["text"] == (0, 1) and acc["ocr"] == (1, 1)
    assert acc["all"] == (2, 3) and acc["caption"] == (0, 0)
    # logits give the same counts as their argmax
    logits = np.eye(100, dtype=np.float32)[preds]
    assert answer_accuracy(logits, batch) == acc
    # a wrong prediction outside the answers changes nothing
    preds[0, 4] = 98
    assert answer_accuracy(preds, batch) == acc
    summed = add_counts(acc, acc)
    assert summed["all"] == (4, 6) and summed["caption"] == (0, 0)
    m = accuracy_metrics(summed)
    assert m["answer_acc/count"] == 1.0 and m["answer_acc/text"] == 0.0 and "answer_acc/caption" not in m
