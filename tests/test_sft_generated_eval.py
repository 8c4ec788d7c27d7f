"""The SFT stage's generated-answer evaluation on a tiny random model (float32, CPU):

* evaluate reports eval/generated/<task> (and the OCR similarity) in [0, 1] next to the teacher-forced
  accuracy, and they equal an independent recomputation: prompts cut from the eval batches by plain
  loops, greedy answers from full forwards of the growing sequence (no paged cache), decoded, scored;
* with the engine replaced by an oracle that answers every prompt with its reference (it also checks
  the images it is given), every generated accuracy is 1; answering some prompts wrongly gives the
  expected fractions;
* on a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices, the sharded state answers like its
  one-device copy;
* bad settings are refused naming the field, before anything is built.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from flax import nnx

from glm5v_jax.data.answer_scoring import boxes_match, parse_boxes, text_similarity
from glm5v_jax.data.conversations import GENERATED_SCORING, TASK_IDS
from glm5v_jax.data.tokenizer import RUN_FILE, Tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.train import run as run_lib
from glm5v_jax.train import vlm_pretrain, vlm_sft
from helpers import config_module

IMAGE_KEYS = ("patches", "patch_yx", "patch_valid", "image_grid", "image_valid")
TASK_NAMES = {i: t for t, i in TASK_IDS.items()}


def _config(data_dir, *, examples: int, max_new: int, batch_size: int = 2, eval_batches: int = 2, mesh=None):
    cfg = config_module("vlm_sft").get_config("tiny")
    cfg.model.dtype = "float32"  # greedy tokens comparable between the engine and full forwards
    cfg.model.backbone.num_layers, cfg.model.vision.depth = 2, 1  # a dense and a MoE layer (notebooks.SMALL_MODEL)
    cfg.measure_pipeline_batches = 0
    d = cfg.data
    d.data_dir, d.batch_size, d.seq_len, d.tokenizer_vocab_size, d.eval_batches = (str(data_dir), batch_size, 128,
                                                                                  1024, eval_batches)
    d.sources.image.update(train_size=32, eval_size=8)
    d.sources.text.update(train_size=16, eval_size=4)
    d.eval_generate_examples, d.eval_generate_max_new_tokens = examples, max_new
    cfg.rl_eval.prompts = 0  # the RL family evaluation: tested in test_chain and test_rl_evaluate
    cfg.mesh.num_devices = 1 if mesh is None else 8
    if mesh is not None:
        cfg.mesh.shape = mesh
    return cfg


def _setup(cfg, workdir):
    """(job, tokenizer, the job's model as a GLM5V over its state, the eval batches evaluate reads)."""
    workdir = epath.Path(workdir)
    job = vlm_sft.setup(cfg, workdir, run_lib.mesh_plan(cfg))
    tok = Tokenizer(workdir / RUN_FILE)
    resolved = vlm_pretrain.resolve_model_config(cfg, tok)
    spec = vlm_spec_from_config(resolved.model)
    graphdef = nnx.split(nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, job.state["model"])
    sources, weights, _ = vlm_pretrain.prepare_data(cfg.data, workdir, tokenizer=tok)
    s = cfg.data.sft
    it = vlm_pretrain.make_iterator(cfg.data, sources["eval"], weights, tok, spec, seed=0, train=False,
                                    document_kind="sft", sft_min_turns=s.min_turns, sft_max_turns=s.max_turns,
                                    sft_system_prob=s.system_prob, sft_text_turn_prob=s.text_turn_prob)
    batches = [b for _, b in zip(range(cfg.data.eval_batches), it)]
    return job, tok, model, batches


def _examples(batches, tok, per_task: int) -> list[dict]:
    """The first `per_task` complete answers of each scored task, row by row, by plain loops."""
    taken = {t: 0 for t in GENERATED_SCORING}
    out = []
    for batch in batches:
        rows, seq = batch["tokens"].shape
        m = len(batch["image_valid"]) // rows
        for r in range(rows):
            tokens, answers = batch["tokens"][r].tolist(), batch["answer_ids"][r].tolist()
            segments, tasks = batch["segment_ids"][r].tolist(), batch["task_ids"][r].tolist()
            spans: dict[int, list[int]] = {}
            for i, a in enumerate(answers):
                if a:
                    spans.setdefault(a, []).append(i)
            for a in sorted(spans):
                first, last = spans[a][0], spans[a][-1]
                task = TASK_NAMES[tasks[first]]
                if tokens[last] not in (tok.user_id, tok.eos_id) or taken.get(task, per_task) >= per_task:
                    continue
                taken[task] += 1
                start = segments.index(segments[first])
                before = tokens[:start].count(tok.begin_image_id)
                slots = [r * m + before + j for j in range(tokens[start:first].count(tok.begin_image_id))]
                out.append(dict(task=task, prompt=tokens[start:first], reference=tok.decode(tokens[first:last]),
                                images={k: batch[k][slots] for k in IMAGE_KEYS}))
    return out


@nnx.jit
def _logits(model, batch):
    return model(batch)["logits"]


def _greedy(model, example, tok, max_new: int, width: int) -> str:
    """Greedy answer by full forwards of the growing sequence (padded to `width`), stopping at the
    closing tokens: the reference the paged-cache engine must reproduce."""
    seq, new = list(example["prompt"]), []
    for _ in range(max_new):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        batch = dict(tokens=tokens, segment_ids=(np.arange(width) < len(seq)).astype(np.int32)[None],
                     **example["images"])
        t = int(jnp.argmax(_logits(model, jax.tree.map(jnp.asarray, batch))[0, len(seq) - 1]))
        if t in (tok.user_id, tok.eos_id):
            break
        new.append(t)
        seq.append(t)
    return tok.decode(new)


def _score(task: str, answer: str, reference: str) -> tuple[float, float | None]:
    if task == "grounding":
        return float(boxes_match(parse_boxes(answer), parse_boxes(reference))), None
    exact = float(" ".join(answer.split()) == " ".join(reference.split()))
    return exact, (text_similarity(answer, reference) if task == "ocr" else None)


def _expected(examples, answers) -> dict[str, float]:
    out = {}
    for task in GENERATED_SCORING:
        scores = [_score(task, a, e["reference"]) for e, a in zip(examples, answers) if e["task"] == task]
        if scores:
            out[f"eval/generated/{task}"] = float(np.mean([s for s, _ in scores]))
            out[f"eval/generated_answers/{task}"] = float(len(scores))
            if task == "ocr":
                out["eval/generated/ocr_similarity"] = float(np.mean([s for _, s in scores]))
    return out


def _generated(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("eval/generated/", "eval/generated_answers/"))}


