"""Record sources: mixtures, any TFDS dataset, ArrayRecord files (the adapters; the table of source
kinds that configs name is `glm5v_jax.data.source_registry`).

Every source yields record dicts in the shapes-world layout (`image` bytes, `kind`,
`caption_en`, `qa_json`, `boxes_json`, `text`, ...; see `glm5v_jax.data.pipeline`), so
the same templates and packing serve the embedded data and real corpora.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from glm5v_jax.data.templates import as_str
from glm5v_jax.errors import ConfigError

log = logging.getLogger(__name__)

BAD_RECORD = "skipped/bad_record"  # the pipelines' counter of records that cannot be read or parsed
_BAD_KEY = "__bad_record__"


def bad_record(where: str) -> dict[str, Any]:
    """The stand-in a source returns for a record it cannot read or parse (`where`: file and
    position): the pipelines skip it and count it under `BAD_RECORD`, it never reaches a batch."""
    return {_BAD_KEY: where, "id": where}


def is_bad_record(record: Any) -> bool:
    return isinstance(record, Mapping) and _BAD_KEY in record


def _warn_bad(counts: dict[Any, int], key: Any, message: str, *args: Any) -> None:
    """Log `message % args` for the first 10 bad records of `key` (a file) in this process, then
    every 1000th."""
    counts[key] = n = counts.get(key, 0) + 1
    if n <= 10 or n % 1000 == 0:
        log.warning(message + " (bad record %d of it in this process)", *args, n)


def _as_map_dataset(source: Any) -> grain.MapDataset:
    return source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)


@dataclasses.dataclass(frozen=True)
class TagSource:
    """Prefix record ids with the source name (ids of different sources may collide)."""

    name: str

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(record)
        out["id"] = f"{self.name}/{as_str(record.get('id'))}"
        return out


def mix_sources(sources: Mapping[str, Any], weights: Mapping[str, float], seed: int) -> grain.MapDataset:
    """Mix random-access sources (e.g. multimodal and text-only) with the given weights.

    Each source is shuffled (seed folded with its position) and repeated, so a small source
    is revisited in new orders rather than cutting the mixture short; `grain.MapDataset.mix`
    then interleaves them in proportion. The result is finite: one "epoch" is long enough
    for the source with the most records per unit weight to be seen once. Record ids get
    the source name as prefix. Feed it to `make_batch_iterator` like any source.
    """
    names = list(sources)
    if not names:
        raise ValueError("mix_sources: no sources")
    if set(weights) != set(names):
        raise ValueError(f"mix_sources: weights for {sorted(weights)} but sources {sorted(names)}")
    w = np.asarray([float(weights[k]) for k in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mix_sources: weights must be >= 0 with a positive sum, got {dict(weights)}")
    names = [k for k, wk in zip(names, w) if wk > 0]
    w = w[w > 0] / w[w > 0].sum()
    parts, lengths = [], []
    for k, name in enumerate(names):
        ds = _as_map_dataset(sources[name])
        if len(ds) == 0:
            raise ValueError(f"mix_sources: source {name!r} is empty")
        lengths.append(len(ds))
        ds = ds.shuffle(seed=(int(seed) + 1_000_003 * (k + 1)) % 2 ** 32).repeat().map(TagSource(name))
        parts.append(ds)
    total = max(math.ceil(n / wk) for n, wk in zip(lengths, w))
    return grain.MapDataset.mix(parts, [float(x) for x in w])[:total]


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    value: Any = example
    for part in key.split("/"):
        value = value[part]
    return value


def _first_text(value: Any) -> str:
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        for v in (value.reshape(-1) if isinstance(value, np.ndarray) else value):
            s = as_str(v).strip()
            if s:
                return s
        return ""
    return as_str(value).strip()


def caption_record(image: Any, caption: str, record_id: str) -> dict[str, Any]:
    """A record of the pipeline's format for a captioning pair (image bytes or uint8 array)."""
    if isinstance(image, np.ndarray) and image.dtype != np.object_ and image.ndim >= 2:
        height, width = int(image.shape[0]), int(image.shape[1])
    else:
        height = width = -1  # unknown until decoded
    return dict(image=image, width=width, height=height, kind="image", caption_en=caption, caption_zh="",
                ocr="", qa_json="[]", boxes_json="[]", text="", id=record_id)


