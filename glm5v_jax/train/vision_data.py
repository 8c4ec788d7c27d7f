"""Image sources for the CogViT pre-training stages: named sources mixed by weight, plus fixed
labelled image sets for k-NN evaluation.

`config.data.sources.<name>` = {kind, weight, ...}:
  kind=shapes_world  the embedded generator, built on first use under `config.data.data_dir`
                     with `build_seed` and `train` images (its validation split serves evaluation)
  kind=array_record  `paths`: comma-separated globs of ArrayRecord files whose records have an
                     `image` field (tf.train.Example, as TFDS writes them)
The shapes_world source named by `config.data.eval_source` (default: the one with the most
training images) also provides the evaluation images (`eval_images` from its validation split)
and the k-NN reference set (the first `knn_train_images` of its train split).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ml_collections

from glm5v_jax.errors import ConfigError
from glm5v_jax.data.sources import array_record_source, mix_sources
from glm5v_jax.train.paths import as_path, expand_globs

log = logging.getLogger(__name__)
SOURCE_KINDS = ("shapes_world", "array_record")


@dataclasses.dataclass
class ImageSources:
    train: Any  # a grain MapDataset mixing the named sources by weight
    weights: dict[str, float]
    named: dict[str, Any]  # each source's training records, unmixed and untagged, in config order
    knn_train: Any | None  # labelled reference images (shapes world train split), or None
    eval: Any | None  # labelled evaluation images (shapes world validation split), or None


def _shapes_world(data_dir, build_seed: int, train: int, validation: int):
    from glm5v_jax.data import shapes_world_tfds

    sizes = {"train": int(train), "validation": max(int(validation), 1), "text_train": 1, "text_validation": 1}
    t0 = time.time()
    path = shapes_world_tfds.build_shapes_world(str(data_dir), seed=int(build_seed), split_sizes=sizes)
    log.info("shapes world (seed %d, %d train images) ready at %s (%.1f s)", build_seed, train, path, time.time() - t0)
    return shapes_world_tfds.load_split(path, "train"), shapes_world_tfds.load_split(path, "validation")


def prepare_image_sources(data: Any, workdir, *, seed: int) -> ImageSources:
    """Builds or opens every named source of `config.data.sources` and mixes them by weight."""
    data_dir = as_path(data.data_dir) if data.data_dir else as_path(workdir) / "data"
    trains, weights, knn_train, evals = {}, {}, None, None
    if not data.sources:
        raise ConfigError("config.data.sources", "give at least one named image source")
    shapes = {name: int(src.train) for name, src in data.sources.items() if src.kind == "shapes_world"}
    eval_source = data.get("eval_source", "") or (max(shapes, key=shapes.get) if shapes else "")
    if eval_source and eval_source not in shapes:
        raise ConfigError("config.data.eval_source", f"{eval_source!r} is not a shapes_world source; "
                         f"those are {sorted(shapes)}")
    for name, src in data.sources.items():
        field = f"config.data.sources.{name}"
        if src.kind not in SOURCE_KINDS:
            raise ConfigError(f"{field}.kind", f"unknown source kind {src.kind!r}; expected one of {SOURCE_KINDS}")
        if float(src.weight) < 0:
            raise ConfigError(f"{field}.weight", f"must be >= 0, got {src.weight}")
        if src.kind == "shapes_world":
            is_eval = name == eval_source
            train, val = _shapes_world(data_dir, src.build_seed, src.train, data.eval_images if is_eval else 1)
            trains[name] = train
            if is_eval:
                knn_train, evals = train, val
        else:
            paths = expand_globs(src.paths, f"{field}.paths")
            trains[name] = array_record_source(paths)
        weights[name] = float(src.weight)
    return ImageSources(mix_sources(trains, weights, seed), weights, trains, knn_train, evals)


def shapes_world_source(build_seed: int, train: int, weight: float) -> ml_collections.ConfigDict:
    """A `config.data.sources.<name>` entry for the embedded generator."""
    return ml_collections.ConfigDict(dict(kind="shapes_world", build_seed=build_seed, train=train, weight=weight,
                                          paths=""))


def report_mixture(natural_images: int) -> ml_collections.ConfigDict:
    """The report's 80% natural / 10% instruction / 10% scientific mixture, as shapes-world stand-ins
    (different build seeds)."""
    return ml_collections.ConfigDict(dict(natural=shapes_world_source(0, natural_images, 0.8),
                                          instruction=shapes_world_source(1, 1000, 0.1),
                                          scientific=shapes_world_source(2, 1000, 0.1)))