def _capture(monkeypatch) -> list:
    """The decoded answers of every `generate_answers` call, appended to the returned list."""
    seen, real = [], vlm_sft.generate_answers

    def spy(*args, **kwargs):
        answers = real(*args, **kwargs)
        seen.append(answers)
        return answers

    monkeypatch.setattr(vlm_sft, "generate_answers", spy)
    return seen


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sft_gen_data")


@pytest.fixture(scope="module")
def one_device(data_dir, tmp_path_factory):
    per_task, max_new = 2, 10
    job, tok, model, batches = _setup(_config(data_dir, examples=per_task, max_new=max_new),
                                      tmp_path_factory.mktemp("sft_gen_run"))
    return job, tok, model, batches, per_task, max_new


def test_generated_metrics_equal_an_independent_recomputation(one_device, monkeypatch):
    job, tok, model, batches, per_task, max_new = one_device
    seen = _capture(monkeypatch)
    metrics = job.evaluate(job.state)
    examples = _examples(batches, tok, per_task)
    assert len({e["task"] for e in examples}) >= 4 and len(examples) >= 6  # count, colour, grounding, ...
    assert all(len(e["images"]["image_valid"]) == 1 for e in examples)  # every prompt carries its image
    answers = [_greedy(model, e, tok, max_new, width=128 + max_new) for e in examples]
    assert seen == [answers]  # the engine's greedy answers, prompt by prompt
    got, want = _generated(metrics), _expected(examples, answers)
    assert got.keys() == want.keys() and "eval/generated/ocr_similarity" in got
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert all(0.0 <= v <= 1.0 for k, v in got.items() if k.startswith("eval/generated/"))
    assert "eval/answer_acc/grounding" in metrics and "eval/loss/main" in metrics  # teacher-forced ones stay


