"""Supervised fine-tuning of the VLM on multi-turn chat conversations (after VLM pre-training).

Usage: `--config=configs/vlm_sft.py:<preset>[,option=value,...] --config.init_from=PRETRAIN_RUN`,
e.g. `configs/vlm_sft.py:tiny` after `configs/vlm_pretrain.py:tiny`. `init_from` copies the whole
model of the pre-training run (newest good checkpoint; `RUN@STEP` for another) and the run's
tokenizer comes from that directory; the optimizer starts fresh.

Presets: the model presets of configs/vlm_pretrain.py (`tiny`, `0p5b`) with SFT data, a lower
learning rate and a shorter schedule. The data are shapes-world records rendered as GLM chats
(system, user turns with the image, assistant turns on count, colour, position, grounding, OCR,
captions, and text-only turns); the loss covers assistant tokens only.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from glm5v_jax.config_args import config_file, parse_arg
from glm5v_jax.data.source_registry import source_config

PRESETS = ("tiny", "0p5b")
OPTIONS = dict(
    mmtp="image_token",  # visual_embed | mask | image_token (must match the pre-training run's model)
    optimizer="muon",  # muon | adamw
    seed=0,
    rl_tasks=0.0,  # > 0: mix in the RL families' formats with gold answers at this weight (a source "rl")
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = parse_arg(arg, PRESETS, "tiny", **OPTIONS)
    tiny = opts.preset == "tiny"
    config = config_file(Path(__file__).with_name("vlm_pretrain.py"),
                         f"{opts.preset},mmtp={opts.mmtp},optimizer={opts.optimizer},seed={opts.seed}")
    config.trainer = "vlm_sft"  # glm5v_jax.train.stages.STAGES
    if opts.rl_tasks > 0:  # the shapes world's sources weigh 0.8 (images) and 0.2 (text)
        config.data.sources.rl = source_config("rl_tasks", weight=opts.rl_tasks, train_split="train",
                                               train_size=20_000, eval_split="validation", eval_size=100)
    config.total_steps = 400 if tiny else 5000
    config.eval_every = 100 if tiny else 500
    config.checkpoint_every = 50 if tiny else 1000
    config.measure_pipeline_batches = 0
    config.data.eval_batches = 32 if tiny else 50  # answers per task: enough to compare step 0 with the end
    # Generated-answer accuracy per task (glm5v_jax.train.vlm_sft, eval/generated/<task>): greedy answers to
    # the first eval_generate_examples answers of each scored task (count, colour, position, qa, grounding,
    # ocr) in those batches, at most eval_generate_max_new_tokens tokens each (shapes-world answers take at
    # most about 40 with their closing token: a grounding answer of two boxes). 0 turns it off.
    config.data.eval_generate_examples = 16
    config.data.eval_generate_max_new_tokens = 48
    # Per-family RL evaluation (glm5v_jax.rl.evaluate: eval/rl/<family>/reward_mean and pass@k, the
    # baseline RL must beat): `prompts` prompts of every task family (or of `families`, comma-separated),
    # n answers each sampled at `temperature`, at most max_new_tokens tokens per turn. 0 prompts: off.
    config.rl_eval = ml_collections.ConfigDict(dict(prompts=2 if tiny else 16, n=4, temperature=1.0,
                                                    max_new_tokens=48, families=""))
    # Conversations (glm5v_jax.data.conversations): turns per conversation, chance of a system
    # message and of one text-only turn in an image conversation; `tasks`: only turns of these tasks
    # (comma-separated conversations.TASKS, e.g. "count"; "" = every task; records without one are skipped).
    config.data.sft = ml_collections.ConfigDict(dict(min_turns=2, max_turns=5, system_prob=0.5, text_turn_prob=0.5,
                                                     tasks=""))
    for group in config.optim.groups.values():
        group.lr, group.muon_lr = group.lr / 3, group.muon_lr / 3
        group.warmup_steps = 10 if tiny else 100
    return config
