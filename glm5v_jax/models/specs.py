"""Typed, validated model settings: plain arguments for the model constructors.

Each spec checks itself on construction and raises `ConfigError` naming its own
field (`num_kv_heads`); `glm5v_jax.models.build` prefixes the config path
(`config.model.backbone.num_kv_heads`) when it translates an ml-collections config.
Nothing here reads a global config.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax.numpy as jnp

from glm5v_jax.errors import ConfigError, require
from glm5v_jax.layers.attention import ATTENTION_IMPLS
from glm5v_jax.layers.moe import MOE_IMPLS


def _require_impl(field: str, name: str, known) -> None:
    """A kernel choice must name a registered implementation."""
    require(name in known, field, f"unknown implementation {name!r}; known: {sorted(known)}")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(value: Any, field: str):
    """A jnp dtype from a name ('bfloat16') or a dtype; ConfigError otherwise."""
    if isinstance(value, str):
        require(value in DTYPES, field, f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[value]
    return jnp.dtype(value).type


class MMTPMode(str, enum.Enum):
    """What the MTP stream sees at image positions (report section 2.2)."""

    VISUAL_EMBED = "visual_embed"  # the projected vision features (backbone input)
    MASK = "mask"  # visual positions removed from the MTP stream (text-only MTP)
    IMAGE_TOKEN = "image_token"  # one shared learnable <|image|> embedding (the report's choice)


class TrunkGradient(str, enum.Enum):
    """Where the MTP loss back-propagates through the main model's hidden states h^0.

    `full` (the default) is the report's design: it changes only what enters the MTP head
    at image positions, and, as in DeepSeek-V3 / Megatron MTP, the MTP loss trains
    everything upstream of h^0, vision tower included. `isolate_vision` and `stop` are
    ablation options of this project, not from the report.
    """

    FULL = "full"  # DeepSeek-V3 / Megatron as is: through the trunk into vision as well
    # Ablation (ours, not the report's): MTP gradients train the trunk but are not passed on
    # through the trunk into the vision features: only the MTP stream's own input can reach
    # the vision tower (it does in `visual_embed`, never in `image_token` or `mask`). Costs
    # one extra activation-only backward pass through the trunk on batches with images.
    ISOLATE_VISION = "isolate_vision"
    # Ablation (ours, not the report's): h^0 detached, the MTP loss trains the MTP blocks and
    # the shared head only.
    STOP = "stop"


class H0Norm(str, enum.Enum):
    """Which main-model hidden state the first MTP depth reads as h^0.

    `final_norm` (the default): the trunk's output after the backbone's final RMSNorm, which
    is what the released GLM-4.5 MTP weights see in sglang / vLLM (see
    `glm5v_jax.models.mmtp`); the depth's `hnorm` then normalises it again. `pre_norm`: the
    trunk's output before the final norm.
    """

    FINAL_NORM = "final_norm"
    PRE_NORM = "pre_norm"


def _enum(cls, value, field):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(field, f"unknown value {value!r}; expected one of {[m.value for m in cls]}") from None


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """CogViT: a pre-norm ViT over NaFlex patches with QK-Norm and 2D RoPE."""

    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 2
    mlp_dim: int = 512
    mlp_type: str = "gelu"
    patch_size: int = 16
    max_patches: int = 256  # the NaFlex patch budget per image
    merge_size: int = 2  # the projector's spatial merge (2 -> 2x2 groups)
    qk_norm: bool = True
    qkv_bias: bool = True
    rope_theta: float = 100.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _require_impl("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        for f in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "max_patches", "merge_size"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        require(self.embed_dim % self.num_heads == 0, "num_heads",
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.embed_dim // self.num_heads
        require(head_dim % 4 == 0, "num_heads",
                f"head_dim = embed_dim/num_heads = {head_dim} must be a multiple of 4 for 2D RoPE (y and x halves)")
        group = self.merge_size**2
        require(self.max_patches % group == 0, "max_patches",
                f"patch budget {self.max_patches} must be a multiple of the merge group "
                f"merge_size**2 = {group}")
        require(self.mlp_type in ("gelu", "swiglu"), "mlp_type",
                f"unknown mlp_type {self.mlp_type!r}; expected 'gelu' or 'swiglu'")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclasses.dataclass(frozen=True)
class ProjectorSpec:
    """2x2 merge of neighbouring patches, then LayerNorm + MLP into the LLM width."""

    vision_dim: int = 128
    out_dim: int = 256
    merge_size: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("vision_dim", "out_dim", "merge_size"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """GLM-4.5-style decoder: first_k_dense dense layers, then MoE layers."""

    vocab_size: int = 8192
    embed_dim: int = 256
    num_layers: int = 4
    first_k_dense: int = 1
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 768
    num_experts: int = 8
    experts_per_token: int = 2
    num_shared_experts: int = 1
    moe_mlp_dim: int = 128
    routed_scaling: float = 1.0
    qkv_bias: bool = True
    qk_norm: bool = True
    rotary_fraction: float = 0.5
    rope_theta: float = 10000.0
    mrope_sections: tuple[int, ...] | None = (4, 6, 6)
    norm_eps: float = 1e-5
    balance_loss_weight: float = 0.0
    init_std: float = 0.02
    attention_impl: str = "xla"
    moe_impl: str = "ragged_dot"
    # Expert-parallel exchange capacity: 0 = dropless; f > 0 bounds what each device sends to
    # each expert rank at ceil(f * slots / ep) token slots and drops the rest (aux
    # `dropped_fraction`). Only `moe_impl` expert_parallel (and pallas with expert axes) exchange.
    capacity_factor: float = 0.0
    remat: bool = False
    # Report each attention head's max pre-softmax logit in the aux outputs
    # (`attn_max_logits`), the statistic QK-Clip needs (`glm5v_jax.optim.qk_clip`).
    track_max_logits: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _require_impl("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _require_impl("moe_impl", self.moe_impl, MOE_IMPLS)
        for f in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            require(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        require(0 <= self.first_k_dense <= self.num_layers, "first_k_dense",
                f"must be in [0, num_layers={self.num_layers}], got {self.first_k_dense}")
        rot = self.head_dim * self.rotary_fraction
        require(0 < self.rotary_fraction <= 1 and rot == int(rot) and int(rot) % 2 == 0, "rotary_fraction",
                f"rotary dims head_dim*rotary_fraction = {rot} must be an even integer "
                f"in (0, head_dim={self.head_dim}]")
        if self.mrope_sections is not None:
            require(all(s > 0 for s in self.mrope_sections) and sum(self.mrope_sections) == int(rot) // 2,
                    "mrope_sections",
                    f"sections {tuple(self.mrope_sections)} must be positive and sum to rotary_dim/2 = "
                    f"{int(rot) // 2} (head_dim {self.head_dim} x rotary_fraction {self.rotary_fraction} / 2)")
        if self.num_moe_layers:
            require(self.num_experts >= 1, "num_experts", f"MoE layers need num_experts >= 1, got {self.num_experts}")
            require(1 <= self.experts_per_token <= self.num_experts, "experts_per_token",
                    f"top-k ({self.experts_per_token}) must be in [1, num_experts={self.num_experts}]")
            require(self.moe_mlp_dim > 0, "moe_mlp_dim", f"must be positive, got {self.moe_mlp_dim}")
            require(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
            require(self.capacity_factor >= 0, "capacity_factor",
                    f"must be >= 0 (0 = dropless), got {self.capacity_factor}")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)


@dataclasses.dataclass(frozen=True)
class MTPSpec:
    """Multimodal multi-token prediction: D depths sharing embedding and head."""

    num_depths: int = 1
    mode: MMTPMode = MMTPMode.IMAGE_TOKEN
    loss_weight: float = 0.3
    trunk_gradient: TrunkGradient = TrunkGradient.FULL
    h0_norm: H0Norm = H0Norm.FINAL_NORM
    moe_block: bool | None = None  # None: MoE block iff the backbone has MoE layers

    def __post_init__(self):
        object.__setattr__(self, "mode", _enum(MMTPMode, self.mode, "mode"))
        object.__setattr__(self, "trunk_gradient", _enum(TrunkGradient, self.trunk_gradient, "trunk_gradient"))
        object.__setattr__(self, "h0_norm", _enum(H0Norm, self.h0_norm, "h0_norm"))
        require(self.num_depths >= 0, "num_depths", f"must be >= 0, got {self.num_depths}")
        require(self.loss_weight >= 0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclasses.dataclass(frozen=True)
class VLMSpec:
    """The whole GLM-5V-style model."""

    vision: VisionSpec = VisionSpec()
    projector: ProjectorSpec = ProjectorSpec()
    backbone: BackboneSpec = BackboneSpec()
    mtp: MTPSpec = MTPSpec()
    image_token_id: int = 4

    def __post_init__(self):
        require(self.projector.vision_dim == self.vision.embed_dim, "projector.vision_dim",
                f"must equal vision.embed_dim ({self.vision.embed_dim}), got {self.projector.vision_dim}")
        require(self.projector.out_dim == self.backbone.embed_dim, "projector.out_dim",
                f"must equal backbone.embed_dim ({self.backbone.embed_dim}), got {self.projector.out_dim}")
        require(self.projector.merge_size == self.vision.merge_size, "projector.merge_size",
                f"must equal vision.merge_size ({self.vision.merge_size})")
        require(0 <= self.image_token_id < self.backbone.vocab_size, "image_token_id",
                f"must be a token id in [0, vocab_size={self.backbone.vocab_size}), got {self.image_token_id}")
