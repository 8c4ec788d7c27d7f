"""Stage-1 teacher-feature cache: training from a cache gives the losses of live teachers, a cache
that does not match the config is refused naming the field, records missing from it are skipped
and counted, and an unfinished build never looks like a cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from glm5v_jax.train import run as run_lib
from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
from glm5v_jax.train import teacher_cache as tc
from glm5v_jax.train.writers import read_jsonl

from helpers import tiny_mim_config

STEPS = 3


def _config(data_dir: Path):
    """Tiny: student /16 (64 patches), SigLIP2-like teacher at /8 (own view), DINOv3-like at /16."""
    cfg = tiny_mim_config(data_dir, STEPS, options="optimizer=adamw,mask=random",  # the cheapest step to compile
                          train_images=(16, 4, 4))
    cfg.teachers.siglip2.overrides.patch_size = 8
    cfg.data.eval_source.update(train_size=4, eval_size=4)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    cfg = _config(root / "data")
    return cfg, tc.build_cache(cfg, root / "cache", batch_size=8)


def test_cache_layout_and_training_from_it_matches_live_teachers(built, tmp_path, monkeypatch):
    from glm5v_jax.train import cogvit_mim

    cfg, cache_dir = built
    cache = tc.open_cache(cache_dir, cfg)
    assert cache.meta["num_records"] == 24 == cache.meta["cached_records"]
    assert cache.meta["teachers"]["siglip2"]["view"] == [8, 256] and cache.meta["teachers"]["dinov3"]["view"] is None
    sources = cache.meta["sources"]  # rows: sources in ConfigDict order (by name), each unshuffled
    assert [(sources[n]["first_row"], sources[n]["size"]) for n in ("instruction", "natural", "scientific")] == [
        (0, 4), (4, 16), (20, 4)]
    sig = np.load(cache_dir / "siglip2.npy", mmap_mode="r")
    assert sig.dtype == np.uint16 and sig.shape == (24, 64, 64)
    assert not list(cache_dir.parent.glob("cache.tmp-*"))

    live = run_lib.train_and_evaluate(cfg, str(tmp_path / "live"))
    cfg.teacher_cache = str(cache_dir)
    monkeypatch.setattr(cogvit_mim, "teachers_from_config", None)  # from the cache, no teacher is built or run
    cached = run_lib.train_and_evaluate(cfg, str(tmp_path / "cached"))
    rows = {name: [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
            for name in ("live", "cached")}
    assert [r["step"] for r in rows["cached"]] == list(range(1, STEPS + 1))
    for a, b in zip(rows["live"], rows["cached"]):
        for key in ("loss", "train/loss/siglip2", "train/loss/dinov3"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
    assert live["step"] == cached["step"] == STEPS
    assert cached.get("data/skipped/not_in_teacher_cache", 0) == 0


def test_mismatched_config_is_refused_naming_the_field(built):
    cfg, cache_dir = built
    meta = str(cache_dir / "meta.json")
    changes = {
        "teachers.siglip2.overrides": lambda c: setattr(c.teachers.siglip2.overrides, "depth", 2),
        "teachers.dinov3.checkpoint": lambda c: setattr(c.teachers.dinov3, "checkpoint", "dino.pth"),
        "teachers.siglip2.max_patches": lambda c: setattr(c.teachers.siglip2, "max_patches", 200),
        "student.max_patches": lambda c: setattr(c.model.vision, "max_patches", 100),
        "sources.natural.train_size": lambda c: setattr(c.data.sources.natural, "train_size", 17),
        "teachers are": lambda c: c.teachers.__delattr__("dinov3"),
    }
    for field, change in changes.items():
        c = _config(Path(cfg.data.data_dir))
        change(c)
        with pytest.raises(ValueError, match=field) as e:
            tc.open_cache(cache_dir, c)
        assert meta in str(e.value)


def test_record_not_in_cache_is_skipped_and_counted(built):
    cfg, cache_dir = built
    records = list(tc.named_train_sources(cfg.data, None)["scientific"])
    stranger = dict(records[0], id="scientific/not-cached")
    lookup = tc.open_cache(cache_dir, cfg).lookup()
    batch_cfg = ImageBatchConfig(batch_size=4, patch_size=16, max_patches=64, shuffle=False, num_epochs=1)
    it = make_image_batch_iterator(records[:2] + [stranger] + records[2:], batch_cfg, attach=lookup)
    batch = next(it)
    assert it.stats["skipped/not_in_teacher_cache"] == 1 and it.stats["images"] == 4
    rows = np.load(cache_dir / "dinov3.npy", mmap_mode="r")[20:24]  # scientific: the last 4 rows
    np.testing.assert_array_equal(batch["teacher/dinov3"], rows)
    assert batch["teacher/siglip2"].shape == (4, 64, 64) and batch["teacher/siglip2"].dtype == np.uint16


def test_unfinished_build_is_never_picked_up(built, tmp_path, monkeypatch):
    cfg, cache_dir = built
    with pytest.raises(FileExistsError, match="--cache_dir"):
        tc.build_cache(cfg, cache_dir)

    def crash(directory, meta):
        raise KeyboardInterrupt("killed while writing meta.json")

    monkeypatch.setattr(tc, "_fill", lambda arrays, sources, *a: ([""] * sum(map(len, sources.values())), {}))
    monkeypatch.setattr(tc, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        tc.build_cache(cfg, tmp_path / "crashed")
    assert not list(tmp_path.iterdir())  # neither the cache nor its temporary directory

    no_meta = tmp_path / "no_meta"  # e.g. a copy cut short
    shutil.copytree(cache_dir, no_meta)
    (no_meta / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        tc.open_cache(no_meta, cfg)
    shutil.copytree(cache_dir, tmp_path / "killed.tmp-abc123")  # a build killed before its rename
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tc.open_cache(tmp_path / "killed", cfg)