def _oracle(examples, tok, wrong: set[int]):
    """A stand-in for the engine: answers a prompt with its reference's tokens and `<|user|>` (with
    "zz" for the examples numbered in `wrong`), after checking the images it is given."""
    by_prompt = {tuple(e["prompt"]): (i, e) for i, e in enumerate(examples)}

    def generate(model, prompts, *, images=None, max_new_tokens=32, stop_ids=(), capacity=None, **kw):
        del model, kw
        assert set(stop_ids) == {tok.user_id, tok.eos_id} and capacity > max(len(p) for p in prompts)
        found = [by_prompt[tuple(p)] for p in prompts]
        for key in IMAGE_KEYS:
            np.testing.assert_array_equal(images[key], np.concatenate([e["images"][key] for _, e in found]))
        rows = [tok.encode("zz" if i in wrong else e["reference"]) + [tok.user_id] for i, e in found]
        tokens = np.zeros((len(rows), max(map(len, rows)) + 3), np.int32)
        for r, ids in enumerate(rows):
            tokens[r, :len(ids)] = ids
        return types.SimpleNamespace(tokens=tokens, count=np.array([len(ids) for ids in rows]))

    return generate


def test_an_oracle_scores_one_and_wrong_answers_count(one_device, monkeypatch):
    job, tok, _, batches, per_task, _ = one_device
    examples = _examples(batches, tok, per_task)
    monkeypatch.setattr(vlm_sft, "generate", _oracle(examples, tok, wrong=set()))
    got = _generated(job.evaluate(job.state))
    perfect = _expected(examples, [e["reference"] for e in examples])
    assert got == perfect and {v for k, v in got.items() if k.startswith("eval/generated/")} == {1.0}
    wrong = set(range(0, len(examples), 2))
    monkeypatch.setattr(vlm_sft, "generate", _oracle(examples, tok, wrong=wrong))
    got = _generated(job.evaluate(job.state))
    answers = ["zz" if i in wrong else e["reference"] for i, e in enumerate(examples)]
    want = _expected(examples, answers)
    assert got == pytest.approx(want) and min(want.values()) < 1.0


def test_sharded_state_answers_like_its_one_device_copy(data_dir, tmp_path, monkeypatch):
    max_new = 4
    cfg = _config(data_dir, examples=1, max_new=max_new, batch_size=4, eval_batches=1, mesh=(2, 2, 2, 1))
    job, tok, model, batches = _setup(cfg, tmp_path)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(job.state["model"]))
    seen = _capture(monkeypatch)
    metrics = job.evaluate(job.state)
    examples = _examples(batches, tok, 1)
    graphdef, state = nnx.split(model)
    local = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    answers = [_greedy(local, e, tok, max_new, width=128 + max_new) for e in examples]
    assert examples and seen == [answers]
    assert _generated(metrics) == pytest.approx(_expected(examples, answers))


def test_off_and_bad_settings_are_refused_before_anything_is_built(data_dir, tmp_path):
    cfg = _config(data_dir, examples=0, max_new=4)
    assert vlm_sft.generation_settings(cfg) == (0, 4)  # 0: evaluate asks for no prompt
    for field, value in (("eval_generate_examples", -1), ("eval_generate_examples", True),
                         ("eval_generate_max_new_tokens", 0), ("eval_generate_max_new_tokens", 2.5)):
        fields = cfg.to_dict()
        fields["data"][field] = value
        bad = ml_collections.ConfigDict(fields)
        with pytest.raises(ConfigError, match=f"config.data.{field}: expected an integer"):
            vlm_sft.setup(bad, epath.Path(tmp_path) / "bad", run_lib.mesh_plan(bad))
        assert not (tmp_path / "bad").exists()
    defaults = config_module("vlm_sft").get_config("tiny").data
    assert defaults.eval_generate_examples == 16 and defaults.eval_generate_max_new_tokens == 48
