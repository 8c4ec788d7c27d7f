"""CogViT stage 1: grid resampling against NumPy bilinear, the student with one head per teacher,
teacher construction errors, and a tiny end-to-end run of the trainer (random-init teachers)
that logs the k-NN baseline at step 0, trains, checkpoints and resumes. Teachers of another patch
size: their view's default budget, their targets on the student's grid (a fake teacher whose
features are a known function of image position), and a tiny run with a /8 teacher."""
from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.train import run as run_lib
from glm5v_jax.models.build import vision_spec_from_config
from glm5v_jax.models.cogvit_mim import MIMStudent, grid_of, resample_tokens
from glm5v_jax.models.teachers.registry import build_teacher
from glm5v_jax.train.writers import read_jsonl

from helpers import config_module, tiny_mim_config

ROOT = Path(__file__).parents[1]
mim_config = config_module("cogvit_mim")


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
    cfg = tiny_mim_config(tmp_path / "data", steps, eval_every=100, checkpoint_every=2)
    cfg.data.eval_source.update(train_size=16, eval_size=8)  # k-NN reference and query images
    cfg.data.knn_k = 3
    return cfg


def test_tiny_run_logs_baseline_trains_checkpoints_and_resumes(tmp_path):

    workdir = tmp_path / "run"
    last = run_lib.train_and_evaluate(_tiny_config(tmp_path, 4), str(workdir))
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
    assert "| knn/colour |" in table and "step 0 (start)" in table and "step 4" in table

    # Resume: the same command with more steps continues from step 4.
    run_lib.train_and_evaluate(_tiny_config(tmp_path, 6), str(workdir))
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


class _PositionTeacher(nnx.Module):
    """A fake teacher whose token at each patch is f(u, v) of the patch centre's normalised image
    position (u = (row + 0.5) / rows): [u, v, u v, 1 + 2u - 3v]. Bilinear in (u, v), so bilinear
    resampling onto another grid of the same image reproduces it exactly. It insists on its own
    patch size, so it cannot be fed the student's view."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, patches, patch_yx, valid):
        assert patches.shape[-1] == self.patch_size ** 2 * 3, patches.shape
        uv = (patch_yx + 0.5) / grid_of(patch_yx, valid)[:, None, :]
        return {"tokens": jnp.where(valid[..., None], _position_features(uv), 0.0)}


def _position_features(uv):
    u, v = uv[..., 0], uv[..., 1]
    return jnp.stack([u, v, u * v, 1 + 2 * u - 3 * v], -1)


@pytest.mark.parametrize("view", [(8, 256), (14, 84)])
def test_resampled_teacher_targets_match_the_function_of_image_position(view):
    from glm5v_jax.data import shapes_world
    from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
    from glm5v_jax.train.teacher_cache import student_grid_tokens

    records = [shapes_world.generate_image_example(0, "train", i) for i in range(6)]
    cfg = ImageBatchConfig(batch_size=6, patch_size=16, max_patches=64, shuffle=False, num_epochs=1,
                           teacher_views=(view,))
    batch = {k: jnp.asarray(v) for k, v in next(make_image_batch_iterator(records, cfg)).items()}
    got = np.asarray(student_grid_tokens(_PositionTeacher(view[0]), batch, view))  # [B, 64, 4]
    yx, valid, grid = (np.asarray(batch[k]) for k in ("patch_yx", "valid", "grid"))
    want = np.asarray(_position_features((yx + 0.5) / grid[:, None, :]))
    # Exact where the student's centre lies inside the teacher's grid of centres (else clamped).
    t_grid = np.asarray(batch[f"grid@p{view[0]}n{view[1]}"])[:, None, :]
    pos = (yx + 0.5) * t_grid / grid[:, None, :] - 0.5
    inside = valid & np.all((pos >= 0) & (pos <= t_grid - 1), -1)
    assert inside.sum() > 0.7 * valid.sum()
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-5)
    assert not got[~valid].any()


def test_teacher_view_budget_defaults_to_the_students_pixel_area():
    from glm5v_jax.train.teacher_cache import teacher_view

    cfg = mim_config.get_config("base")  # student /16, 256 patches
    assert teacher_view(cfg, "siglip2", 16) is None  # the student's own view
    assert teacher_view(cfg, "siglip2", 14) == (14, 334)  # round(256 x (16/14)^2)
    assert teacher_view(cfg, "siglip2", 8) == (8, 1024)
    cfg.teachers.siglip2.max_patches = 300
    assert teacher_view(cfg, "siglip2", 14) == (14, 300) and teacher_view(cfg, "siglip2", 16) == (16, 300)
    cfg.teachers.siglip2.max_patches = -1
    with pytest.raises(ValueError, match="config.teachers.siglip2.max_patches"):
        teacher_view(cfg, "siglip2", 14)


def test_tiny_run_with_a_teacher_of_another_patch_size(tmp_path):

    cfg = _tiny_config(tmp_path, 2)
    cfg.eval_every, cfg.optim.name, cfg.mim.layout = 0, "adamw", "random"  # the cheapest step to compile
    del cfg.teachers["siglip2"]
    cfg.teachers.dinov3.overrides.patch_size = 8  # a /8 teacher for the /16 student: its own 256-patch view
    last = run_lib.train_and_evaluate(cfg, str(tmp_path / "run"))
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and last["step"] == 2
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["train/loss/dinov3"]) for r in train)
    assert all(abs(r["train/masked_fraction"] - 0.35) < 0.03 for r in train)
