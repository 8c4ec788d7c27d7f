"""Chat messages in the GLM template: a rendered prompt is the prefix of training's chat document for the
same turns (system, image, multi-turn); image parts are preprocessed as `image_inputs` does; bad messages
are refused naming the message; the engine takes `Request(messages=...)` and `extend(messages=...)` and
gives the tokens of the same prompt given as ids."""
from __future__ import annotations


import numpy as np
import pytest

from glm5v_jax.data.templates import chat_document
from glm5v_jax.generate.chat import chat_prompt, chat_stops, chat_tokens, image_inputs, render_messages
from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Request
from helpers import chat_model, chat_tokenizer, png


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_model(tokenizer)


def _prefix_until_answer(ids: np.ndarray, tokenizer, answer: int) -> list[int]:
    """Training's document up to (and with) the `<|assistant|>\\n` that opens answer `answer` (1-based)."""
    ids = ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == tokenizer.assistant_id]
    return ids[:starts[answer - 1] + 1 + len(tokenizer.encode("\n"))]


def test_a_rendered_prompt_is_the_prefix_of_trainings_document(tokenizer):
    t = tokenizer
    a1, a2 = t.encode("Two circles."), t.encode("red")
    doc, _, _ = chat_document(t, [("How many circles?", a1), ("What colour is the square?", a2)], n_image_tokens=6,
                              system="Answer briefly.")
    first = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    assert chat_tokens(t, first, [6]) == _prefix_until_answer(doc, t, 1)
    assert chat_prompt(t, "How many circles?", image_tokens=6, system="Answer briefly.") == chat_tokens(t, first, [6])
    both = first + [{"role": "assistant", "content": "Two circles."},
                    {"role": "user", "content": "What colour is the square?"}]
    assert chat_tokens(t, both, [6]) == _prefix_until_answer(doc, t, 2)
    # an assistant message last: the model continues it (no new <|assistant|>)
    assert chat_tokens(t, both[:3], [6]) == _prefix_until_answer(doc, t, 1) + a1
    text_doc, _, _ = chat_document(t, [("Hello", t.encode("hi"))])
    assert chat_prompt(t, "Hello") == _prefix_until_answer(text_doc, t, 1)


def test_continuation_and_stops(tokenizer):
    t = tokenizer
    turn = [{"role": "observation", "content": "result: 3"}]
    ids = chat_tokens(t, turn, start=False)
    assert ids[0] == t.observation_id and t.gmask_id not in ids and ids[-1 - len(t.encode("\n"))] == t.assistant_id
    assert chat_tokens(t, turn, start=False, after=t.observation_id) == ids[1:]  # the stop already opened it
    assert chat_tokens(t, turn, start=False, after=t.user_id) == ids
    assert set(chat_stops(t)) == {t.eos_id, t.user_id, t.observation_id}


def test_image_parts_are_preprocessed_as_in_training(tokenizer, model):
    t, spec = tokenizer, model.spec
    messages = [{"role": "user", "content": [{"type": "image", "image": png(0, (24, 40))}, "Compare with",
                                             {"type": "image", "image": png(1, (32, 32))}]}]
    ids, images = render_messages(t, messages, spec)
    (a, n0), (b, n1) = image_inputs(png(0, (24, 40)), spec), image_inputs(png(1, (32, 32)), spec)
    assert ids == chat_tokens(t, [{"role": "user", "content": [{"type": "image"}, "Compare with", {"type": "image"}]}],
                              [n0, n1])
    assert ids.count(t.image_id) == n0 + n1 and ids.count(t.begin_image_id) == 2
    for k in a:
        np.testing.assert_array_equal(images[k], np.concatenate([a[k], b[k]]))
    assert render_messages(t, [{"role": "user", "content": "hi"}], spec)[1] is None


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    (["hello"], r"messages\[0\] must be a mapping"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role must be one of"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string or a list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "video"}]}],
     r"messages\[1\]\.content\[0\] must be text"),
    ([{"role": "system", "content": [{"type": "image", "image": b""}]}], "a system message takes no image"),
    ([{"role": "user", "content": ["a", {"type": "image", "image": b"not an image"}]}],
     r"messages\[0\]: the image cannot be used"),
])
def test_bad_messages_are_refused_by_name(tokenizer, model, messages, match):
    with pytest.raises(ValueError, match=match):
        render_messages(tokenizer, messages, model.spec)


def test_image_sizes_must_match_the_image_parts(tokenizer):
    with pytest.raises(ValueError, match="more image parts"):
        chat_tokens(tokenizer, [{"role": "user", "content": [{"type": "image"}]}], [])
    with pytest.raises(ValueError, match="fewer image parts"):
        chat_tokens(tokenizer, [{"role": "user", "content": "x"}], [4])


def test_the_engine_takes_messages(tokenizer, model):
    t = tokenizer
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": png(2, (24, 40))}, "What is drawn?"]}]
    follow_up = [{"role": "user", "content": [{"type": "image", "image": png(3, (32, 24))}, "And here?"]}]
    stops = [t.user_id]

    def run(first: Request, second: dict) -> list[int]:
        engine = Engine(model, max_slots=2, max_seq_len=128, page_size=8, max_chunk=64, steps=4, tokenizer=t)
        rid = engine.submit(first)
        engine.run()
        engine.extend(rid, **second)
        (done,) = engine.run()
        return done.samples[0].tokens

    ids, images = render_messages(t, messages, model.spec)
    got = run(Request(messages=messages, max_new_tokens=6, stop=stops, keep=True),
              dict(messages=follow_up, max_new_tokens=5))
    # the same conversation as ids (the follow-up's <|user|> is not repeated after a <|user|> stop)
    engine = Engine(model, max_slots=2, max_seq_len=128, page_size=8, max_chunk=64, steps=4, tokenizer=t)
    rid = engine.submit(Request(ids, images, max_new_tokens=6, stop=stops, keep=True))
    (held,) = engine.run()
    last = held.samples[0].tokens[-1]
    more, more_images = render_messages(t, follow_up, model.spec, start=False, after=last)
    engine.extend(rid, more, more_images, max_new_tokens=5)
    (done,) = engine.run()
    assert got == done.samples[0].tokens and len(got) > len(held.samples[0].tokens)

    with pytest.raises(ValueError, match="messages need the engine's tokenizer"):
        Engine(model, max_slots=1, max_seq_len=64, page_size=8).submit(Request(messages=messages))
    with pytest.raises(ValueError, match="not both"):
        engine.submit(Request([5, 6], messages=messages))
    with pytest.raises(ValueError, match=r"request \d+: messages\[1\]: the image cannot be used"):
        engine.submit(Request(messages=[messages[0], {"role": "user", "content": [{"type": "image", "image": b"x"}]}]))
