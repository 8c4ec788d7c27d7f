"""Config blocks shared by the files in `configs/`, one copy each.

    from glm5v_jax.config_blocks import cogvit_block, optimizer_block, optimizer_group, run_control

`run_control` sets the top-level run fields (steps, cadence, checkpoints, non-finite policy).
`cogvit_block` is a CogViT `vision` section (the fields of `glm5v_jax.models.specs.VisionSpec`),
`muon_block` the Muon settings of `config.optim.muon`, `optimizer_group` one entry of
`config.optim.groups` and `optimizer_block` the whole `config.optim` section around them.
`report_mixture` is the CogViT stages' `config.data.sources` and `single_object_eval_source` their
labelled evaluation images (entries of `glm5v_jax.data.source_registry`). The mesh block is
`glm5v_jax.sharding.rules.mesh_config`. Plain ml-collections, no JAX.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from glm5v_jax.data.source_registry import source_config
from glm5v_jax.errors import ConfigError

# CogViT sizes (width, depth, heads, MLP width) as in the design: tiny, ViT-B-like, L-like and
# so400m-like (the SigLIP2 So400m shape).
COGVIT_SIZES = {
    "tiny": dict(embed_dim=128, depth=2, num_heads=2, mlp_dim=512),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_dim=4304),
}


def cogvit_block(size: str, max_patches: int, **overrides: Any) -> ml_collections.ConfigDict:
    """A CogViT `vision` section of a named size (`COGVIT_SIZES`) with a NaFlex budget of
    `max_patches` patches: patch 16 (as both teachers), 2x2 merge for the projector, QK-Norm,
    q/k/v bias, 2D RoPE with base 100, GELU MLP. `overrides` replace any field."""
    if size not in COGVIT_SIZES:
        raise ConfigError("size", f"unknown CogViT size {size!r}; expected one of {sorted(COGVIT_SIZES)}")
    block = dict(**COGVIT_SIZES[size], mlp_type="gelu", patch_size=16, max_patches=max_patches, merge_size=2,
                 qk_norm=True, qkv_bias=True, rope_theta=100.0, norm_eps=1e-6)
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def muon_block(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.optim.muon`: Muon's momentum and Newton-Schulz settings (`glm5v_jax.optim.muon`)."""
    block = dict(
        beta=0.95, nesterov=True, ns_preset="polar_express", ns_steps=5, ns_dtype="bfloat16",
        scale_mode="rms",  # rms | spectral | none
        layout="stack",  # Newton-Schulz placement on a mesh: stack | replicate | auto
        split_heads=False,  # orthogonalise q/k/v/o head by head instead of whole
    )
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def optimizer_group(prefixes: str, lr: float, *, warmup_steps: int, final_fraction: float, weight_decay: float,
                    muon_lr: float | None = None, decay: str = "cosine") -> ml_collections.ConfigDict:
    """One parameter group of `config.optim.groups`: the parameters under the comma-separated
    path `prefixes` (longest prefix wins), AdamW learning rate `lr` and Muon's `muon_lr` (default:
    `lr`, as Muon's rms scaling allows), warm-up then `decay` to `final_fraction` of the peak."""
    return ml_collections.ConfigDict(dict(
        prefixes=prefixes, lr=lr, muon_lr=lr if muon_lr is None else muon_lr, warmup_steps=warmup_steps,
        decay=decay, final_fraction=final_fraction, weight_decay=weight_decay))


def optimizer_block(name: str, groups: dict[str, ml_collections.ConfigDict], **extra: Any) -> ml_collections.ConfigDict:
    """`config.optim`: optimizer `name` (muon | adamw) over `groups` (`optimizer_group`), global-norm
    clipping at 1, AdamW's betas and epsilon (also Muon's AdamW branch), `muon_block()` and QK-Clip
    off; `extra` adds or replaces fields."""
    block = dict(
        name=name,  # muon | adamw
        groups=ml_collections.ConfigDict(groups),
        clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8,  # AdamW (and Muon's AdamW branch)
        muon=muon_block(),
        qk_clip_tau=0.0,  # > 0: QK-Clip (Kimi K2 used 100); needs track_max_logits and no QK-Norm
    )
    block.update(extra)
    return ml_collections.ConfigDict(block)


def run_control(config: ml_collections.ConfigDict, *, total_steps: int, log_every: int, eval_every: int,
                checkpoint_every: int) -> None:
    """Set the run-control fields at the top level of `config` (every stage is scripted the same way,
    `--config.total_steps=...`): length and cadence, `keep_checkpoints`, `init_from`, what to do
    about non-finite training, and the changes a resume accepts (`glm5v_jax.train.resume`)."""
    config.total_steps = total_steps
    config.log_every = log_every
    config.eval_every = eval_every  # 0: no evaluation
    config.checkpoint_every = checkpoint_every
    config.keep_checkpoints = 3
    # WORKDIR[@STEP]:SRC=DST[,...]: start from a subtree of another run's model (glm5v_jax.init_from)
    config.init_from = ""
    # A NaN/inf loss or gradient: "stop" (nothing non-finite is saved; rerun resumes from the last good
    # checkpoint) or "skip" the step (one more state of memory), stopping after max_nonfinite_skips in a row.
    config.nonfinite = "stop"
    config.max_nonfinite_skips = 20
    # Comma-separated config fields (patterns) a resume may change beyond the safe ones, e.g. "optim.b2".
    config.resume_accept = ""


# The report's CogViT data mixture: 80% natural images, 10% instruction, 10% scientific.
REPORT_MIXTURE = dict(natural=0.8, instruction=0.1, scientific=0.1)


def report_mixture(kind: str, natural_images: int, *, eval_images: int = 0) -> ml_collections.ConfigDict:
    """`config.data.sources` of the CogViT stages: the report's mixture (`REPORT_MIXTURE`) as three
    sources of `kind`. shapes_world: stand-ins by build seed (natural: seed 0 with `natural_images`
    training images, and `eval_images` validation images when > 0; instruction and scientific: seeds
    1 and 2, 1000 images each). tfds / array_record: the same names and weights with the dataset
    names or file globs left to set (`config.data.sources.<name>.name` / `.train_split`)."""
    if kind != "shapes_world":
        return ml_collections.ConfigDict({name: source_config(kind, weight=w, train_split="train" if kind == "tfds"
                                                              else "") for name, w in REPORT_MIXTURE.items()})
    sizes = dict(natural=natural_images, instruction=1000, scientific=1000)
    sources = {name: source_config("shapes_world", weight=w, build_seed=seed, train_split="train",
                                   train_size=sizes[name])
               for seed, (name, w) in enumerate(REPORT_MIXTURE.items())}
    if eval_images:
        sources["natural"].update(eval_split="validation", eval_size=eval_images)
    return ml_collections.ConfigDict(sources)


def single_object_eval_source(knn_images: int = 1000, eval_images: int = 300,
                              build_seed: int = 0) -> ml_collections.ConfigDict:
    """The CogViT stages' `config.data.eval_source`: shapes-world images with exactly one object, so
    the shape and colour labels describe the whole image. Its train part (`knn_images`) is the k-NN
    reference set, its eval part (`eval_images`) the queries of k-NN and zero-shot classification."""
    return source_config("shapes_world", weight=0.0, build_seed=build_seed, train_split="single_object_train",
                         train_size=knn_images, eval_split="single_object_validation", eval_size=eval_images)
