"""CogViT pre-training stage 1: masked-image distillation from SigLIP2 and DINOv3 (report 2.1).

Usage: `--config=configs/cogvit_mim.py:<preset>[,option=value,...]`, e.g.
`configs/cogvit_mim.py:tiny` or `:base,mask=random,standardize=phi_s,loss=mse`, or
`:tiny,teacher_run=runs/siglip` to distil from the image tower of a stage-2 run instead of SigLIP2.
`:base,data=array_record --config.data.sources.natural.train_split='gs://b/natural/*.array_record'`
(and likewise `instruction`, `scientific`) trains on record files instead of shapes world.

Presets:
  tiny   CogViT 128 wide, depth 2 (the VLM tiny preset's tower); small random-init teachers of
         the SigLIP2 and DINOv3 architectures (64 wide) unless checkpoints are given; 64-patch
         NaFlex budget. Runs on 2 CPU cores.
  base   CogViT-B (768/12/12, 256 patches); teachers SigLIP2 So400m/16 NaFlex and DINOv3 L/16
         from `config.teachers.<name>.checkpoint` (big_vision .npz or HF safetensors for SigLIP2;
         HF safetensors or Meta .pth for DINOv3).

Teachers run frozen in bfloat16 without gradients. The student sees 35% of each image's valid
patches replaced by the mask token and predicts every teacher's standardised features at the
masked positions through one adaptor head per teacher.

A teacher whose patch size differs from the student's (e.g. SigLIP2 So400m/14 with the /16
student) sees its own NaFlex view of the image (merge 1) with a budget of
`config.teachers.<name>.max_patches` patches (0: about the student's pixel area, i.e.
round(max_patches x (16 / 14)^2)); its tokens are resampled bilinearly onto the student's grid.

`config.teacher_cache`: a directory written by
`python -m glm5v_jax.train.teacher_cache --config=<this config> --cache_dir=DIR` (every teacher's
features on the student's grid for every training record, bfloat16). When set, the trainer runs
no teacher and reads the features from it; the cache must match the config's teachers, patch
budgets and sources (checked), and records missing from it are skipped and counted.
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
    mask="block",  # block | random
    standardize="zscore",  # zscore | phi_s | none
    loss="cosine_smooth_l1",  # cosine_smooth_l1 | mse
    optimizer="muon",  # muon | adamw
    dtype="bfloat16",  # student compute dtype; parameters stay float32
    teacher_run="",  # a stage-2 run directory (configs/cogvit_siglip.py): its image encoder replaces SigLIP2
    data="shapes_world",  # shapes_world | tfds | array_record: the kind of the three mixture sources
    seed=0,
)


def _teacher(kind, variant, seed, **overrides):
    return ml_collections.ConfigDict(dict(
        kind=kind, variant=variant, checkpoint="", seed=seed, weight=1.0,
        max_patches=0,  # patch budget of this teacher's own view (another patch size); 0: same pixel area
        overrides=ml_collections.ConfigDict(dict(overrides))))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = parse_arg(arg, PRESETS, "tiny", **OPTIONS)
    if opts.data not in SOURCE_KINDS:
        raise ConfigError("option data", f"unknown source kind {opts.data!r}; expected one of {tuple(SOURCE_KINDS)}")
    tiny = opts.preset == "tiny"
    config = ml_collections.ConfigDict()
    config.trainer = "cogvit_mim"  # glm5v_jax.train.stages.STAGES
    config.preset, config.seed = opts.preset, opts.seed
    config.model = ml_collections.ConfigDict(dict(
        vision=cogvit_block("tiny", max_patches=64) if tiny else cogvit_block("B", max_patches=256),
        dtype=opts.dtype, attention_impl="xla", remat=False,
        head_hidden=0,  # adaptor head width; 0: the student's width
    ))
    # Teachers: {name: kind (siglip2 | dinov3 | cogvit), variant, checkpoint ("" = random init from
    # seed), loss weight, max_patches (own view, see above), spec overrides}. Compute is bfloat16.
    if tiny:
        config.teachers = ml_collections.ConfigDict(dict(
            siglip2=_teacher("siglip2", "B/16", 1, width=64, depth=2, mlp_dim=128, num_heads=2,
                             dtype="bfloat16"),
            dinov3=_teacher("dinov3", "S", 2, width=64, depth=2, num_heads=2, dtype="bfloat16"),
        ))
    else:
        config.teachers = ml_collections.ConfigDict(dict(
            siglip2=_teacher("siglip2", "So400m/16", 1, dtype="bfloat16"),
            dinov3=_teacher("dinov3", "L", 2, dtype="bfloat16"),
        ))
    if opts.teacher_run:  # the SigLIP-style teacher is the image tower of a stage-2 (sigmoid-loss) run
        config.teachers.siglip2 = ml_collections.ConfigDict(dict(
            kind="cogvit", variant="", checkpoint=opts.teacher_run, seed=1, weight=1.0, max_patches=0,
            overrides=ml_collections.ConfigDict(dict(dtype="bfloat16"))))
    config.teacher_cache = ""  # a teacher_cache.py directory: read teacher features instead of running teachers
    config.mim = ml_collections.ConfigDict(dict(
        ratio=0.35,  # the report: 35% of the valid patches masked
        layout=opts.mask, num_blocks=4,
        standardize=opts.standardize, stats_momentum=0.99,
        loss=opts.loss, cosine_weight=0.9, smooth_l1_weight=0.1,
    ))

    run_control(config, total_steps=200 if tiny else 100_000, log_every=10 if tiny else 100,
                eval_every=100 if tiny else 5000, checkpoint_every=100 if tiny else 5000)

    # Data: named image sources mixed by weight (the report: 80% natural, 10% instruction,
    # 10% scientific), entries of glm5v_jax.data.source_registry: by default shapes-world stand-ins
    # (build seeds 0, 1, 2); option data=array_record / tfds: the same three names to point at
    # record files (`.train_split` globs) or TFDS datasets (`.name`).
    config.data = ml_collections.ConfigDict(dict(
        data_dir="",  # "" -> <workdir>/data
        sources=report_mixture(opts.data, 6000 if tiny else 100_000),
        batch_size=16 if tiny else 1024,
        num_workers=0,
        # k-NN evaluation (shape and colour): shapes-world images with exactly one object; the
        # eval part's images are matched against the train part's (1000 reference images, 300 queries).
        eval_source=single_object_eval_source(knn_images=1000, eval_images=300),
        knn_k=10,
    ))

    # Mesh, as for the VLM trainer: sizes of (data, fsdp, tensor, expert), one -1 takes the rest;
    # rules map logical axes to mesh axes (glm5v_jax.sharding.rules). The default shards the
    # student, its optimizer state and the frozen teachers FSDP-style over every device, the
    # batch over data x fsdp. num_devices: 0 = all, else the first N (one host).
    config.mesh = mesh_config(num_devices=0)

    def group(prefixes, lr):
        return optimizer_group(prefixes, lr, warmup_steps=20 if tiny else 2000, final_fraction=0.05,
                               weight_decay=0.05)
    lr = 2e-3 if tiny else 5e-4
    config.optim = optimizer_block(opts.optimizer, dict(encoder=group("encoder", lr), heads=group("heads", lr)))
    return config
