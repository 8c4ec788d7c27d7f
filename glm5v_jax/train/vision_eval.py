"""Evaluating a vision encoder on labelled images: k-NN accuracy on pooled features.

Used by both CogViT pre-training stages: embed a fixed set of reference images and of query
images (`config.data.eval_source`, by default shapes-world images with exactly one object, whose
shape and colour are the labels), then classify each query by a vote of its k most
cosine-similar reference images. A random-init encoder evaluated the same way is the baseline a
trained one must beat.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from glm5v_jax.data.source_registry import data_dir_of, open_source
from glm5v_jax.errors import ConfigError


def labelled_eval_sets(data: Any, workdir: Any) -> tuple[Any, Any]:
    """(reference records, query records): the train and eval parts of `config.data.eval_source`
    (a `glm5v_jax.data.source_registry` entry; shapes world is built on first use)."""
    field = "config.data.eval_source"
    if "eval_source" not in data:
        raise ConfigError(field, "evaluation needs a labelled source (config_blocks.single_object_eval_source), "
                                 "or set config.eval_every=0")
    parts = open_source(data.eval_source, field, data_dir_of(data, workdir))
    if "eval" not in parts:
        raise ConfigError(f"{field}.eval_split", "the query images are its eval part: set eval_split (e.g. "
                                                 "single_object_validation)")
    return parts["train"], parts["eval"]


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 10) -> float:
    """Fraction of test rows whose label wins the similarity-weighted vote of its k nearest
    (cosine) training rows. Rows with label < 0 (unlabelled) are left out on both sides."""
    keep_tr, keep_te = train_y >= 0, test_y >= 0
    train_x, train_y, test_x, test_y = train_x[keep_tr], train_y[keep_tr], test_x[keep_te], test_y[keep_te]
    if len(train_y) == 0 or len(test_y) == 0:
        return float("nan")

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(test_x) @ unit(train_x).T  # [T, M]
    k = min(k, len(train_y))
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [T, k]
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_y), n_classes))
    np.add.at(votes, (np.arange(len(test_y))[:, None], train_y[nearest]),
              np.take_along_axis(sims, nearest, axis=1) + 1.0)  # shift so every neighbour counts > 0
    return float(np.mean(votes.argmax(1) == test_y))


def embed(encode: Callable[[Mapping[str, np.ndarray]], np.ndarray], batches: Iterable[Mapping[str, np.ndarray]],
          label_keys: Iterable[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features `[M, D]`, {label: `[M]`}) of every image in `batches` through `encode` (a batch
    dict -> pooled features `[B, D]`)."""
    feats, labels = [], {k: [] for k in label_keys}
    for batch in batches:
        feats.append(np.asarray(encode(batch), np.float32))
        for k in labels:
            labels[k].append(np.asarray(batch[k]))
    if not feats:
        raise ValueError("embed: no batches")
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in labels.items()}


def knn_report(encode, train_batches, eval_batches, label_keys=("shape_label", "colour_label"),
               k: int = 10) -> dict[str, float]:
    """{"knn/<label>": accuracy} for each label key."""
    train_x, train_y = embed(encode, train_batches, label_keys)
    test_x, test_y = embed(encode, eval_batches, label_keys)
    return {f"knn/{key.removesuffix('_label')}": knn_accuracy(train_x, train_y[key], test_x, test_y[key], k)
            for key in label_keys}
