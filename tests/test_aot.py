"""The AOT tool: the trainer's step compiled for TPU topologies on this (CPU) host.

Each case runs `python -m glm5v_jax.tools.aot` in a subprocess (libtpu describes the
topology; the local backend stays CPU). The TPU compiler is single-threaded, so all cases
start together in one module fixture and each test waits for its own. The cases use the
tiny presets: a 0p5b step takes the TPU compiler minutes on this host (the README's command
and experiments/aot_sweep.py cover the big presets). The VLM case uses AdamW (Muon's sharded
Newton-Schulz compiles several times slower); the stage-1 cases cover a Muon step. The tiny VLM
step is the costliest compile here (~25 s of a CPU core), so it is compiled once (v5p); the SFT
case checks that its stage builds that same program without compiling it again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from glm5v_jax.tools.aot import count_collectives, libtpu_available

ROOT = Path(__file__).resolve().parents[1]

needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]'): TPU topologies are unavailable")

SMALL = ["--config.data.batch_size=4", "--config.data.seq_len=128", "--config.data.max_images_per_row=1"]
CASES = {
    # tiny: the 0p5b compile took 3-4 minutes of the suite's two cores; it is a documented command
    # (README, "Will it compile and fit?") and experiments/aot_sweep.py runs the big presets
    "v5p": ["--config=configs/vlm_pretrain.py:tiny,optimizer=adamw", "--topology=v5p:2x2x1", *SMALL],
    # a second generation on the cheapest step (stage 1, tiny; the VLM step costs twice its compile)
    "v5e": ["--config=configs/cogvit_mim.py:tiny", "--topology=v5e:2x2", "--config.data.batch_size=8"],
    "no_fit_state": ["--config=configs/vlm_pretrain.py:tiny", "--topology=v5p:2x2x1", "--hbm_gib=0.01"],
    "bad_mesh": ["--config=configs/vlm_pretrain.py:0p5b", "--topology=v5p:2x2x1",
                 "--config.mesh.shape=(3,-1,1,1)"],
    "bad_topology": ["--config=configs/vlm_pretrain.py:tiny", "--topology=v3:2x2"],
    # CogViT stage 1 (config.trainer = cogvit_mim): student, optimizer and frozen teachers on the
    # mesh, DINOv3 with its own 100-patch view (the base preset's compile: experiments/results).
    # Also the compiled step that does not fit: state < 0.01 GiB, compiled peak ~0.03 GiB per device
    # (one compile for both; the stage-1 step fits its chip in the v5e case)
    "mim": ["--config=configs/cogvit_mim.py:tiny", "--topology=v5p:2x2x1", "--config.data.batch_size=8",
            "--config.teachers.dinov3.max_patches=100", "--hbm_gib=0.01"],
    # CogViT stage 2: the two towers FSDP-sharded, the sigmoid loss as a ring over the batch axes
    "siglip": ["--config=configs/cogvit_siglip.py:tiny,loss_impl=ring", "--topology=v5p:2x2x1",
               "--config.data.batch_size=8"],
    # SFT: the pre-training step on the SFT config (its own stage entry in the registry), v5p's program
    # (vlm_sft.abstract_program is vlm_pretrain's): built, not compiled again (HBM below its state)
    "sft": ["--config=configs/vlm_sft.py:tiny,optimizer=adamw", "--topology=v5p:2x2x1", *SMALL, "--hbm_gib=0.01"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (returncode, stdout + stderr, json report or None)}, all cases run concurrently."""
    out = tmp_path_factory.mktemp("aot")
    # conftest's JAX_PLATFORMS=cpu is what the tool wants too (topologies work under it);
    # the test process's XLA_FLAGS are for CPU compiles only.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = {name: subprocess.Popen([sys.executable, "-m", "glm5v_jax.tools.aot", *args, f"--json={out / name}.json"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in CASES.items()}
    results = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=900)
        path = out / f"{name}.json"
        results[name] = (p.returncode, text, json.loads(path.read_text()) if path.exists() else None)
    return results


@needs_libtpu
def test_step_compiles_and_fits(runs):
    from flax import nnx

    from glm5v_jax.models.build import vlm_spec_from_config
    from glm5v_jax.models.vlm import GLM5V

    rc, text, r = runs["v5p"]
    assert rc == 0, text
    assert "FITS" in text and "DOES NOT FIT" not in text
    assert r["compiled"] and r["fits"] and r["device_kind"] == "TPU v5" and r["chips"] == 4
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    assert r["hbm"] == 95 * 1024**3
    assert 0 < r["peak"] <= r["hbm"] and r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
    # parameters and two AdamW moments in f32 (12 bytes each), split 4 ways, plus the batch
    from helpers import config_module

    spec = vlm_spec_from_config(config_module("vlm_pretrain").get_config("tiny,optimizer=adamw").model)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0))),
                                                              nnx.Param)))
    assert 1.0 < r["argument"] / (params * 12 / 4) < 1.5, (r["argument"], params)
    assert r["alias"] > 0.9 * r["output"]  # the state is donated
    assert r["collectives"]["all-gather"] > 0 and r["collectives"]["all-reduce"] > 0  # FSDP gathers weights
    assert r["flops_per_device"] > 0 and r["compile_seconds"] > 0
    assert r["trainer"] == "vlm_pretrain" and f"vocab {r['vocab_size']} (the preset's)" in text


