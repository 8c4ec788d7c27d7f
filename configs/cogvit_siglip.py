"""CogViT pre-training stage 2: contrastive image-text training with the sigmoid loss (report 2.1).

Usage: `--config=configs/cogvit_siglip.py:<preset>[,option=value,...]`, e.g.
`configs/cogvit_siglip.py:tiny` or `:base,loss_impl=ring,budgets=random`.

Presets:
  tiny   CogViT 128 wide, depth 2 (as in configs/cogvit_mim.py tiny), a 128-wide depth-2 text
         tower, 128-d shared embedding, batch 32, one 64-patch NaFlex budget, float32. Runs on
         2 CPU cores.
  base   CogViT-B (768/12/12), a 512-wide depth-12 text tower, 768-d embedding, the report's
         64K (65536) global batch with the ring loss over every device, cycling through
         256 / 576 / 1024-patch budgets, bfloat16 compute.

Options: optimizer (muon | adamw), dtype ("" = the preset's), loss_impl ("" = the preset's: dense
for tiny, ring for base | dense: one device, the whole B x B logits | ring | all_gather: the
batch split over a data-parallel mesh of
`config.mesh.data` devices, 0 = all, parameters replicated, loss by
`sharded_sigmoid_contrastive_loss`), budgets (cycle | random: which patch budget a step uses),
data (shapes_world | tfds | array_record: the kind of the three mixture sources, see
configs/cogvit_mim.py), seed.

Captions are the shapes world's English captions (`caption_en`), tokenised by a SentencePiece
model trained on the texts of `config.data.tokenizer_sources` (cached in the data directory;
`glm5v_jax.data.source_registry.tokenizer_from_config`) unless `config.data.tokenizer` names one.
"""
from __future__ import annotations

import ml_collections

from glm5v_jax.config_args import parse_arg
from glm5v_jax.config_blocks import (cogvit_block, optimizer_block, optimizer_group, report_mixture,
                                     run_control, single_object_eval_source)
from glm5v_jax.data.source_registry import SOURCE_KINDS
from glm5v_jax.errors import ConfigError
from glm5v_jax.sharding.rules import mesh_config

PRESETS = ("tiny", "base")

OPTIONS = dict(
    optimizer="muon",  # muon | adamw
    dtype="",  # compute dtype; "" = float32 (tiny, CPU) or bfloat16 (base); parameters stay float32
    loss_impl="",  # "" (tiny: dense, base: ring) | dense | ring | all_gather
    budgets="cycle",  # cycle | random: the patch budget of each step
    data="shapes_world",  # shapes_world | tfds | array_record: the kind of the three mixture sources
    seed=0,
)


def _text(embed_dim, depth, num_heads, mlp_dim):
    # vocab_size, pad_id and eos_id are taken from the tokenizer by the trainer.
    return ml_collections.ConfigDict(dict(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, mlp_type="gelu",
        rope_theta=10_000.0, qk_norm=True, qkv_bias=True, norm_eps=1e-6))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = parse_arg(arg, PRESETS, "tiny", **OPTIONS)
    if opts.data not in SOURCE_KINDS:
        raise ConfigError("option data", f"unknown source kind {opts.data!r}; expected one of {tuple(SOURCE_KINDS)}")
    tiny = opts.preset == "tiny"
    config = ml_collections.ConfigDict()
    config.trainer = "cogvit_siglip"  # glm5v_jax.train.stages.STAGES
    config.preset, config.seed = opts.preset, opts.seed
    config.model = ml_collections.ConfigDict(dict(
        # vision.max_patches is the evaluation budget; training budgets are config.data.patch_budgets
        vision=cogvit_block("tiny", max_patches=64) if tiny else cogvit_block("B", max_patches=256),
        text=_text(128, 2, 2, 512) if tiny else _text(512, 12, 8, 2048),
        embed_dim=128 if tiny else 768,  # the shared image-text embedding width
        dtype=opts.dtype or ("float32" if tiny else "bfloat16"), attention_impl="xla", remat=False,
    ))
    config.loss_impl = opts.loss_impl or ("dense" if tiny else "ring")
    # The mesh as in every stage (FSDP over all devices by default; num_devices > 0: the first n, one host);
    # ring / all_gather split the loss over the batch axes of the mesh.
    config.mesh = mesh_config(num_devices=0)

    run_control(config, total_steps=300 if tiny else 100_000, log_every=10 if tiny else 100,
                eval_every=100 if tiny else 5000, checkpoint_every=100 if tiny else 5000)

    # Data: named image sources mixed by weight, as in configs/cogvit_mim.py, with captions; the
    # natural source's 300 validation images (several objects each) measure image-text retrieval.
    config.data = ml_collections.ConfigDict(dict(
        data_dir="",  # "" -> <workdir>/data
        sources=report_mixture(opts.data, 6000 if tiny else 100_000, eval_images=300),
        batch_size=32 if tiny else 65536,  # the report: a 64K global batch
        num_workers=0,
        # NaFlex patch budgets: each training batch uses one, chosen by step ("cycle" through
        # them or seeded "random"), so the encoder sees several sequence lengths.
        patch_budgets=(64,) if tiny else (256, 576, 1024),
        budget_schedule=opts.budgets,
        text_len=48 if tiny else 64,  # caption tokens incl. eos (shapes-world captions: <= 45)
        caption_keys=("caption_en",),
        tokenizer="",  # SentencePiece model path (local or gs://); "" -> trained on tokenizer_sources' texts
        tokenizer_vocab_size=1024 if tiny else 4096,
        tokenizer_sources="natural",  # shapes_world sources whose training texts train the tokenizer
        tokenizer_max_records=6000,  # at most this many records of each (0: all)
        # Zero-shot and k-NN classification (shape and colour): shapes-world images with exactly one
        # object; the eval part's images are the queries, the train part's the k-NN reference.
        eval_source=single_object_eval_source(knn_images=1000, eval_images=300),
        knn_k=10,
    ))

    def group(prefixes, lr, muon_lr, warmup):
        return optimizer_group(prefixes, lr, muon_lr=muon_lr, warmup_steps=warmup, final_fraction=0.05,
                               weight_decay=0.05)
    warm = 20 if tiny else 2000
    base_lr = 2e-3 if tiny else 5e-4
    # Module-specific learning rates. `projection` holds both projection heads and the loss
    # scalars t' and b, which take its AdamW `lr` (no weight decay: not matrices); a short run
    # needs them to move faster than the towers (b starts at -10).
    config.optim = optimizer_block(opts.optimizer, dict(
        vision=group("image/encoder", base_lr, base_lr, warm),
        text=group("text/encoder", base_lr, base_lr, warm),
        projection=group("image/proj,text/proj,t_prime,b", 1e-2 if tiny else 1e-3, base_lr, warm),
    ))
    return config
