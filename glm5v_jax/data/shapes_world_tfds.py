"""TFDS builder for the shapes-world dataset (`shapes_world.py`), ArrayRecord, no TensorFlow.

Why TFDS: it gives a versioned on-disk layout, dataset metadata and random-access
`data_source`s that feed `grain.MapDataset.source` directly. Building and reading
need no TensorFlow because every feature is a `Tensor` or `Text` feature: images
are stored as PNG bytes (`Tensor(shape=(), dtype=np.object_)`, encoded by PIL in
the generator) rather than as `tfds.features.Image`, which would need TF to encode.
Do not use the `tfds build` CLI (it imports TF and apache_beam); use
`build_shapes_world` or `python -m glm5v_jax.data.shapes_world_tfds`.

Seed and split sizes are part of the builder config name (`s{seed}_{train}_{val}_{text_train}_{text_val}`,
then `_{single_object_train}_{single_object_validation}` when either is set), so different
variants live in different directories under `data_dir`; a split of size 0 is not generated
(`load_split` refuses it). `data_dir` may be local or `gs://` (TFDS writes through
`etils.epath`). Shuffling is
disabled, so record `i` of a split is example `i` of the generator (its `id`);
shuffle in grain. Building is deterministic: two builds give byte-identical
`.array_record` files.

Records read back with `load_split` are plain dicts: strings (`Text`
features and the PNG `image`) come back as `bytes` (decode text with
`.decode("utf-8")`); `width`, `height` and `id` come back as Python `int`s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import inspect
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import example_serializer

from glm5v_jax.data import shapes_world as sw

SPLITS = ("train", "validation", "text_train", "text_validation") + sw.SINGLE_OBJECT_SPLITS


def config_name(seed: int, split_sizes: Mapping[str, int]) -> str:
  """Directory-safe config name, e.g. `s0_6000_300_3000_150` (`s0_0_0_0_0_1000_300` for the
  single-object splits alone)."""
  names = SPLITS if any(int(split_sizes.get(s, 0)) for s in sw.SINGLE_OBJECT_SPLITS) else SPLITS[:4]
  return f"s{seed}_" + "_".join(str(int(split_sizes.get(s, 0))) for s in names)


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Seed and per-split sizes (in `SPLITS` order)."""
  seed: int = 0
  sizes: tuple[int, ...] = tuple(sw.SPLIT_SIZES[s] for s in SPLITS)

  @classmethod
  def make(cls, seed: int = 0, split_sizes: Mapping[str, int] | None = None) -> "ShapesWorldConfig":
    sizes = {**sw.SPLIT_SIZES, **(split_sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
      raise ValueError(f"unknown splits {sorted(unknown)}; expected {SPLITS}")
    return cls(name=config_name(seed, sizes), seed=int(seed), sizes=tuple(int(sizes[s]) for s in SPLITS),
               description=f"seed={seed}, sizes={dict(zip(SPLITS, (sizes[s] for s in SPLITS)))}")


@contextlib.contextmanager
def _deterministic_tf_example_serialization() -> Iterator[None]:
  """Serialize `tf.Example`s with sorted map keys while building.

  tfds calls `Example.SerializeToString()`; the `features` map of a tf.Example is then
  written in an order that changes from process to process (upb's hash seed), so two
  builds of identical data give different `.array_record` bytes. `deterministic=True`
  sorts the keys. The patch is process-global for the duration of our build only.
  """
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self: Any, example: Any) -> bytes:
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


class ShapesWorld(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """Procedural shapes-world image-text data and text-only documents."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ShapesWorldConfig.make(0)]
  DEFAULT_BUILDER_CONFIG_NAME = BUILDER_CONFIGS[0].name

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    # tfds 4.9.10's default touches `importlib_resources`, which it only declares for
    # Python < 3.9 (tensorflow/datasets#11212), so it fails for a builder inside a package.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, num_workers: int = 1, **kwargs: Any):
    self._num_workers = max(1, int(num_workers))  # speed only; the output does not depend on it
    kwargs.setdefault("file_format", "array_record")  # tfds' default (tfrecord) would need TF
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "kind": text,
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes, b"" for text
        "width": tfds.features.Tensor(shape=(), dtype=np.int32),
        "height": tfds.features.Tensor(shape=(), dtype=np.int32),
        "caption_en": text, "caption_zh": text, "ocr": text,
        "qa_json": text, "boxes_json": text, "text": text,
    })
    # DatasetInfo built directly: `dataset_info_from_configs` reads package metadata files.
    return tfds.core.DatasetInfo(
        builder=self, features=features, disable_shuffling=True,
        description=("Procedurally generated images of coloured shapes with English/Chinese "
                     "captions, QA pairs, boxes and OCR words, plus text-only documents."))

  def _download_and_prepare(self, *args: Any, **kwargs: Any) -> Any:
    with _deterministic_tf_example_serialization():
      return super()._download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # nothing to download
    sizes = dict(zip(SPLITS, self.builder_config.sizes))
    return {split: self._generate_examples(split, sizes[split]) for split in SPLITS if sizes[split] > 0}

  def _generate_examples(self, split: str, size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    seed = self.builder_config.seed
    if self._num_workers > 1 and size >= 64:
      step = 64
      chunks = [(seed, split, s, min(size, s + step)) for s in range(0, size, step)]
      # fork: spawn/forkserver would re-import the caller's __main__ in every worker (slow for
      # the CLI, which imports tfds; broken for stdin/notebooks). Workers run only numpy + PIL
      # code. Forking a process that runs JAX threads triggers a JAX warning; the default
      # num_workers=1 never forks. `map` returns chunks in index order: deterministic output.
      ctx = multiprocessing.get_context("fork")
      with concurrent.futures.ProcessPoolExecutor(self._num_workers, mp_context=ctx) as pool:
        examples = (ex for chunk in pool.map(sw.generate_examples, *zip(*chunks)) for ex in chunk)
        yield from self._keyed(examples)
    else:
      yield from self._keyed(sw.generate_example(seed, split, i) for i in range(size))

  @staticmethod
  def _keyed(examples: Iterator[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, ex in enumerate(examples):
      yield i, dict(ex, id=i)


def make_builder(data_dir: str, *, seed: int = 0, split_sizes: Mapping[str, int] | None = None,
                 num_workers: int = 1) -> ShapesWorld:
  """A builder for (seed, sizes); the default config is used by name, others as custom configs."""
  config = ShapesWorldConfig.make(seed, split_sizes)
  default = ShapesWorld.BUILDER_CONFIGS[0]
  return ShapesWorld(data_dir=data_dir, config=default.name if config.name == default.name else config,
                     file_format="array_record", num_workers=num_workers)


def build_shapes_world(data_dir: str, *, seed: int = 0, split_sizes: Mapping[str, int] | None = None,
                       num_workers: int = 1) -> str:
  """Builds (if not already built) and returns the dataset directory `DATA_DIR/shapes_world/CONFIG/1.0.0`."""
  builder = make_builder(data_dir, seed=seed, split_sizes=split_sizes, num_workers=num_workers)
  builder.download_and_prepare(file_format="array_record")
  return os.fspath(builder.data_dir)


def load_split(dataset_dir_or_builder: str | os.PathLike | tfds.core.DatasetBuilder,
               split: str) -> Sequence[dict[str, Any]]:
  """Random-access source for `grain.MapDataset.source`; record i is example i of the split.

  Accepts the directory returned by `build_shapes_world` (read with the features stored
  there, so no builder code is needed) or a builder. Strings come back as `bytes`.
  """
  builder = dataset_dir_or_builder
  if not isinstance(builder, tfds.core.DatasetBuilder):
    builder = tfds.builder_from_directory(os.fspath(builder))
  return builder.as_data_source(split)


def _dir_size_mb(path: str) -> float:
  return sum(p.stat().length for p in epath.Path(path).rglob("*") if p.is_file()) / 2**20


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Build the shapes-world TFDS dataset (ArrayRecord).")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--seed", type=int, default=0)
  for split in SPLITS:
    p.add_argument(f"--{split}", type=int, default=sw.SPLIT_SIZES[split], help=f"size of {split}")
  p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                 help="processes generating examples (the output does not depend on it)")
  a = p.parse_args(argv)
  t0 = time.perf_counter()
  path = build_shapes_world(a.data_dir, seed=a.seed, split_sizes={s: getattr(a, s) for s in SPLITS},
                            num_workers=a.num_workers)
  print(f"dataset_dir={path}\nbuild_time_s={time.perf_counter() - t0:.1f}\nsize_mb={_dir_size_mb(path):.1f}")


if __name__ == "__main__":
  # Run the importable module's main, so pickled worker functions and the registered builder
  # are the package's (the class above, defined in __main__, skipped registration).
  from glm5v_jax.data.shapes_world_tfds import main as _main
  _main()