class TfdsCaptionSource:
    """Random-access adapter: a TFDS dataset with an image and a text feature -> caption records.

    Uses `tfds.data_source` (ArrayRecord; no TensorFlow import). The image feature may be
    decoded (uint8 array, `tfds.features.Image`) or encoded bytes; the text feature a string
    or a list of strings (the first non-empty one is used); nested keys as "a/b". Pickles as
    its arguments and reopens the data source lazily (grain workers).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                 text_key: str = "caption"):
        self._args = (name, split, data_dir, image_key, text_key)
        self._ds = None
        self._n_bad: dict[Any, int] = {}

    def _source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency)
            name, split, data_dir, _, _ = self._args
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        return self._ds

    def __len__(self) -> int:
        return len(self._source())

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, split, _, image_key, text_key = self._args
        try:
            ex = self._source()[index]
        except Exception as e:  # noqa: BLE001  a corrupt shard: skip the record, not the run
            _warn_bad(self._n_bad, None, "tfds %s/%s: record %d cannot be read, skipped (%s: %s)",
                      name, split, index, type(e).__name__, e)
            return bad_record(f"{name}/{split}/{index}")
        return caption_record(_lookup(ex, image_key), _first_text(_lookup(ex, text_key)), f"{name}/{split}/{index}")

    def __getstate__(self):
        return {"_args": self._args, "_ds": None, "_n_bad": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"TfdsCaptionSource{self._args}"


def tfds_source(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                text_key: str = "caption") -> TfdsCaptionSource:
    """Adapt any TFDS dataset with an image and a text feature into caption records."""
    return TfdsCaptionSource(name, split, data_dir, image_key, text_key)


def parse_tf_example(serialized: bytes) -> dict[str, Any]:
    """A serialized `tf.train.Example` with flat features -> dict (no TensorFlow).

    One-value features become scalars (bytes / int / float), others lists. This is how TFDS
    writes Text, scalar and bytes (`Tensor(dtype=object)`) features to ArrayRecord; shaped
    numeric tensors come back flat (use `tfds.data_source` for those).
    """
    from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415  (protobuf only)

    example = tf_example_pb2.Example.FromString(bytes(serialized))
    out: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        out[key] = values[0] if len(values) == 1 else values
    return out


def _json_record(serialized: bytes) -> dict[str, Any]:
    return json.loads(bytes(serialized).decode("utf-8"))


PARSERS: dict[str, Callable[[bytes], dict[str, Any]]] = {"tf_example": parse_tf_example, "json": _json_record}


@dataclasses.dataclass(frozen=True)
class _Parse:
    parse: Any

    @property
    def name(self) -> str:
        return self.parse if isinstance(self.parse, str) else getattr(self.parse, "__name__", repr(self.parse))

    def __call__(self, serialized: bytes) -> dict[str, Any]:
        fn = PARSERS[self.parse] if isinstance(self.parse, str) else self.parse
        record = fn(serialized)
        for key in ("image", "qa_json", "boxes_json"):  # list-valued when empty in tf.Example
            if isinstance(record.get(key), list) and not record[key]:
                record[key] = b"" if key == "image" else "[]"
        return record


@dataclasses.dataclass(frozen=True)
class _Shard:
    """All records of one file, as grain's ArrayRecordDataSource takes it (its FileInstruction
    protocol), so that it does not open the file again to count them."""

    filename: str
    examples_in_shard: int
    skip: int = 0

    @property
    def take(self) -> int:
        return self.examples_in_shard


class UnreadableFilesError(ValueError):
    """ArrayRecord files that cannot be opened; `files` maps each to the reason."""

    def __init__(self, files: Mapping[str, str]):
        self.files = dict(files)
        listed = "; ".join(f"{path} ({why})" for path, why in list(self.files.items())[:5])
        more = f"; and {len(self.files) - 5} more" if len(self.files) > 5 else ""
        super().__init__(f"{len(self.files)} file(s) cannot be opened as ArrayRecord (truncated, corrupt "
                         f"index or another format): {listed}{more}")


def _count_records(path: str) -> int | str:
    """The number of records in an ArrayRecord file, or why it cannot be opened (its index,
    at the end of the file, is missing when it is truncated or in another format)."""
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records() if reader.ok() else None
        reader.close()  # raises the open error of a reader that is not ok
    except Exception as e:  # noqa: BLE001  riegeli reports as RuntimeError, filesystems as OSError
        return f"{type(e).__name__}: {e}"
    return "not a readable ArrayRecord file" if n is None else int(n)


def _open_files(paths: Sequence[str], skip_bad_files: bool) -> dict[str, int]:
    """{path: records} of the files that open (each opened once, in threads); the others are an
    UnreadableFilesError, or with `skip_bad_files` a warning each and left out."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(64, len(paths)))) as pool:
        found = dict(zip(paths, pool.map(_count_records, paths)))
    bad = {p: why for p, why in found.items() if isinstance(why, str)}
    if bad and not skip_bad_files:
        raise UnreadableFilesError(bad)
    for path, why in bad.items():
        log.warning("array_record: %s cannot be opened, left out with all its records (%s)", path, why)
    good = {p: n for p, n in found.items() if not isinstance(n, str)}
    if not good:
        raise UnreadableFilesError(bad)
    return good


