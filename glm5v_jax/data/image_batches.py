"""Image batches for CogViT pre-training (stage 1 distillation, stage 2 contrastive).

Each record becomes one NaFlex image (`patches [N, P*P*3]`, `patch_yx [N, 2]`, `valid [N]`,
`grid [2]`), optionally with its caption as `text [L]` token ids (stage 2) and, for the embedded
shapes world, the shape and colour of its first object as integer labels (k-NN / linear-probe
evaluation; -1 where a record has none). Batches are `batch_size` such images stacked.

Teacher views (stage 1 with a teacher of another patch size): for each `(P, N)` in
`teacher_views` the same image is also preprocessed at patch size P with a budget of N patches
and merge 1, under the keys `patches@pPnN [N, P*P*3]`, `patch_yx@pPnN [N, 2]`, `valid@pPnN [N]`
and `grid@pPnN [2]` (`view_key`). Both views are resizes of the whole image, so a position on one
grid maps to the other by scaling (`models.cogvit_mim.resample_tokens`).

`attach` (optional, `make_image_batch_iterator`): a picklable callable record -> extra arrays
for the example (e.g. precomputed teacher features, `train/teacher_cache.py`) or a skip reason.

A record that cannot be used (unreadable in its source, no image, undecodable or too small, no
caption when captions are needed) is skipped and counted under `stats["skipped/<reason>"]`, never
put in a batch; too many in a row is an error naming the counts. The iterator is checkpointable:
its state is the grain parent's state between batches plus the counters, so a restored run
continues with the exact next batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, Mapping

import grain
import numpy as np

from glm5v_jax.data.pipeline import _ImageSkip, _mark_absl_flags_parsed, preprocess_image
from glm5v_jax.data.shapes_world import COLOURS, SHAPES
from glm5v_jax.data.sources import BAD_RECORD, _as_map_dataset, is_bad_record
from glm5v_jax.data.templates import as_str
from glm5v_jax.errors import ConfigError

STATE_VERSION = 1
LABELS = {"shape": tuple(SHAPES), "colour": tuple(COLOURS)}
VIEW_KEYS = ("patches", "patch_yx", "valid", "grid")
# record -> extra example arrays, or a "skipped/<reason>" string
Attach = Callable[[Mapping[str, Any]], "dict[str, np.ndarray] | str"]


def view_key(key: str, patch_size: int, max_patches: int) -> str:
    """Key of `key` (patches, patch_yx, valid, grid) in the teacher view (patch_size, max_patches)."""
    return f"{key}@p{patch_size}n{max_patches}"


@dataclasses.dataclass(frozen=True)
class ImageBatchConfig:
    batch_size: int
    patch_size: int = 16
    max_patches: int = 256
    merge: int = 2
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    text_len: int = 0  # > 0: captions as `text [text_len]` (stage 2); records without one are skipped
    caption_keys: tuple[str, ...] = ("caption_en",)  # the first non-empty one is used
    num_workers: int = 0
    process_index: int = 0
    process_count: int = 1
    max_consecutive_skips: int = 200
    # extra views of each image, (patch_size, max_patches) with merge 1, for teachers whose patch
    # size differs from the student's (keys: `view_key`)
    teacher_views: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        views = [tuple(v) for v in self.teacher_views]
        if any(len(v) != 2 or min(v) < 1 for v in views) or len(set(views)) != len(views):
            raise ConfigError("teacher_views", f"expected distinct (patch_size, max_patches) pairs of positive "
                                               f"integers, got {self.teacher_views}")
        if self.text_len < 0:
            raise ConfigError("text_len", f"must be >= 0, got {self.text_len}")


def labels_of(record: Mapping[str, Any]) -> dict[str, int]:
    """Shape and colour index of the record's first object (shapes world `boxes_json`), else -1."""
    out = {name: -1 for name in LABELS}
    try:
        boxes = json.loads(as_str(record.get("boxes_json")) or "[]")
        colour, shape = boxes[0]["label"].rsplit(" ", 1)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return out
    for name, value in (("shape", shape), ("colour", colour)):
        if value in LABELS[name]:
            out[name] = LABELS[name].index(value)
    return out


