"""VLM pre-training with MMTP (training stage 3).

Usage: `--config=configs/vlm_pretrain.py:<preset>[,option=value,...]`, e.g.
`configs/vlm_pretrain.py:tiny,mmtp=image_token` or `:0p5b,mmtp=visual_embed,seeds=3`.

Data (`config.data.sources`, entries of `glm5v_jax.data.source_registry`): by default the embedded
shapes world, images with captions, QA, boxes and OCR (`image`, weight 0.8) and text-only documents
(`text`, weight 0.2). `data=tfds` or `data=array_record` makes one `corpus` source of that kind
instead, to fill in from the command line, e.g. `:tiny,data=tfds --config.data.sources.corpus.name=
coco_captions --config.data.tokenizer=PATH` (a real corpus needs a tokenizer).

Presets (parameter counts: `python -m glm5v_jax.tools.summary --config=...`):
  tiny       about 10M: LLM 256 wide, 4 layers (1 dense + 3 MoE, 8 experts + 1 shared,
             top-2), CogViT 128 wide, depth 2. A train step in about a second on 2 CPU cores.
  0p5b       the MMTP-ablation model: dense 24 x 1024 backbone (16 heads, 4 KV, head_dim
             128, SwiGLU 3072, vocab 32768) with a ViT-B-like CogViT (768/12/12): ~0.53B.
  0p5b_moe   the same width with MoE layers (16 x 1024, 1 dense, 16 experts + 1 shared, top-2).
  glm45_air  GLM-4.5-Air-like backbone (106B total, ~12B active) with a CogViT-L-like
             (so400m-shaped) tower. Only ever built abstractly on a CPU host.
"""
from __future__ import annotations

import ml_collections

from glm5v_jax.config_args import parse_arg
from glm5v_jax.config_blocks import cogvit_block, optimizer_block, optimizer_group, run_control
from glm5v_jax.data.source_registry import SOURCE_KINDS, source_config
from glm5v_jax.errors import ConfigError
from glm5v_jax.sharding.rules import mesh_config

PRESETS = ("tiny", "0p5b", "0p5b_moe", "glm45_air")

# Options accepted after the preset, with their defaults (None: keep the preset's value).
OPTIONS = dict(
    mmtp="image_token",  # visual_embed | mask | image_token
    mtp_depths=-1,  # -1: the preset's
    # full (the report / DeepSeek-V3) | isolate_vision | stop (ablations of ours; MTPSpec.trunk_gradient)
    trunk_grad="full",
    layers=-1,  # override backbone depth (compile-time studies); -1: the preset's
    dtype="bfloat16",  # compute dtype; parameters stay float32
    attention_impl="xla",  # xla | pallas (flash kernel: TPU Mosaic, GPU Triton) | cudnn (GPU; xla elsewhere)
    moe_impl="ragged_dot",  # ragged_dot | dense | pallas (gmm kernel) | expert_parallel (all_to_all)
    remat=False,
    optimizer="muon",  # muon | adamw
    data="shapes_world",  # shapes_world | tfds | array_record (config.data.sources; see above)
    seed=0,
)


def _backbone(**kw):
    base = dict(
        vocab_size=8192, embed_dim=256, num_layers=4, first_k_dense=1, num_heads=4, num_kv_heads=2,
        head_dim=64, mlp_dim=768, num_experts=8, experts_per_token=2, num_shared_experts=1,
        moe_mlp_dim=128, routed_scaling=1.0, qkv_bias=True, qk_norm=True, rotary_fraction=0.5,
        rope_theta=10000.0, mrope_sections=(4, 6, 6), norm_eps=1e-5, balance_loss_weight=0.0,
        init_std=0.02, track_max_logits=False,
        capacity_factor=0.0)  # > 0: bound the expert-parallel exchange, drop the overflow (BackboneSpec)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _model(preset: str) -> ml_collections.ConfigDict:
    if preset == "tiny":
        vision = cogvit_block("tiny", max_patches=64)
        backbone = _backbone()
    elif preset in ("0p5b", "0p5b_moe"):
        vision = cogvit_block("B", max_patches=256)
        common = dict(vocab_size=32768, embed_dim=1024, num_heads=16, num_kv_heads=4, head_dim=128,
                      mlp_dim=3072, mrope_sections=(8, 12, 12))
        if preset == "0p5b":
            backbone = _backbone(num_layers=24, first_k_dense=24, num_experts=0, experts_per_token=0,
                                 num_shared_experts=0, moe_mlp_dim=0, **common)
        else:
            backbone = _backbone(num_layers=16, first_k_dense=1, num_experts=16, experts_per_token=2,
                                 num_shared_experts=1, moe_mlp_dim=384, **common)
    elif preset == "glm45_air":
        vision = cogvit_block("so400m", max_patches=4096)
        backbone = _backbone(vocab_size=151552, embed_dim=4096, num_layers=46, first_k_dense=1,
                             num_heads=96, num_kv_heads=8, head_dim=128, mlp_dim=10944, num_experts=128,
                             experts_per_token=8, num_shared_experts=1, moe_mlp_dim=1408,
                             routed_scaling=1.0, qk_norm=False, rope_theta=1e6,
                             mrope_sections=(8, 12, 12), balance_loss_weight=1e-4)
    else:  # parse_arg has already refused unknown presets
        raise AssertionError(preset)
    return ml_collections.ConfigDict(dict(
        vision=vision,
        backbone=backbone,
        # h0_norm: final_norm (h^0 after the backbone's final norm, as GLM-4.5's MTP weights are
        # served) | pre_norm; see glm5v_jax.models.mmtp.
        mtp=ml_collections.ConfigDict(dict(num_depths=1, mode="image_token", loss_weight=0.3,
                                           trunk_gradient="full", h0_norm="final_norm")),
        image_token_id=10,  # <|image|> in the project tokenizer; the trainer takes it from the tokenizer
        dtype="bfloat16", param_dtype="float32",
        attention_impl="xla", moe_impl="ragged_dot", remat=False,
    ))


