"""Bad ArrayRecord files: a corrupt shard's unreadable records are skipped, counted
(`skipped/bad_record`) and logged with their file and position; a file that cannot be opened
(truncated, another format) is an error naming it, or left out with a warning on request; batches
hold only good records, through the registry path the trainer uses, grain workers and a resume."""
from __future__ import annotations

import io
import logging
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from glm5v_jax.data.image_batches import ImageBatchConfig, make_image_batch_iterator
from glm5v_jax.data.pipeline import PipelineConfig, array_record_source, make_batch_iterator
from glm5v_jax.data.source_registry import open_sources, source_config
from glm5v_jax.data.sources import TfdsCaptionSource, UnreadableFilesError, is_bad_record
from glm5v_jax.errors import ConfigError
from helpers import FakeTokenizer

array_record_module = pytest.importorskip("array_record.python.array_record_module")
tf_example_pb2 = pytest.importorskip("tensorflow_datasets.proto").tf_example_pb2

N_PER_SHARD = 16  # 48x48 noise PNGs, ~7 KB each: a shard spans 3 blocks of 64 KiB, its middle is data
CAPTION = re.compile(r"rec ([a-z]-\d\d)")


TOK = FakeTokenizer()


def _example(shard: str, k: int) -> bytes:
    pixels = np.random.default_rng([ord(shard), k]).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    ex = tf_example_pb2.Example()
    for key, value in dict(image=buf.getvalue(), kind=b"image", caption_en=f"rec {shard}-{k:02d}".encode(),
                           width=48, height=48, id=f"{shard}-{k:02d}".encode()).items():
        f = ex.features.feature[key]
        (f.int64_list if isinstance(value, int) else f.bytes_list).value.append(value)
    return ex.SerializeToString()


def _write_shard(path, shard: str, records=None) -> str:
    w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for data in records if records is not None else (_example(shard, k) for k in range(N_PER_SHARD)):
        w.write(data)
    w.close()
    return str(path)


def _overwrite_middle(path: str) -> None:
    """4 KiB of random bytes over the middle of the file (records there fail their checksum)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(1).bytes(4096))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _unreadable(path: str) -> list[int]:
    """Positions whose record the ArrayRecord reader itself cannot read (the ground truth)."""
    reader = array_record_module.ArrayRecordReader(path)
    bad = []
    for i in range(reader.num_records()):
        try:
            reader.read([i])
        except RuntimeError:
            bad.append(i)
    reader.close()
    return bad


@pytest.fixture
def shards(tmp_path):
    """{name: path}: good shards a and c, b with its middle overwritten, d truncated, e not ArrayRecord."""
    paths = {s: _write_shard(tmp_path / f"{s}.array_record", s) for s in "abcd"}
    _overwrite_middle(paths["b"])
    _truncate(paths["d"])
    paths["e"] = str(tmp_path / "e.array_record")
    with open(paths["e"], "wb") as f:
        f.write(b"not an ArrayRecord file\n" * 100)
    return paths


def _good_ids(paths: dict[str, str], names: str) -> list[str]:
    """The ids of the records of shards `names` that can be read, sorted."""
    bad = {s: _unreadable(paths[s]) for s in names}
    return [f"{s}-{k:02d}" for s in names for k in range(N_PER_SHARD) if k not in bad[s]]


def _pipeline_config(**kw) -> PipelineConfig:
    base = dict(seq_len=160, rows_per_batch=3, max_images_per_row=2, max_patches=16, seed=0, num_epochs=1,
                task_weights={"caption": 1.0})
    return PipelineConfig(**{**base, **kw})


def _captions(batches) -> list[str]:
    """The record ids of the captions in the batches, once per packed document."""
    return [m for b in batches for row in b["tokens"] for m in CAPTION.findall(TOK.decode(row))]


def _data_config(train_split: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(sources=dict(corpus=source_config("array_record", train_split=train_split,
                                                                             **fields))))


def test_corrupt_shard_records_skipped_counted_and_named(tmp_path, shards, caplog):
    """Through the trainer's path (registry globs -> mixture -> packed batches): only good records."""
    bad = _unreadable(shards["b"])
    assert bad and not _unreadable(shards["a"])  # the overwrite hit records, not padding
    data = open_sources(_data_config(f"{tmp_path}/[abc].array_record"), tmp_path)
    caplog.set_level(logging.WARNING, logger="glm5v_jax.data.sources")
    it = make_batch_iterator(data.mixture("train", seed=0), TOK, _pipeline_config())
    seen = _captions(list(it))
    assert sorted(seen) == _good_ids(shards, "abc")  # each good record once, no bad one
    assert it.stats["skipped/bad_record"] == len(bad)
    assert it.stats["examples"] == 3 * N_PER_SHARD - len(bad)
    for pos in bad:
        assert f"record {pos} of {shards['b']} cannot be read" in caplog.text