@dataclasses.dataclass(frozen=True)
class ProcessImageRecord:
    """grain map: record -> image example dict, or {"skip": reason}."""

    config: ImageBatchConfig
    tokenizer: Any = None
    attach: Attach | None = None

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        c = self.config
        if not isinstance(record, Mapping):
            return {"skip": "skipped/not_a_record"}
        if is_bad_record(record):  # unreadable: the source has logged its file and position
            return {"skip": BAD_RECORD}
        try:
            image = preprocess_image(record.get("image"), patch_size=c.patch_size, max_patches=c.max_patches,
                                     merge=c.merge)
            out = {k: image[k] for k in VIEW_KEYS}
            for p, n in c.teacher_views:  # the same image for a teacher of another patch size
                view = preprocess_image(record.get("image"), patch_size=p, max_patches=n, merge=1)
                out.update({view_key(k, p, n): view[k] for k in VIEW_KEYS})
        except _ImageSkip as e:
            return {"skip": e.reason}
        for name, value in labels_of(record).items():
            out[f"{name}_label"] = np.int32(value)
        if c.text_len:
            caption = next((s for s in (as_str(record.get(k)).strip() for k in c.caption_keys) if s), "")
            if not caption:
                return {"skip": "skipped/no_caption"}
            ids = self.tokenizer.encode(caption)[:c.text_len - 1] + [self.tokenizer.eos_id]
            text = np.full((c.text_len,), self.tokenizer.pad_id, np.int32)
            text[:len(ids)] = ids
            out["text"] = text
        if self.attach is not None:
            extra = self.attach(record)
            if isinstance(extra, str):
                return {"skip": extra}
            out.update(extra)
        return out


class ImageBatchIterator(grain.DatasetIterator):
    """Stacks `batch_size` processed images per batch, counting the skipped records."""

    def __init__(self, parent: grain.DatasetIterator, config: ImageBatchConfig):
        super().__init__(parent)
        self._config = config
        self.stats: dict[str, int] = {"batches": 0, "images": 0}

    def __next__(self) -> dict[str, np.ndarray]:
        examples, skips = [], 0
        while len(examples) < self._config.batch_size:
            el = next(self._parent)  # StopIteration ends a finite pipeline (a partial batch is dropped)
            if "skip" in el:
                self.stats[el["skip"]] = self.stats.get(el["skip"], 0) + 1
                skips += 1
                if skips >= self._config.max_consecutive_skips:
                    bad = {k: v for k, v in self.stats.items() if k.startswith("skipped/")}
                    raise RuntimeError(f"image batches: {skips} records in a row were skipped ({bad}); "
                                       "is the source in the record format (an `image` field)?")
                continue
            skips = 0
            examples.append(el)
        self.stats["batches"] += 1
        self.stats["images"] += len(examples)
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "parent": copy.deepcopy(self._parent.get_state()),
                "stats": dict(self.stats), "config": _state_key(self._config)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"image-batch iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        if dict(state["config"]) != _state_key(self._config):
            raise ValueError(f"image-batch iterator state was saved with {dict(state['config'])}, "
                             f"this pipeline has {_state_key(self._config)}")
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self.stats = {k: int(v) for k, v in state["stats"].items()}


def _state_key(c: ImageBatchConfig) -> dict[str, Any]:
    """The settings a saved position is only valid under (JSON types: it is compared after a JSON
    round trip). `teacher_views` only when set, so states saved before it existed still load."""
    key = {"batch_size": c.batch_size, "patch_size": c.patch_size, "max_patches": c.max_patches,
           "merge": c.merge, "seed": c.seed, "text_len": c.text_len, "shuffle": c.shuffle}
    if c.teacher_views:
        key["teacher_views"] = [[int(p), int(n)] for p, n in c.teacher_views]
    return key


def make_image_batch_iterator(source: Any, config: ImageBatchConfig, tokenizer=None,
                              attach: Attach | None = None) -> ImageBatchIterator:
    """Checkpointable iterator of image batch dicts (numpy) from a random-access source of records
    (a list of dicts, a TFDS / ArrayRecord source, or `mix_sources(...)` over named sources).
    `attach`: see the module docstring."""
    if config.text_len and tokenizer is None:
        raise ValueError("text_len > 0 needs a tokenizer for the captions")
    ds = _as_map_dataset(source)
    if config.process_count > 1:
        ds = ds[config.process_index::config.process_count]
    if len(ds) == 0:
        raise ValueError(f"process {config.process_index} of {config.process_count} has no records")
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    it = ds.map(ProcessImageRecord(config, tokenizer, attach)).to_iter_dataset()
    if config.num_workers > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return ImageBatchIterator(iter(it), config)
