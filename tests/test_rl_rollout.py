"""The rollout driver: a 3-turn crop-tool episode and a 1-turn VQA episode run through the same driver, and
their tokens and loss masks equal a golden rendering (a scripted policy); on the real engine, a 3-turn
episode with images appended by observations keeps the engine's tokens, so the trainer's log-probabilities
of the episode's tokens equal the rollout's `logp_raw` on the masked positions; a group of n single-turn
samples is one request; a conversation that outgrows the engine ends with finish "capacity"."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.data import shapes_world
from glm5v_jax.generate.chat import chat_stops, chat_tokens, image_inputs
from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Completion, Sample, Sampling
from glm5v_jax.rl import tools
from glm5v_jax.rl.gym import SingleTurnEnv, first_messages
from glm5v_jax.rl.rollout import RolloutDriver
from glm5v_jax.rl.types import Task
from helpers import chat_model, chat_tokenizer, png


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_model(tokenizer)



class ScriptedEngine:
    """The engine's interface with a scripted policy: request r answers `script[r][turn]` (token ids, the
    stop included), one turn per step. Records the tokens it was fed (as the real engine's cache holds them)."""

    def __init__(self, spec, scripts: list[list[list[int]]]):
        self.spec, self.scripts, self.capacity = spec, scripts, 1 << 16
        self.fed: dict[int, list[int]] = {}
        self.samples: dict[int, list[Sample]] = {}
        self.turn: dict[int, int] = {}
        self.ready: list[int] = []
        self.released: set[int] = set()

    @property
    def idle(self) -> bool:
        return not self.ready

    def submit(self, request) -> int:
        rid = len(self.fed)
        self.fed[rid] = list(request.tokens)
        self.samples[rid] = [Sample() for _ in range(request.n)]
        self.turn[rid] = 0
        self.ready.append(rid)
        return rid

    def extend(self, rid, tokens, images=None, *, max_new_tokens=None):
        self.fed[rid] += [self.samples[rid][0].tokens[-1], *tokens]
        self.ready.append(rid)

    def release(self, rid):
        assert rid not in self.released, "released twice"
        self.released.add(rid)

    def step(self):
        done = []
        for rid in self.ready:
            answer = self.scripts[rid][self.turn[rid]]
            self.turn[rid] += 1
            self.fed[rid] += answer[:-1]  # decoding feeds each sampled token but the last
            for i, s in enumerate(self.samples[rid]):
                s.tokens += answer
                s.logp_raw += [-0.5 - i] * len(answer)
                s.logp_sampled += [-0.25] * len(answer)
                s.versions += [7] * len(answer)
                s.finish = "stop"
            done.append(Completion(rid, len(self.fed[rid]), [s.copy() for s in self.samples[rid]]))
        self.ready = []
        return done


def _call(box) -> str:
    return f"<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>{list(box)}</arg_value>\n</tool_call>"


def test_tool_and_vqa_episodes_equal_the_golden_rendering(tokenizer, model):
    t, spec = tokenizer, model.spec
    image = shapes_world.generate_image_example(0, "validation", 0)["image"]
    crop_task = Task("crop-0", "tools/test", "What is the word?", (image,), {"answer": "x"}, max_turns=3,
                     tools=("crop",))
    vqa_task = Task("vqa-0", "shapes/test", "How many shapes?", (image,), {"answer": "2"})
    answers = [t.encode(_call((0, 0, 500, 500))) + [t.observation_id],
               t.encode(_call((100, 100, 400, 400))) + [t.observation_id],
               t.encode("cat") + [t.eos_id]]
    engine = ScriptedEngine(spec, [answers, [t.encode("2") + [t.eos_id]]])
    driver = RolloutDriver(engine, t, max_new_tokens=32)
    crop, vqa = driver.run([crop_task, vqa_task], n=1)

    # golden: render the same conversation by hand, turn by turn
    images = [image]
    _, n0 = image_inputs(image, spec)
    want = chat_tokens(t, first_messages(crop_task, tools.describe_tools(("crop",))), [n0])
    mask = [False] * len(want)
    for turn, answer in enumerate(answers):
        want += answer
        mask += [True] * len(answer)
        if turn == 2:
            break
        text = t.decode([x for x in answer if x not in chat_stops(t)])
        result = tools.call_tools(text, images, ("crop",))
        assert result is not None and result.error is None and len(result.images) == 1
        images += result.images
        obs = [{"role": "observation", "content": [{"type": "image", "image": result.images[0]}, result.text]}]
        more = chat_tokens(t, obs, [image_inputs(result.images[0], spec)[1]], start=False, after=answer[-1])
        want += more
        mask += [False] * len(more)
    assert crop.tokens == want and crop.loss_mask == mask
    assert engine.fed[0] == want[:-1]  # the engine saw exactly the booked tokens
    assert crop.answers[-1] == "cat" and crop.response == "cat" and crop.info["turns"] == 3
    assert crop.info["tool_calls"] == 2 and crop.info["tool_errors"] == 0
    assert len(crop.image_slots) == 3 and crop.tokens.count(t.image_id) == sum(
        image_inputs(im, spec)[1] for im in images)
    gen = np.asarray(crop.loss_mask)
    assert np.all(np.asarray(crop.logp_raw)[gen] == -0.5) and np.all(np.asarray(crop.logp_raw)[~gen] == 0)
    assert set(np.asarray(crop.versions)[gen]) == {7} and set(np.asarray(crop.versions)[~gen]) == {-1}

    vqa_want = chat_tokens(t, first_messages(vqa_task), [n0])
    assert vqa.tokens == vqa_want + t.encode("2") + [t.eos_id]
    assert vqa.loss_mask == [False] * len(vqa_want) + [True] * (len(t.encode("2")) + 1)
    assert vqa.response == "2" and vqa.info == {"turns": 1}
    assert engine.released == {0}  # the held conversation is freed once; the single turn was never held


class EchoEnv:
    """Answers every turn with an observation holding a new image, for `turns` turns."""

    def __init__(self, turns=3):
        self.turns = turns

    def reset(self, task):
        self.n = 0
        return first_messages(task)

    def step(self, text):
        self.n += 1
        if self.n >= self.turns:
            return None, True, {"turns": self.n}
        return [{"role": "observation", "content": [{"type": "image", "image": png(10 + self.n, (24, 32))},
                                                    f"result {self.n}"]}], False, {"turns": self.n}


@nnx.jit
def _log_softmax(model, batch):
    return jax.nn.log_softmax(model(batch)["logits"], axis=-1)


def _trainer_logps(model, tokens, images) -> np.ndarray:
    """log p(tokens[p] | tokens[:p]) from one full forward (0 at p = 0)."""
    width = 1 << (len(tokens) - 1).bit_length()
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(tokens)] = tokens
    seg = (np.arange(width) < len(tokens)).astype(np.int32)[None]
    extra = {k: jnp.asarray(v) for k, v in (images or {}).items()}
    logp = np.asarray(_log_softmax(model, {"tokens": jnp.asarray(ids), "segment_ids": jnp.asarray(seg), **extra}))
    out = np.zeros(len(tokens))
    out[1:] = logp[0, np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return out


def test_real_engine_episodes_keep_the_engines_tokens(tokenizer, model):
    t = tokenizer
    engine = Engine(model, max_slots=4, max_seq_len=256, page_size=8, max_chunk=64, steps=4)
    tasks = [Task(f"echo-{i}", "test/echo", f"Look {i}.", (png(i),), max_turns=3) for i in range(2)]
    driver = RolloutDriver(engine, t, max_new_tokens=5, sampling=Sampling(temperature=1.0, seed=3),
                           env_factory=lambda task: EchoEnv())
    episodes = driver.run(tasks, n=2)
    assert [(e.task.uid, e.index) for e in episodes] == [("echo-0", 0), ("echo-0", 1), ("echo-1", 0), ("echo-1", 1)]
    for e in episodes:
        assert len(e.answers) == 3 and len(e.image_slots) == 3
        merge = model.spec.vision.merge_size
        assert e.tokens.count(t.image_id) == sum(int(np.prod(s["image_grid"][0])) // merge**2 for s in e.image_slots)
        mask = np.asarray(e.loss_mask)
        assert mask.sum() == len(e.logp_raw) - (~mask).sum() and mask[:e.prompt_length].sum() == 0
        want = _trainer_logps(model, e.tokens, e.images)
        np.testing.assert_allclose(np.asarray(e.logp_raw)[mask], want[mask], atol=2e-5)
    assert episodes[0].tokens != episodes[1].tokens  # two samples of one task differ
    assert engine.metrics()["held"] == 0 and engine.pool.free_pages == engine.pool.num_pages

    driver = RolloutDriver(engine, t, max_new_tokens=5, sampling=Sampling(temperature=1.0, seed=3))
    group = driver.run([Task("vqa", "test/vqa", "Describe.", (png(5),))], n=3)
    assert engine.metrics()["requests"] == 4 + 1  # the 3 single-turn samples were one request
    for e in group:
        assert len(e.answers) == 1 and e.info == {"turns": 1}
        want = _trainer_logps(model, e.tokens, e.images)
        np.testing.assert_allclose(np.asarray(e.logp_raw)[e.loss_mask], want[e.loss_mask], atol=2e-5)


def test_a_conversation_that_outgrows_the_engine_ends_with_capacity(tokenizer, model):
    engine = Engine(model, max_slots=2, max_seq_len=64, page_size=8, max_chunk=64, steps=4)
    driver = RolloutDriver(engine, tokenizer, max_new_tokens=4, env_factory=lambda task: EchoEnv(turns=10))
    (episode,) = driver.run([Task("long", "test/echo", "Look.", (png(0),), max_turns=10)])
    assert episode.finish == episode.info["truncated"] == "capacity" and len(episode.answers) > 1
    assert engine.metrics()["held"] == 0 and engine.pool.free_pages == engine.pool.num_pages


def test_aborted_episodes_resume_where_they_stopped(tokenizer, model):
    """Abort mid-answer (a multi-turn episode and a single-turn group), then resume: partial answers are
    kept with their logprobs, no page is held while aborted, the turns keep their budgets, and the resumed
    episodes' logp_raw still equal the trainer's log-probabilities of their tokens."""
    t = tokenizer
    engine = Engine(model, max_slots=4, max_seq_len=256, page_size=8, max_chunk=64, steps=2)
    ended = []
    driver = RolloutDriver(engine, t, max_new_tokens=6, sampling=Sampling(temperature=1.0, seed=5),
                           env_factory=lambda task: EchoEnv() if task.max_turns > 1 else SingleTurnEnv(),
                           on_episode=ended.append)
    tasks = [Task("echo", "test/echo", "Look.", (png(1),), max_turns=3), Task("vqa", "test/vqa", "Say.", (png(2),))]
    episodes = driver.start(tasks, n=2)
    driver.step()
    driver.step()  # prefill, then a few tokens of every answer
    aborted = driver.abort()
    assert {id(e) for e in aborted} == {id(e) for e in episodes} - {id(e) for e in ended}
    assert aborted and all(e.finish == "abort" and not e.done and e.info["aborts"] == 1 for e in aborted)
    assert driver.in_flight == [] and engine.pool.free_pages == engine.pool.num_pages
    assert any(any(e.loss_mask) for e in aborted)  # some were stopped mid-answer, their tokens kept
    partial = {id(e): len(e.tokens) for e in aborted}
    driver.resume(aborted)
    while not all(e.done for e in episodes):
        driver.step()
    assert sorted(map(id, ended)) == sorted(map(id, episodes))  # on_episode once per episode
    for e in episodes:
        assert len(e.tokens) >= partial.get(id(e), 0) and e.finish in ("stop", "length")
        assert len(e.answers) == (3 if e.task.max_turns > 1 else 1)
        mask = np.asarray(e.loss_mask)
        want = _trainer_logps(model, e.tokens, e.images)
        np.testing.assert_allclose(np.asarray(e.logp_raw)[mask], want[mask], atol=2e-5)
        # a turn's answer never exceeds max_new_tokens, across its abort
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0])))[::2]
        assert runs.max() <= 6
    assert engine.pool.free_pages == engine.pool.num_pages and engine.metrics()["held"] == 0
    with pytest.raises(ValueError, match="was not aborted"):
        driver.resume(episodes[:1])
