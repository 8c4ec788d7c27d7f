"""Configs: presets, options, refusals that name the field, and abstract parameter counts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm5v_jax.data.naflex import NaFlexError, naflex_preprocess
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.models.specs import MMTPMode
from glm5v_jax.tools.summary import count_params

from helpers import config_module

ROOT = Path(__file__).parents[1]
vlm_pretrain = config_module("vlm_pretrain")


def test_presets_and_options_parse():
    """Every preset builds a spec; options reach the model config."""
    for preset in vlm_pretrain.PRESETS:
        spec = vlm_spec_from_config(vlm_pretrain.get_config(preset).model)
        assert spec.mtp.mode == MMTPMode.IMAGE_TOKEN
    cfg = vlm_pretrain.get_config("tiny,mmtp=visual_embed,layers=8,remat,dtype=float32")
    spec = vlm_spec_from_config(cfg.model)
    assert spec.mtp.mode == MMTPMode.VISUAL_EMBED and spec.backbone.num_layers == 8 and spec.backbone.remat
    with pytest.raises(ConfigError, match="preset"):
        vlm_pretrain.get_config("huge")
    with pytest.raises(ConfigError, match="option colour"):
        vlm_pretrain.get_config("tiny,colour=red")


def _refusal(mutate, field, match=None):
    cfg = vlm_pretrain.get_config("tiny")
    mutate(cfg.model)
    with pytest.raises(ConfigError) as info:
        vlm_spec_from_config(cfg.model)
    assert info.value.field == field, str(info.value)
    if match:
        assert match in str(info.value)


def test_bad_configs_are_refused_naming_the_field():
    """Each impossible setting is refused before any model is built, naming its field."""
    def heads(m): m.backbone.num_kv_heads = 3
    _refusal(heads, "config.model.backbone.num_kv_heads", "divisible")

    def rotary(m): m.backbone.rotary_fraction = 0.3
    _refusal(rotary, "config.model.backbone.rotary_fraction", "head_dim")

    def sections(m): m.backbone.mrope_sections = (4, 6, 8)
    _refusal(sections, "config.model.backbone.mrope_sections", "sum to rotary_dim/2 = 16")

    def topk(m): m.backbone.experts_per_token = 9
    _refusal(topk, "config.model.backbone.experts_per_token", "num_experts=8")

    def budget(m): m.vision.max_patches = 30
    _refusal(budget, "config.model.vision.max_patches", "multiple of the merge group")

    def mode(m): m.mtp.mode = "pixels"
    _refusal(mode, "config.model.mtp.mode", "image_token")

    def unknown(m): m.backbone.num_expertz = 3
    _refusal(unknown, "config.model.backbone.num_expertz", "unknown field")

    def dtype(m): m.dtype = "float8"
    _refusal(dtype, "config.model.dtype", "unknown dtype")

    def vision_heads(m): m.vision.num_heads = 3
    _refusal(vision_heads, "config.model.vision.num_heads")

    def image_id(m): m.image_token_id = 10**6
    _refusal(image_id, "config.model.image_token_id")


def test_image_smaller_than_one_patch_is_refused():
    with pytest.raises(NaFlexError, match="8x40 px"):
        naflex_preprocess(np.zeros((8, 40, 3), np.uint8), patch_size=16, max_patches=64)


def test_glm45_air_counts_abstractly():
    """The GLM-4.5-Air-like backbone: 106.85B total (0.5%), 12.18B active non-embedding (1%),
    MTP layer about 2.375B; built with eval_shape, no parameter memory."""
    counts = count_params(vlm_spec_from_config(vlm_pretrain.get_config("glm45_air").model))
    assert abs(counts["backbone_params"] / 106_852_251_264 - 1) < 0.005
    assert abs(counts["backbone_active_params_non_embedding"] / 12.18e9 - 1) < 0.01
    assert abs(counts["mtp_params"] / 2.375e9 - 1) < 0.01
    assert counts["total_params"] == sum(counts[k] for k in ("vision_params", "projector_params",
                                                            "backbone_params", "mtp_params"))


@pytest.mark.parametrize("preset,total,tol", [("tiny", 10.16e6, 0.03), ("0p5b", 0.53e9, 0.02)])
def test_small_preset_sizes(preset, total, tol):
    counts = count_params(vlm_spec_from_config(vlm_pretrain.get_config(preset).model))
    assert abs(counts["total_params"] / total - 1) < tol, counts


def test_summary_cli_prints_counts():
    out = subprocess.run([sys.executable, "-m", "glm5v_jax.tools.summary",
                          "--config=configs/vlm_pretrain.py:tiny"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    lines = dict(line.split(": ") for line in out.splitlines()[:6])
    assert list(lines) == ["vision_params", "projector_params", "backbone_params",
                           "backbone_active_params_non_embedding", "mtp_params", "total_params"]
    assert int(lines["backbone_params"]) == 8_235_800  # the reference formula, exactly
    assert "backbone/moe_layers/mlp" in out


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as info:
        vlm_pretrain.get_config("huge")
    assert info.value.field == "preset"
    assert all(p in str(info.value) for p in vlm_pretrain.PRESETS)


def test_config_error_survives_reconstruction_from_its_text():
    """`type(e)(str(e))` (ml_collections' config_flags re-raises so, with a traceback as the text)
    and pickling give a ConfigError with the same field."""
    import pickle
    import traceback

    e = ConfigError("config.model.backbone.num_kv_heads", "must divide num_heads (4)")
    again = ConfigError(str(e))
    assert (again.field, again.detail, str(again)) == (e.field, e.detail, str(e))
    restored = pickle.loads(pickle.dumps(e))
    assert (restored.field, restored.detail) == (e.field, e.detail)
    try:
        vlm_pretrain.get_config("huge")
    except ConfigError as original:
        wrapped = type(original)("Error whilst parsing config file:\n\n" + traceback.format_exc())
    assert wrapped.field == "preset" and "tiny" in wrapped.detail
    assert ConfigError("no field named here").field is None
    assert ConfigError("option mmtp: expected a string").field == "option mmtp"


def test_cli_config_error_is_one_line_and_exit_status_2():
    """A ConfigError raised while the config file is loaded: one stderr line naming the field and
    the choices, exit status 2, no traceback (glm5v_jax.errors.run_cli)."""
    proc = subprocess.run([sys.executable, "-m", "glm5v_jax.tools.summary",
                           "--config=configs/vlm_pretrain.py:huge"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "preset" in lines[0] and "tiny" in lines[0], proc.stderr
    assert proc.stdout == ""
    # raised by the entry point's main (the spec check), also one line
    proc = subprocess.run([sys.executable, "-m", "glm5v_jax.tools.summary", "--config=configs/vlm_pretrain.py:tiny",
                           "--config.model.backbone.num_kv_heads=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "config error: config.model.backbone.num_kv_heads: num_heads (4) must be divisible by num_kv_heads (3)"]


def test_config_blocks_are_shared():
    """Every config's CogViT tower and Muon block come from glm5v_jax.config_blocks."""
    from glm5v_jax.config_blocks import cogvit_block, muon_block

    mim, siglip = config_module("cogvit_mim"), config_module("cogvit_siglip")
    assert vlm_pretrain.get_config("tiny").model.vision == cogvit_block("tiny", max_patches=64)
    assert mim.get_config("base").model.vision == cogvit_block("B", max_patches=256)
    assert siglip.get_config("tiny").model.vision == mim.get_config("tiny").model.vision
    for cfg in (vlm_pretrain.get_config("tiny"), mim.get_config("tiny"), siglip.get_config("base")):
        assert cfg.optim.muon == muon_block()
    with pytest.raises(ConfigError, match="size"):
        cogvit_block("XXL", max_patches=64)