@pytest.mark.parametrize("name", ["d", "e"])  # truncated; not ArrayRecord at all
def test_unopenable_file_is_named(tmp_path, shards, name):
    with pytest.raises(ConfigError, match=re.escape(shards[name])) as e:
        open_sources(_data_config(f"{tmp_path}/a.array_record,{shards[name]}"), tmp_path)
    assert e.value.field == "config.data.sources.corpus.train_split" and "skip_bad_files" in str(e.value)
    with pytest.raises(UnreadableFilesError, match=re.escape(shards[name])):
        array_record_source([shards["a"], shards[name]])


def test_skip_bad_files_leaves_unopenable_files_out(tmp_path, shards, caplog):
    """A corrupt and a truncated shard among good ones: batches of the good records only."""
    caplog.set_level(logging.WARNING, logger="glm5v_jax.data.sources")
    data = open_sources(_data_config(f"{tmp_path}/*.array_record", skip_bad_files=True), tmp_path)
    assert f"{shards['d']} cannot be opened" in caplog.text and f"{shards['e']} cannot be opened" in caplog.text
    it = make_batch_iterator(data.mixture("train", seed=0), TOK, _pipeline_config())
    assert sorted(_captions(list(it))) == _good_ids(shards, "abc")
    assert it.stats["skipped/bad_record"] == len(_unreadable(shards["b"]))
    with pytest.raises(UnreadableFilesError):  # nothing left to read
        array_record_source([shards["d"], shards["e"]], skip_bad_files=True)


def test_bad_records_counted_through_workers_and_resume(shards):
    files = [shards["a"], shards["b"], shards["c"]]
    one = make_batch_iterator(array_record_source(files), TOK, _pipeline_config())
    expected = list(one)
    workers = make_batch_iterator(array_record_source(files), TOK, _pipeline_config(num_workers=2))
    got = list(workers)
    assert len(got) == len(expected) and all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(got, expected))
    assert workers.stats == one.stats and one.stats["skipped/bad_record"] == len(_unreadable(shards["b"]))
    it = make_batch_iterator(array_record_source(files), TOK, _pipeline_config())
    next(it)
    state = it.get_state()
    resumed = make_batch_iterator(array_record_source(files), TOK, _pipeline_config())
    resumed.set_state(state)
    rest = list(resumed)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(rest, expected[1:]))
    assert len(rest) == len(expected) - 1 and resumed.stats == one.stats


def test_unparsable_record_and_image_batches(tmp_path, shards, caplog):
    path = _write_shard(tmp_path / "json.array_record", "j", [b'{"caption_en": "ok"}', b"\xff not json"])
    caplog.set_level(logging.WARNING, logger="glm5v_jax.data.sources")
    src = array_record_source([path], parse="json")
    assert src[0]["caption_en"] == "ok" and is_bad_record(src[1])
    assert f"record 1 of {path} cannot be parsed (json)" in caplog.text
    it = make_image_batch_iterator(array_record_source([shards["a"], shards["b"]]),
                                   ImageBatchConfig(batch_size=2, max_patches=16, num_epochs=1, shuffle=False))
    batches = list(it)
    assert it.stats["skipped/bad_record"] == len(_unreadable(shards["b"]))
    assert len(batches) == (2 * N_PER_SHARD - len(_unreadable(shards["b"]))) // 2


def test_tfds_source_read_error_is_a_bad_record(caplog):
    class Corrupt:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")

    src = TfdsCaptionSource("tiny", "train")
    src._ds = Corrupt()
    caplog.set_level(logging.WARNING, logger="glm5v_jax.data.sources")
    assert is_bad_record(src[1]) and "tfds tiny/train: record 1 cannot be read" in caplog.text
