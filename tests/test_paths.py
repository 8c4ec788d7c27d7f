"""User-supplied paths through etils.epath (glm5v_jax.paths): `gs://` URIs stay URIs, local
relative paths become absolute, globs expand with wildcards in several components, and what
needs a local file says so."""
from __future__ import annotations

import os

import pytest
from etils import epath

from glm5v_jax import paths as paths_lib
from glm5v_jax.errors import ConfigError
from glm5v_jax.paths import as_path, expand_globs


def test_a_gs_uri_stays_a_uri_and_a_relative_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = as_path("gs://bucket/run")
    assert isinstance(run, epath.Path) and os.fspath(run) == "gs://bucket/run"  # no cwd prefix
    assert os.fspath(run / "checkpoints" / "12") == "gs://bucket/run/checkpoints/12"
    local = as_path("runs/tiny")
    assert isinstance(local, epath.Path) and local.is_absolute()
    assert os.fspath(local) == os.path.join(str(tmp_path), "runs", "tiny")
    assert os.fspath(as_path(tmp_path / "x")) == str(tmp_path / "x")  # absolute and os.PathLike inputs too


def test_expand_globs_with_wildcards_in_several_components(tmp_path):
    for split in ("train", "eval"):
        for shard in ("00", "01"):
            d = tmp_path / f"part-{shard}" / split
            d.mkdir(parents=True)
            (d / f"data-{shard}.array_record").write_bytes(b"")
    (tmp_path / "part-00" / "train" / "notes.txt").write_text("")
    found = expand_globs(f"{tmp_path}/part-*/train/data-*.array_record", "config.data.sources.x.train_split")
    assert found == [str(tmp_path / f"part-{s}" / "train" / f"data-{s}.array_record") for s in ("00", "01")]
    found = expand_globs(f"{tmp_path}/part-0?/*/data-*.array_record, {tmp_path}/part-00/train/notes.txt", "f")
    assert len(found) == 5 and found == sorted(found)  # 4 shards from the glob, 1 plain file; sorted, deduplicated
    with pytest.raises(ConfigError) as info:
        expand_globs(f"{tmp_path}/part-*/test/*.array_record", "config.data.sources.x.eval_split")
    assert info.value.field == "config.data.sources.x.eval_split" and "no files match" in str(info.value)


def test_expand_globs_on_a_uri_globs_below_its_first_wildcard(monkeypatch):
    """No network here: the base directory and the pattern handed to epath are checked instead."""
    calls = []

    class FakeDir:
        def __init__(self, base):
            self.base = base

        def glob(self, pattern):
            calls.append((self.base, pattern))
            return [f"{self.base}/a/train-0.ar", f"{self.base}/b/train-1.ar"]

    monkeypatch.setattr(paths_lib, "as_path", lambda p: FakeDir(os.fspath(p)))
    found = paths_lib.expand_globs("gs://bucket/data/*/train-*.ar", "f")
    assert calls == [("gs://bucket/data", "*/train-*.ar")]
    assert found == ["gs://bucket/data/a/train-0.ar", "gs://bucket/data/b/train-1.ar"]


def test_a_teacher_cache_on_an_object_store_is_refused_naming_the_field():
    from glm5v_jax.train.teacher_cache import local_cache_dir, open_cache

    with pytest.raises(ConfigError) as info:
        open_cache("gs://bucket/cache", config=None)
    assert info.value.field == "config.teacher_cache" and "local disk" in str(info.value)
    with pytest.raises(ConfigError, match="--cache_dir"):
        local_cache_dir("gs://bucket/cache", "--cache_dir")


def test_tokenizer_and_checkpoint_paths_go_through_epath(tmp_path, monkeypatch):
    from glm5v_jax.data.tokenizer import Tokenizer, train_tokenizer
    from glm5v_jax.models.two_tower import checkpoint_dir

    texts = [f"{k} red circles and {k + 1} blue squares" for k in range(200)]
    tok = train_tokenizer(texts, epath.Path(tmp_path) / "sub" / "tok.model", vocab_size=400)  # parent created
    again = Tokenizer(epath.Path(tmp_path) / "sub" / "tok.model")
    assert again.serialized_model_proto == tok.serialized_model_proto
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "tok.model"]  # no temporary file left
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert os.fspath(checkpoint_dir("run")) == str(tmp_path / "run" / "checkpoints")
