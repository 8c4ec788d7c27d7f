"""Record sources: mixtures, any TFDS dataset, ArrayRecord files (the adapters; the table of source
kinds that configs name is `glm5v_jax.data.source_registry`).

Every source yields record dicts in the shapes-world layout (`image` bytes, `kind`,
`caption_en`, `qa_json`, `boxes_json`, `text`, ...; see `glm5v_jax.data.pipeline`), so
the same templates and packing serve the embedded data and real corpora.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from glm5v_jax.data.templates import as_str
from glm5v_jax.errors import ConfigError


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
        ex = self._source()[index]
        return caption_record(_lookup(ex, image_key), _first_text(_lookup(ex, text_key)), f"{name}/{split}/{index}")

    def __getstate__(self):
        return {"_args": self._args, "_ds": None}

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

    def __call__(self, serialized: bytes) -> dict[str, Any]:
        fn = PARSERS[self.parse] if isinstance(self.parse, str) else self.parse
        record = fn(serialized)
        for key in ("image", "qa_json", "boxes_json"):  # list-valued when empty in tf.Example
            if isinstance(record.get(key), list) and not record[key]:
                record[key] = b"" if key == "image" else "[]"
        return record


def array_record_source(paths: str | Sequence[str],
                        parse: str | Callable[[bytes], dict] = "tf_example") -> grain.MapDataset:
    """Records stored in ArrayRecord files -> a grain MapDataset of record dicts.

    parse: "tf_example" (default; `tf.train.Example` with flat features, as TFDS writes
    them), "json" (a UTF-8 JSON object per record; image bytes must then be base64 or
    absent), or a picklable callable bytes -> dict.
    """
    if isinstance(parse, str) and parse not in PARSERS:
        raise ConfigError("parse", f"array_record_source: must be one of {sorted(PARSERS)} or a callable")
    paths = [paths] if isinstance(paths, str) else list(paths)
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(_Parse(parse))


# --------------------------------------------------------------------------- throughput
