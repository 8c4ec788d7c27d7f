"""Stage: supervised fine-tuning of the VLM on multi-turn chat conversations (report 2.3).

The pre-training stage's model, optimizer and step (`vlm_pretrain.build_model_job`) with its own
data and evaluation; the run layer (`glm5v_jax.train.run`) does the loop, checkpoints, resume,
`init_from` (normally the whole model of a pre-training run: `--config.init_from=RUN`) and writers:
  data: shapes-world records as multi-turn GLM chats (`glm5v_jax.data.conversations`: system, user
     turns with the image, assistant answers about count, colour, position, grounding boxes, OCR,
     captions, and text-only turns), packed with segment ids; loss on assistant tokens only
     (answers and the assistant's closing token)
  -> the tokenizer of the `init_from` run (its `tokenizer.model`), so ids and vocabulary match
  -> evaluate: validation losses and teacher-forced answer accuracy per task (an answer counts when
     every one of its target tokens is the argmax of the main head, `eval/answer_acc/<task>`), and
     generated-answer accuracy (`eval/generated/<task>`, `eval/generated/ocr_similarity`): the first
     `data.eval_generate_examples` answers of each scored task in the same batches, answered greedily
     from their prompt (the chat template and earlier turns, as trained; the image) up to the closing
     token or `data.eval_generate_max_new_tokens`, decoded and scored (`conversations.GENERATED_SCORING`);
     and the RL task families' reward and pass@k (`eval/rl/<family>/...`, `glm5v_jax.rl.evaluate`,
     `config.rl_eval`); at step 0 (the starting checkpoint's score) and every `eval_every` steps;
     `eval_table.md` compares them at the end.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.data import conversations
from glm5v_jax.data.packed_batches import SFT_KEYS  # the SFT batch's extra per-token keys
from glm5v_jax.data.tokenizer import Tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.generate.offline import generate
from glm5v_jax.generate.requests import IMAGE_KEYS, Sampling  # one image slot's arrays
from glm5v_jax.train import run as run_lib
from glm5v_jax.train import vlm_pretrain
from glm5v_jax.init_from import parse_init_from
from glm5v_jax.train.parallel import MeshPlan, TrainProgram, global_batch, under_rules
from glm5v_jax.paths import as_path
from glm5v_jax.rl import evaluate as rl_evaluate

log = logging.getLogger(__name__)


def sft_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path) -> Tokenizer | None:
    """The tokenizer the model was trained with: config.data.tokenizer, else the `init_from` run's
    `tokenizer.model`, else this run's own (a resumed run), else None (`tokenizer_from_config`
    trains one on the shapes-world texts)."""
    if config.data.tokenizer:
        return Tokenizer(as_path(config.data.tokenizer))
    candidates = [as_path(workdir) / vlm_pretrain.TOKENIZER_FILE]
    if config.get("init_from", ""):
        candidates.insert(0, as_path(parse_init_from(config.init_from).workdir) / vlm_pretrain.TOKENIZER_FILE)
    for path in candidates:
        if path.exists():
            log.info("tokenizer %s", path)
            return Tokenizer(path)
    return None


def eval_fn(mj: vlm_pretrain.ModelJob, config: ml_collections.ConfigDict, plan: MeshPlan):
    """`(state, batch) -> (loss metrics, main-head argmax [B, S])` jitted on the mesh: the
    pre-training eval step with predictions."""
    pure = vlm_pretrain.eval_step_fn(mj.placed.graphdef, config, predictions=True)
    replicated = NamedSharding(plan.mesh, P())
    return jax.jit(under_rules(pure, plan), in_shardings=(mj.placed.shardings, dict(mj.batch_shardings)),
                   out_shardings=(replicated, replicated))


# ----------------------------------------------------------------------------- generated answers
def generation_settings(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(answers generated per scored task, most new tokens per answer) from config.data; (0, _): off."""
    n = config.data.get("eval_generate_examples", 0)
    max_new = config.data.get("eval_generate_max_new_tokens", 48)
    for field, value, low in (("eval_generate_examples", n, 0), ("eval_generate_max_new_tokens", max_new, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"config.data.{field}", f"expected an integer >= {low}, got {value!r}"
                              + (" (0 turns generated answers off)" if low == 0 else ""))
    return n, max_new


def take_answer_prompts(batch: dict, tokenizer: Tokenizer, wanted: dict[str, int]) -> list[tuple]:
    """(AnswerPrompt, its image arrays) for the answers of `batch` whose task still `wanted` (task ->
    how many more; decremented)."""
    out = []
    if not any(wanted.values()):
        return out
    for p in conversations.answer_prompts(batch, begin_image_id=tokenizer.begin_image_id,
                                          closing_ids=(tokenizer.user_id, tokenizer.eos_id)):
        if wanted.get(p.task, 0) > 0:
            wanted[p.task] -= 1
            slots = list(p.image_slots)
            out.append((p, {k: np.asarray(batch[k])[slots] for k in IMAGE_KEYS}))
    return out


def generate_answers(model: nnx.Module, items: Sequence[tuple], tokenizer: Tokenizer, *, rows: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers (decoded, closing token left out) to `items` ((AnswerPrompt, image arrays)),
    `rows` prompts per `generate` call (bounds the prefill's `[rows, prompt, vocab]` logits); the last
    call is padded with repeats and every call gets the same capacity, so all calls, and the next
    evaluation's (the same prompts), have the same shapes."""
    stops = (tokenizer.user_id, tokenizer.eos_id)
    capacity = max(len(p.prompt) for p, _ in items) + max_new_tokens
    rows = min(rows, len(items))
    answers = []
    for start in range(0, len(items), rows):
        chunk = list(items[start:start + rows])
        padded = chunk + [chunk[-1]] * (rows - len(chunk))
        images = [im for _, im in padded if len(im["image_valid"])]
        arrays = {k: np.concatenate([im[k] for im in images]) for k in IMAGE_KEYS} if images else None
        out = generate(model, [p.prompt.tolist() for p, _ in padded], images=arrays, max_new_tokens=max_new_tokens,
                       stop_ids=stops, capacity=capacity)
        for r in range(len(chunk)):
            toks = out.tokens[r, :out.count[r]].tolist()
            end = next((i for i, t in enumerate(toks) if t in stops), len(toks))
            answers.append(tokenizer.decode(toks[:end]))
    return answers


def generated_answer_metrics(model: nnx.Module, items: Sequence[tuple], tokenizer: Tokenizer, *, rows: int,
                             max_new_tokens: int) -> dict[str, float]:
    """`eval/generated/<task>` (accuracy; `eval/generated/ocr_similarity` too) and
    `eval/generated_answers/<task>` (how many) of the greedy answers to `items` (`take_answer_prompts`)."""
    t0 = time.time()
    answers = generate_answers(model, items, tokenizer, rows=rows, max_new_tokens=max_new_tokens)
    scores = [(p.task, conversations.score_generated(p.task, answer, tokenizer.decode(p.reference)))
              for (p, _), answer in zip(items, answers)]
    out = {f"eval/{k}": v for k, v in conversations.generated_metrics(scores).items()}
    for task in conversations.GENERATED_SCORING:
        n = sum(t == task for t, _ in scores)
        if n:
            out[f"eval/generated_answers/{task}"] = float(n)
    log.info("generated-answer evaluation: %d answers in %.1f s", len(items), time.time() - t0)
    return out


# ----------------------------------------------------------------------------- RL task families
def rl_eval_settings(config: ml_collections.ConfigDict) -> dict | None:
    """`rl.evaluate.evaluate` keyword arguments from config.rl_eval; None when off (0 prompts, several
    processes: the engine runs on one host)."""
    block = config.get("rl_eval", None)
    if block is None or not block.prompts:
        return None
    if jax.process_count() > 1:
        log.warning("the RL family evaluation runs on one host only: off with %d processes", jax.process_count())
        return None
    for field, low in (("prompts", 0), ("n", 1), ("max_new_tokens", 1)):
        if int(block[field]) < low:
            raise ConfigError(f"rl_eval.{field}", f"must be >= {low}, got {block[field]}")
    families = [f for f in str(block.families).split(",") if f] or None
    rl_evaluate.family_tasks(families, 0)  # an unknown family name is refused before training
    return dict(families=families, prompts=int(block.prompts), n=int(block.n),
                max_new_tokens=int(block.max_new_tokens), sampling=Sampling(float(block.temperature), seed=0))


def rl_eval_metrics(model: nnx.Module, tokenizer: Tokenizer, settings: dict) -> dict[str, float]:
    """`eval/rl/<family>/reward_mean` and `.../pass@k` (and the `all` aggregate) of the model now."""
    t0 = time.time()
    ev = rl_evaluate.evaluate(model, tokenizer, **settings)
    log.info("RL family evaluation: %d answers in %.1f s", len(ev.samples), time.time() - t0)
    return {f"eval/rl/{k}": v for k, v in ev.summary.items() if k.endswith("/reward_mean") or "/pass@" in k}


def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> run_lib.Job:
    n_generate, max_new = generation_settings(config)
    if n_generate and jax.process_count() > 1:  # each host holds other eval rows; generate() is one-host
        log.warning("generated-answer evaluation runs on one host only: off with %d processes",
                    jax.process_count())
        n_generate = 0
    tokenizer = sft_tokenizer(config, workdir)
    sources, weights, tokenizer = vlm_pretrain.prepare_data(config.data, workdir, tokenizer=tokenizer)
    vlm_pretrain.check_eval_parts(config, sources)
    config = vlm_pretrain.resolve_model_config(config, tokenizer)
    vlm_pretrain.save_tokenizer(tokenizer, workdir)
    mj = vlm_pretrain.build_model_job(config, plan)
    sft = dict(document_kind="sft", sft_min_turns=int(config.data.sft.min_turns),
               sft_max_turns=int(config.data.sft.max_turns), sft_system_prob=float(config.data.sft.system_prob),
               sft_text_turn_prob=float(config.data.sft.text_turn_prob),
               sft_tasks=tuple(t for t in str(config.data.sft.get("tasks", "")).split(",") if t))
    sft["row_shards"] = mj.row_shards(config.data)  # (joint packing balances the rows over them)
    train_iter = vlm_pretrain.make_iterator(config.data, sources["train"], weights, tokenizer, mj.spec,
                                            seed=config.seed, train=True, **sft)
    evaluate_step = eval_fn(mj, config, plan)
    keys = vlm_pretrain.BATCH_KEYS

    def evaluate(state) -> dict:
        batches = vlm_pretrain.make_iterator(config.data, sources["eval"], weights, tokenizer, mj.spec, seed=0,
                                             train=False, **sft)
        acc, counts, prompts = {}, {}, []
        wanted = dict.fromkeys(conversations.GENERATED_SCORING, n_generate)
        for i, batch in enumerate(batches):
            if i >= config.data.eval_batches:
                break
            metrics, pred = evaluate_step(state, global_batch({k: batch[k] for k in keys if k in batch},
                                                              mj.batch_shardings))
            acc = run_lib.average(acc, metrics)
            counts = conversations.add_counts(counts, conversations.answer_accuracy(
                np.asarray(jax.device_get(pred)), {k: batch[k] for k in ("tokens", "segment_ids") + SFT_KEYS}))
            prompts += take_answer_prompts(batch, tokenizer, wanted)
        out = {f"eval/{k}": float(v.compute()) for k, v in acc.items()}
        out.update({f"eval/{k}": v for k, v in conversations.accuracy_metrics(counts).items()})
        out.update({f"eval/answers/{task}": float(total) for task, (_, total) in counts.items() if total})
        if prompts:  # the model over the state as it is (sharded on the run's mesh; generate() follows it)
            model = nnx.merge(mj.placed.graphdef, state).model
            out.update(generated_answer_metrics(model, prompts, tokenizer, rows=n_generate, max_new_tokens=max_new))
        return out


    rl_settings = rl_eval_settings(config)

    def evaluate_all(state) -> dict:
        out = evaluate(state)
        if rl_settings is not None:
            out.update(rl_eval_metrics(nnx.merge(mj.placed.graphdef, state).model, tokenizer, rl_settings))
        return out

    return mj.job(config, plan, train_iter, evaluate_all if config.eval_every else None,
                  fingerprints={"data.tokenizer": tokenizer.sha256})


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True
                     ) -> TrainProgram:
    """SFT runs the pre-training step on the same batch contract (`task_ids` / `answer_ids` stay on
    the host): the same abstract program."""
    return vlm_pretrain.abstract_program(config, devices, update_rms=update_rms)
