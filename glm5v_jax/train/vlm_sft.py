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
     every one of its target tokens is the argmax of the main head), at step 0 (the starting
     checkpoint's score) and every `eval_every` steps; `eval_table.md` compares them at the end.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.data import conversations
from glm5v_jax.data.tokenizer import Tokenizer
from glm5v_jax.train import run as run_lib
from glm5v_jax.train import vlm_pretrain
from glm5v_jax.train.init_from import parse_init_from
from glm5v_jax.train.parallel import MeshPlan, TrainProgram, global_batch, under_rules
from glm5v_jax.paths import as_path

log = logging.getLogger(__name__)
SFT_KEYS = ("task_ids", "answer_ids")


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


def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> run_lib.Job:
    tokenizer = sft_tokenizer(config, workdir)
    sources, weights, tokenizer = vlm_pretrain.prepare_data(config.data, workdir, tokenizer=tokenizer)
    vlm_pretrain.check_eval_parts(config, sources)
    config = vlm_pretrain.resolve_model_config(config, tokenizer)
    vlm_pretrain.save_tokenizer(tokenizer, workdir)
    mj = vlm_pretrain.build_model_job(config, plan)
    sft = dict(document_kind="sft", sft_min_turns=int(config.data.sft.min_turns),
               sft_max_turns=int(config.data.sft.max_turns), sft_system_prob=float(config.data.sft.system_prob),
               sft_text_turn_prob=float(config.data.sft.text_turn_prob))
    train_iter = vlm_pretrain.make_iterator(config.data, sources["train"], weights, tokenizer, mj.spec,
                                            seed=config.seed, train=True, **sft)
    evaluate_step = eval_fn(mj, config, plan)
    keys = vlm_pretrain.BATCH_KEYS

    def evaluate(state) -> dict:
        batches = vlm_pretrain.make_iterator(config.data, sources["eval"], weights, tokenizer, mj.spec, seed=0,
                                             train=False, **sft)
        acc, counts = {}, {}
        for i, batch in enumerate(batches):
            if i >= config.data.eval_batches:
                break
            metrics, pred = evaluate_step(state, global_batch({k: batch[k] for k in keys if k in batch},
                                                              mj.batch_shardings))
            acc = run_lib.average(acc, metrics)
            counts = conversations.add_counts(counts, conversations.answer_accuracy(
                np.asarray(jax.device_get(pred)), {k: batch[k] for k in ("tokens", "segment_ids") + SFT_KEYS}))
        out = {f"eval/{k}": float(v.compute()) for k, v in acc.items()}
        out.update({f"eval/{k}": v for k, v in conversations.accuracy_metrics(counts).items()})
        out.update({f"eval/answers/{task}": float(total) for task, (_, total) in counts.items() if total})
        return out


    return mj.job(config, plan, train_iter, evaluate if config.eval_every else None,
                  fingerprints={"data.tokenizer": tokenizer.sha256})


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True
                     ) -> TrainProgram:
    """SFT runs the pre-training step on the same batch contract (`task_ids` / `answer_ids` stay on
    the host): the same abstract program."""
    return vlm_pretrain.abstract_program(config, devices, update_rms=update_rms)