def _sources(kind: str) -> ml_collections.ConfigDict:
    """config.data.sources: shapes world's images and text-only documents, or one corpus of `kind`."""
    if kind == "shapes_world":
        return ml_collections.ConfigDict(dict(
            image=source_config("shapes_world", weight=0.8, build_seed=0, train_split="train", train_size=6000,
                                eval_split="validation", eval_size=300),
            text=source_config("shapes_world", weight=0.2, build_seed=0, train_split="text_train", train_size=3000,
                               eval_split="text_validation", eval_size=150)))
    if kind == "tfds":  # name, data_dir, image_key, text_key to set
        return ml_collections.ConfigDict(dict(corpus=source_config("tfds", train_split="train",
                                                                   eval_split="validation")))
    # array_record: train_split / eval_split are comma-separated globs of record files, to set
    return ml_collections.ConfigDict(dict(corpus=source_config(kind)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = parse_arg(arg, PRESETS, "tiny", **OPTIONS)
    config = ml_collections.ConfigDict()
    config.trainer = "vlm_pretrain"  # glm5v_jax.train.stages.STAGES
    config.preset = opts.preset
    config.seed = opts.seed
    config.model = _model(opts.preset)
    m = config.model
    m.mtp.mode = opts.mmtp
    m.mtp.trunk_gradient = opts.trunk_grad
    if opts.mtp_depths >= 0:
        m.mtp.num_depths = opts.mtp_depths
    if opts.layers > 0:
        m.backbone.num_layers = opts.layers
        m.backbone.first_k_dense = min(m.backbone.first_k_dense, opts.layers)
    m.dtype, m.attention_impl, m.moe_impl, m.remat = opts.dtype, opts.attention_impl, opts.moe_impl, opts.remat

    # Run control: top-level so every run is scripted the same way (--config.total_steps=...).
    tiny = opts.preset == "tiny"
    run_control(config, total_steps=300 if tiny else 20_000, log_every=10 if tiny else 50,
                eval_every=100 if tiny else 1000, checkpoint_every=100 if tiny else 1000)
    config.measure_pipeline_batches = 20 if tiny else 0  # > 0: time the input pipeline alone first
    config.log_batch_hash = False  # True: log data/batch_hash (48-bit sha256 prefix) every step

    # Data: named sources mixed by weight (glm5v_jax.data.source_registry: kind, weight,
    # train_split / train_size, eval_split / eval_size and the kind's own fields); evaluation reads
    # the eval parts, mixed by the same weights.
    if opts.data not in SOURCE_KINDS:
        raise ConfigError("option data", f"unknown source kind {opts.data!r}; expected one of {tuple(SOURCE_KINDS)}")
    config.data = ml_collections.ConfigDict(dict(
        data_dir="",  # where shapes world is built (and the tokenizer cached); "" -> <workdir>/data
        sources=_sources(opts.data),
        tokenizer="",  # path of a SentencePiece model (local or gs://); "" -> trained on shapes-world texts
        tokenizer_vocab_size=4096,
        tokenizer_sources="",  # sources whose training texts train it; "" -> every shapes_world source
        tokenizer_max_records=0,  # at most this many records of each (0: all)
        batch_size=4 if tiny else 256,  # packed rows per step (global)
        seq_len=256 if tiny else 4096,
        max_images_per_row=4 if tiny else 16,
        # first_fit: greedy in arrival order | joint: first-fit decreasing on tokens and images at once, each
        # host's rows dealt to packing_ranks data-parallel ranks balanced in text and ViT tokens (as the report
        # packs its rollouts; the RL batches always do)
        packing="first_fit",
        packing_ranks=0,  # joint: ranks to balance over; 0 = the data-parallel shards of the host's rows
        num_workers=0,
        eval_batches=8 if tiny else 50,
    ))

    # Optimizer: Muon for matrices, AdamW for embeddings/head/norms/biases (glm5v_jax.optim),
    # with per-module groups (path prefixes; a config may add groups, longest prefix wins).
    # With rms scaling (update RMS 0.2) Muon reuses AdamW's LR and weight decay (Moonlight).
    def group(prefixes, lr):
        return optimizer_group(prefixes, lr, warmup_steps=30 if tiny else 1000, final_fraction=0.1,
                               weight_decay=0.1)
    base_lr = 3e-3 if tiny else 3e-4
    # Muon settings: glm5v_jax.config_blocks.muon_block; qk_clip_tau > 0 (QK-Clip, Kimi K2 used 100)
    # needs model.backbone.track_max_logits and no QK-Norm.
    config.optim = optimizer_block(
        opts.optimizer,  # muon | adamw
        dict(vision=group("vision", base_lr * 0.5), projector=group("projector", base_lr),
             text=group("backbone,mtp", base_lr)),
        router_bias_update_rate=1e-3,  # aux-loss-free balancing step size
    )

    # Mesh: sizes of (data, fsdp, tensor, expert) within a slice; one -1 takes the rest of the
    # devices. dcn_shape: the same axes across slices (multi-slice), () for one slice.
    # rules: logical axis -> mesh axis / tuple of axes / None (see glm5v_jax.sharding.rules).
    config.mesh = mesh_config()
    return config
