"""Which parameters Muon orthogonalises, and how: routing by logical axis names.

Every parameter of this codebase carries logical axis names (`out_sharding`
metadata, e.g. `('layers', 'embed', 'heads', 'kv')`). Routing reads them, so it
is exact for every layer type without guessing from shapes:

* AdamW: anything with a `vocab` axis (embedding, LM head), the `patch` embedding,
  `exp_router` leaves (router and correction bias), per-head biases (`heads`/`kv`
  axes only), and every leaf with fewer than two matrix axes once batch axes are
  removed (norms, biases, mask/CLS tokens).
* Muon: the rest. `layers` (scanned stacks) and `exp` (experts) are batch axes: each
  layer's, each expert's matrix is orthogonalised on its own. Kernels are stored
  input-first (`x @ W`): if the last axis is `embed` it is the output (o-proj, down
  projections) and the other axes are the reduction; otherwise the first axis is the
  reduction and the rest the output (q/k/v, up/gate).
* `split_heads=True`: `heads`/`kv_heads` become batch axes too, so q/k/v/o are
  orthogonalised head by head (each block `[embed, head_dim]` scaled by its own shape).
* A leaf with two or more matrix axes that has no logical names, or no `embed` axis, is
  an error naming the path: never a silent fallback.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
from flax import nnx

BATCH_AXES = ("layers", "exp")
ADAM_AXES = ("vocab", "patch", "exp_router")
PER_HEAD_VECTOR_AXES = ("heads", "kv_heads", "kv")  # q/k/v biases [heads, head_dim]
HEAD_AXES = ("heads", "kv_heads")


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """How to view one parameter as a batch of matrices `[batch, fan_in, fan_out]`."""

    batch: tuple[int, ...]
    reduction: tuple[int, ...]
    output: tuple[int, ...]

    def fans(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return math.prod(shape[a] for a in self.reduction), math.prod(shape[a] for a in self.output)


def path_key(path: tuple) -> tuple[str, ...]:
    """A keypath as strings, without NNX's trailing `.value`."""
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        out.append(str(name))
    if out and out[-1] == "value":
        out.pop()
    return tuple(out)


def classify(path: tuple[str, ...], shape: tuple[int, ...], axes: tuple[str | None, ...] | None, *,
             split_heads: bool = False) -> MatrixSpec | None:
    """MatrixSpec for Muon, or None for AdamW. Raises for an unclassifiable matrix.

    `split_heads`: attention projections are orthogonalised head by head (`heads` and
    `kv_heads` become batch axes), each block with its own shape scale.
    """
    if axes is None or len(axes) != len(shape):
        if len(shape) >= 2:
            raise ValueError(f"parameter {'/'.join(path)} {shape} has no logical axis names; Muon routing "
                             "needs them (create it with glm5v_jax.layers.params.param)")
        return None
    if any(a in ADAM_AXES for a in axes):
        return None
    batch = tuple(i for i, a in enumerate(axes) if a in BATCH_AXES)
    matrix = tuple(i for i in range(len(axes)) if i not in batch)
    if len(matrix) < 2:
        return None
    if all(axes[i] in PER_HEAD_VECTOR_AXES for i in matrix):
        return None  # a per-head bias: a vector stored as [heads, head_dim]
    if split_heads and "embed" in axes:
        heads = tuple(i for i in matrix if axes[i] in HEAD_AXES)
        batch, matrix = tuple(sorted(batch + heads)), tuple(i for i in matrix if i not in heads)
    if "embed" not in (axes[i] for i in matrix):
        raise ValueError(f"parameter {'/'.join(path)} {shape} with axes {axes} matches no Muon routing rule "
                         "(a Muon matrix has an 'embed' axis); extend glm5v_jax.optim.routing.classify")
    if axes[matrix[-1]] == "embed":
        return MatrixSpec(batch, matrix[:-1], matrix[-1:])
    return MatrixSpec(batch, matrix[:1], matrix[1:])


def route(model: nnx.Module, *, split_heads: bool = False) -> dict[tuple[str, ...], MatrixSpec | None]:
    """{parameter path: MatrixSpec or None (AdamW)} for every `nnx.Param` of `model`."""
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        key = tuple(str(p) for p in path)
        table[key] = classify(key, tuple(var.shape), tuple(axes) if axes is not None else None,
                              split_heads=split_heads)
    return table


def format_table(model: nnx.Module, table: Mapping[tuple[str, ...], MatrixSpec | None] | None = None,
                 scale_fn=None) -> str:
    """A printable routing table: path, shape, optimizer, batch/reduction/output axes, scale."""
    table = route(model) if table is None else table
    shapes = {tuple(str(p) for p in path): tuple(v.shape)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rows = [("path", "shape", "opt", "batch", "reduce", "output", "scale")]
    for key, spec in table.items():
        shape = shapes[key]
        if spec is None:
            rows.append(("/".join(key), str(list(shape)), "adamw", "", "", "", ""))
        else:
            scale = "" if scale_fn is None else f"{scale_fn(*spec.fans(shape)):.3g}"
            rows.append(("/".join(key), str(list(shape)), "muon", str(spec.batch), str(spec.reduction),
                         str(spec.output), scale))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def tree_of_specs(params: Any, table: Mapping[tuple[str, ...], MatrixSpec | None]) -> Any:
    """Specs laid out like `params` (a State of Variables or of arrays); leaves MatrixSpec or None."""
    def lookup(path, _):
        key = path_key(path)
        if key not in table:
            raise KeyError(f"parameter {'/'.join(key)} is missing from the Muon routing table")
        return table[key]
    return jax.tree_util.tree_map_with_path(lookup, params)
