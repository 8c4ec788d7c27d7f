"""CogViT stage 1: grid resampling against NumPy bilinear, the student with one head per teacher,
teacher construction errors, and a tiny end-to-end run of the trainer (random-init teachers)
that logs the k-NN baseline at step 0, trains, checkpoints and resumes."""
from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.models.build import vision_spec_from_config
from glm5v_jax.models.cogvit_mim import MIMStudent, grid_of, resample_tokens
from glm5v_jax.models.teachers.registry import build_teacher
from glm5v_jax.train.writers import read_jsonl

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import cogvit_mim as mim_config  # noqa: E402


def _grid(h, w, n):
    yx = np.zeros((n, 2), np.int32)
    rows, cols = np.indices((h, w))
    yx[:h * w] = np.stack([rows.ravel(), cols.ravel()], -1)
    valid = np.zeros(n, bool)
    valid[:h * w] = True
    return yx, valid


def _bilinear(src, dst_h, dst_w):
    """NumPy reference: sample src [h, w, D] at the student's patch centres."""
    h, w, _ = src.shape
    out = np.zeros((dst_h, dst_w, src.shape[-1]))
    for y in range(dst_h):
        for x in range(dst_w):
            fy = min(max((y + 0.5) * h / dst_h - 0.5, 0), h - 1)
            fx = min(max((x + 0.5) * w / dst_w - 0.5, 0), w - 1)
            y0, x0 = int(np.floor(fy)), int(np.floor(fx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ay, ax = fy - y0, fx - x0
            out[y, x] = ((1 - ay) * (1 - ax) * src[y0, x0] + (1 - ay) * ax * src[y0, x1]
                         + ay * (1 - ax) * src[y1, x0] + ay * ax * src[y1, x1])
    return out


@pytest.mark.parametrize("src_hw,dst_hw", [((4, 6), (4, 6)), ((4, 6), (8, 12)), ((6, 4), (3, 5))])
def test_resample_tokens_is_bilinear_per_image(src_hw, dst_hw):
    rng = np.random.default_rng(0)
    d, ns, nd = 3, 40, 100
    src_yx, src_valid = _grid(*src_hw, ns)
    dst_yx, dst_valid = _grid(*dst_hw, nd)
    perm = rng.permutation(src_hw[0] * src_hw[1])  # token order must not matter
    src_yx[:len(perm)] = src_yx[perm]
    grid = rng.normal(size=src_hw + (d,))
    tokens = np.zeros((ns, d), np.float32)
    tokens[:len(perm)] = grid[src_yx[:len(perm), 0], src_yx[:len(perm), 1]]
    tokens[len(perm):] = 1e3  # padding garbage must not leak
    out = resample_tokens(jnp.asarray(tokens)[None], jnp.asarray(src_yx)[None], jnp.asarray(src_valid)[None],
                          jnp.asarray(dst_yx)[None], jnp.asarray(dst_valid)[None])[0]
    ref = _bilinear(grid, *dst_hw)
    n = dst_hw[0] * dst_hw[1]
    np.testing.assert_allclose(np.asarray(out)[:n], ref[dst_yx[:n, 0], dst_yx[:n, 1]], rtol=1e-5, atol=1e-5)
    assert not np.asarray(out)[n:].any()
    np.testing.assert_array_equal(grid_of(jnp.asarray(src_yx)[None], jnp.asarray(src_valid)[None])[0], src_hw)


def test_student_has_one_head_per_teacher():
    cfg = mim_config.get_config("tiny")
    spec = vision_spec_from_config(cfg.model.vision, dtype="float32")
    student = MIMStudent(spec, {"siglip2": 24, "dinov3": 40}, rngs=nnx.Rngs(0))
    yx, valid = _grid(4, 4, 64)
    patches = jnp.zeros((2, 64, 768))
    tokens, preds = student(patches, jnp.asarray(yx)[None].repeat(2, 0), jnp.asarray(valid)[None].repeat(2, 0))
    assert tokens.shape == (2, 64, 128)
    assert preds["siglip2"].shape == (2, 64, 24) and preds["dinov3"].shape == (2, 64, 40)
    with pytest.raises(ValueError, match="teacher_dims"):
        MIMStudent(spec, {}, rngs=nnx.Rngs(0))


def test_teacher_construction_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config.teachers.t.kind"):
        build_teacher("t", "clip", "B/16")
    with pytest.raises(FileNotFoundError, match=r"config.teachers.t.checkpoint"):
        build_teacher("t", "dinov3", "S", checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"config.teachers.t.overrides"):
        build_teacher("t", "siglip2", "B/16", overrides={"no_such_field": 1})
    t = build_teacher("t", "dinov3", "S", overrides={"width": 32, "depth": 1, "num_heads": 2}, seed=3)
    assert t.dim == 32 and t.patch_size == 16 and "random init (seed 3)" in t.source


def _tiny_config(tmp_path, steps):
    cfg = mim_config.get_config("tiny,dtype=float32")
    cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = steps, 1, 100, 2
    cfg.model.vision.depth = 1
    for t in cfg.teachers.values():
        t.overrides.depth = 1
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.batch_size = 4
    cfg.data.sources.natural.train = 24
    cfg.data.sources.instruction.train = 8
    cfg.data.sources.scientific.train = 8
    cfg.data.eval_images, cfg.data.knn_train_images, cfg.data.knn_k = 8, 16, 3
    for g in cfg.optim.groups.values():
        g.warmup_steps = 1
    return cfg


def test_tiny_run_logs_baseline_trains_checkpoints_and_resumes(tmp_path):
    from glm5v_jax.train import cogvit_mim

    workdir = tmp_path / "run"
    last = cogvit_mim.train_and_evaluate(_tiny_config(tmp_path, 4), str(workdir))
    rows = read_jsonl(workdir / "metrics.jsonl")
    baseline = [r for r in rows if r["step"] == 0]
    assert baseline and 0.0 <= baseline[0]["eval/knn/shape"] <= 1.0 and "eval/knn/colour" in baseline[0]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in train)
    for r in train:  # exactly round(0.35 x valid) per image: the batch fraction is close to 0.35
        assert abs(r["train/masked_fraction"] - 0.35) < 0.03
    assert "train/loss/siglip2" in train[0] and "train/loss/dinov3" in train[0]
    assert last["step"] == 4 and "eval/knn/shape" in last
    assert (workdir / "checkpoints" / "4").is_dir() and (workdir / "routing.txt").exists()
    table = (workdir / "eval_table.md").read_text()
    assert "| knn/colour |" in table and "step 0 (random init)" in table and "step 4" in table

    # Resume: the same command with more steps continues from step 4.
    cogvit_mim.train_and_evaluate(_tiny_config(tmp_path, 6), str(workdir))
    steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_step_split_benchmark_smoke():
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_mim_step.py"), "--batch", "2",
                           "--repeats", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| teachers (forward + standardisation) |" in proc.stdout and "| student (fwd+bwd) |" in proc.stdout