@needs_libtpu
def test_cogvit_stage1_step_compiles_on_a_mesh(runs):
    rc, text, r = runs["mim"]  # compiled, then over its 0.01 GiB of HBM (test_step_that_does_not_fit_exits_1)
    assert rc == 1, text
    assert r["trainer"] == "cogvit_mim" and r["compiled"] and r["chips"] == 4
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1} and r["global_batch"] == 8
    assert set(r["teachers"]) == {"siglip2", "dinov3"}
    assert r["collectives"]["all-gather"] > 0  # FSDP-sharded student and teachers are gathered
    assert r["analytic_flops_per_step"] > 0 and r["flops_per_device"] > 0
    assert "trainer         cogvit_mim" in text


@needs_libtpu
def test_stage2_step_compiles(runs):
    rc, text, r = runs["siglip"]
    assert rc == 0, text
    assert r["compiled"] and r["fits"] and r["chips"] == 4, r
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    assert r["trainer"] == "cogvit_siglip"
    assert r["loss_impl"] == "ring" and r["collectives"]["collective-permute"] >= 1  # the ring's ppermute


@needs_libtpu
def test_sft_stage_builds_the_pretraining_program(runs):
    """SFT's stage entry gives the step that v5p compiles: the same sharded arguments, byte for byte."""
    rc, text, r = runs["sft"]
    assert rc == 1, text
    assert r["trainer"] == "vlm_sft" and r["chips"] == 4 and not r["compiled"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    pretrain = runs["v5p"][2]
    assert pretrain["compiled"] and r["argument_lower_bound"] == pretrain["argument_lower_bound"] > r["hbm"]
    assert {k: r[k] for k in ("global_batch", "seq_len", "vocab_size", "optimizer")} == {
        k: pretrain[k] for k in ("global_batch", "seq_len", "vocab_size", "optimizer")}


@needs_libtpu
def test_other_generation_uses_its_own_chip_and_memory(runs):
    rc, text, r = runs["v5e"]
    assert rc == 0, text
    assert r["compiled"] and r["fits"] and r["device_kind"] == "TPU v5 lite" and r["chips"] == 4
    assert r["trainer"] == "cogvit_mim" and set(r["teachers"]) == {"siglip2", "dinov3"}  # stage 1 fits its chip
    assert r["hbm"] == 16 * 1024**3 and 0 < r["peak"] <= r["hbm"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}


@needs_libtpu
def test_step_that_does_not_fit_exits_1(runs):
    rc, text, r = runs["mim"]
    assert rc == 1, text
    assert "DOES NOT FIT" in text and r["compiled"] and not r["fits"]
    assert r["argument"] <= r["hbm"] < r["peak"]


@needs_libtpu
def test_state_larger_than_hbm_is_not_compiled(runs):
    rc, text, r = runs["no_fit_state"]
    assert rc == 1, text
    assert "DOES NOT FIT" in text and "alone exceed HBM" in text
    assert not r["compiled"] and not r["fits"] and r["argument_lower_bound"] > r["hbm"]


@needs_libtpu
def test_bad_mesh_is_refused_before_compiling(runs):
    rc, text, r = runs["bad_mesh"]
    assert rc == 2, text
    assert "config.mesh.shape" in text and r is None


@needs_libtpu
def test_unknown_generation_names_the_flag(runs):
    rc, text, _ = runs["bad_topology"]
    assert rc == 2, text
    assert "--topology" in text and "v5p" in text


def test_count_collectives():
    hlo = """
  %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %p), dimensions={0}
  %all-gather-done = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %all-gather-start)
  %all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add
  %a2a = f32[8]{0} all-to-all(f32[8]{0} %all-reduce.1), dimensions={0}
  %cp = f32[8]{0} collective-permute-start(f32[8]{0} %a2a), source_target_pairs={{0,1}}
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %cp), dimensions={0}
}

%all-reduce-scatter.6.clone.1 (input.46: bf16[1024,2]) -> bf16[256,2] {
  %all-reduce.354 = bf16[1024,2]{1,0} all-reduce(%input.46), channel_id=102, replica_groups={{0,1,2,3}}
  ROOT %dynamic-slice.1508 = bf16[256,2]{1,0} dynamic-slice(%all-reduce.354, %m, %c), dynamic_slice_sizes={256,2}
}
"""
    # the TPU compiler's reduce-scatter: an all-reduce + slice fusion named all-reduce-scatter
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 2, "all-to-all": 1,
                                      "collective-permute": 1}