class ArrayRecordSource:
    """Random access to the records of ArrayRecord files, parsed (`array_record_source`).

    A record that cannot be read (corrupt bytes fail the chunk checksum) or parsed comes back as
    `bad_record(...)`, with a warning naming its file and position, never as an exception.
    Pickles as grain's ArrayRecordDataSource does (the readers reopen lazily: grain workers).
    """

    def __init__(self, paths: Sequence[str], parse: str | Callable[[bytes], dict] = "tf_example",
                 skip_bad_files: bool = False):
        counts = _open_files([str(p) for p in paths], skip_bad_files)
        self._paths = list(counts)
        self._ends = list(itertools.accumulate(counts.values()))
        self._source = grain.sources.ArrayRecordDataSource([_Shard(p, n) for p, n in counts.items()])
        self._parse = _Parse(parse)
        self._n_bad: dict[Any, int] = {}

    def __len__(self) -> int:
        return self._ends[-1]

    def _where(self, index: int) -> tuple[str, int]:
        """(file, position in it) of record `index`."""
        k = bisect.bisect_right(self._ends, index)
        return self._paths[k], index - (self._ends[k - 1] if k else 0)

    def _bad(self, index: int, what: str, e: Exception) -> dict[str, Any]:
        path, pos = self._where(index)
        _warn_bad(self._n_bad, path, "array_record: record %d of %s %s, skipped (%s: %s)",
                  pos, path, what, type(e).__name__, e)
        return bad_record(f"{path}[{pos}]")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        try:
            data = self._source[index]
        except Exception as e:  # noqa: BLE001  a corrupt shard: skip the record, not the run
            return self._bad(index, "cannot be read", e)
        try:
            return self._parse(data)
        except Exception as e:  # noqa: BLE001
            return self._bad(index, f"cannot be parsed ({self._parse.name})", e)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._paths)} files, {len(self)} records, parse={self._parse.name})"


def array_record_source(paths: str | Sequence[str], parse: str | Callable[[bytes], dict] = "tf_example",
                        skip_bad_files: bool = False) -> grain.MapDataset:
    """Records stored in ArrayRecord files -> a grain MapDataset of record dicts.

    parse: "tf_example" (default; `tf.train.Example` with flat features, as TFDS writes
    them), "json" (a UTF-8 JSON object per record; image bytes must then be base64 or
    absent), or a picklable callable bytes -> dict.

    Bad data: a file that cannot be opened (truncated, not ArrayRecord) raises
    UnreadableFilesError naming every such file, or with `skip_bad_files` is left out with a
    warning (the dataset is then shorter: positions and checkpoints shift). A record that cannot
    be read or parsed is logged with its file and position and skipped by the pipelines, counted
    under `stats["skipped/bad_record"]`.
    """
    if isinstance(parse, str) and parse not in PARSERS:
        raise ConfigError("parse", f"array_record_source: must be one of {sorted(PARSERS)} or a callable")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("array_record_source: no files")
    return grain.MapDataset.source(ArrayRecordSource(paths, parse, skip_bad_files))


# --------------------------------------------------------------------------- throughput
