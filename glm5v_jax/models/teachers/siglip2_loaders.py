"""Load SigLIP2 image towers from big_vision `.npz` and Hugging Face `safetensors` checkpoints.

Both readers use numpy only (`np.load`, `safetensors` with framework="numpy"; no torch).
One table of rules per format maps each checkpoint key, with its expected shape, to a
parameter of `SigLIP2` and a conversion; the same table gives the expected key set
(`expected_big_vision_keys`, `expected_hf_keys`). Before anything is converted the vision
keys of the file are checked against it: a missing key, an unexpected vision key or a wrong
shape raises `SigLIP2CheckpointError` naming the key with the expected and found shapes.

Conventions (module side: `glm5v_jax.models.teachers.siglip2`):
  * patches are flattened (p, p, C) row-major, as big_vision's patchify and HF's
    Siglip2 processor do, so the NaFlex Dense kernel (p*p*3, D) is used as is, and the
    HF Linear weight (D, p*p*3) is its transpose;
  * a fixed-resolution Conv kernel, big_vision (p, p, 3, D) or HF/torch (D, 3, p, p), is the
    same Dense after moving to (p, p, 3, D) and reshaping to (p*p*3, D);
  * position tables are row-major over the grid (index y * g + x): big_vision NaFlex
    (g, g, D) as is, big_vision fixed (1, g*g, D) and HF Embedding (g*g, D) reshaped to
    (g, g, D);
  * attention: big_vision kernels are (D, heads, head_dim) and (heads, head_dim, D), as the
    module stores them; torch Linear weights are (out, in) with heads contiguous along the
    out (q/k/v) or in (out_proj) axis: q = W.T.reshape(D, H, Dh), o = W.T.reshape(H, Dh, D);
    the MAP head's `in_proj_weight` (3D, D) is [q; k; v] stacked on the out axis.
Ignored: big_vision keys outside the image tower (`params/txt`, `params/t`, `params/b`), HF
keys outside `vision_model.` (text tower, `logit_scale`, `logit_bias`) and HF's
non-parameter buffer `vision_model.embeddings.position_ids`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: bf16 safetensors read as numpy)
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from glm5v_jax.models.teachers.siglip2 import SigLIP2, SigLIP2Spec

BIG_VISION_PREFIX = "params/img/"
HF_PREFIX = "vision_model."
_HF_IGNORED = ("embeddings.position_ids",)  # buffers, not parameters (relative to HF_PREFIX)

Path_ = tuple[str, ...]  # a module parameter path, e.g. ("blocks", "attn", "q")


class SigLIP2CheckpointError(ValueError):
    """A checkpoint that does not fit the SigLIP2 spec (missing, unexpected or misshapen keys)."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One checkpoint array -> one module parameter.

    For encoder-block rules `key` is relative to a block and `shape` is one layer's shape;
    the layout decides the full key (scanned: stacked on axis 0; looped / HF: one per layer).
    """

    target: Path_
    key: str
    shape: tuple[int, ...]
    convert: Callable[[Any], Any] = lambda a: a  # array methods / slicing only: numpy or jax


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The rules of one format and how block keys are spelled."""

    top: tuple[_Rule, ...]
    block: tuple[_Rule, ...]
    block_key: Callable[[str, int | None], str]  # (relative key, layer or None if scanned) -> key
    scanned: bool


# ----------------------------------------------------------------------------- big_vision


def _bv_mha(prefix: str, target: Path_, spec: SigLIP2Spec, out_bias: Path_) -> list[_Rule]:
    d, h, hd = spec.width, spec.num_heads, spec.head_dim
    rules = []
    for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
        rules += [_Rule(target + (short,), f"{prefix}/{name}/kernel", (d, h, hd)),
                  _Rule(target + (f"{short}_bias",), f"{prefix}/{name}/bias", (h, hd))]
    return rules + [_Rule(target + ("o",), f"{prefix}/out/kernel", (h, hd, d)),
                    _Rule(out_bias, f"{prefix}/out/bias", (d,))]


def _bv_ln(prefix: str, target: Path_, d: int) -> list[_Rule]:
    return [_Rule(target + ("scale",), f"{prefix}/scale", (d,)), _Rule(target + ("bias",), f"{prefix}/bias", (d,))]


def _bv_mlp(prefix: str, target: Path_, d: int, m: int) -> list[_Rule]:
    return [_Rule(target + ("fc1",), f"{prefix}/Dense_0/kernel", (d, m)),
            _Rule(target + ("fc1_bias",), f"{prefix}/Dense_0/bias", (m,)),
            _Rule(target + ("fc2",), f"{prefix}/Dense_1/kernel", (m, d)),
            _Rule(target + ("fc2_bias",), f"{prefix}/Dense_1/bias", (d,))]


def _big_vision_layout(spec: SigLIP2Spec, scanned: bool) -> _Layout:
    d, m, p, g, pd = spec.width, spec.mlp_dim, spec.patch_size, spec.posemb_grid, spec.patch_dim
    px = BIG_VISION_PREFIX
    if spec.naflex:
        embed = [_Rule(("patch_embed",), px + "embedding/kernel", (pd, d)),
                 _Rule(("pos_embed",), px + "pos_embedding", (g, g, d))]
    else:
        embed = [_Rule(("patch_embed",), px + "embedding/kernel", (p, p, 3, d), lambda a: a.reshape(pd, d)),
                 _Rule(("pos_embed",), px + "pos_embedding", (1, g * g, d), lambda a: a.reshape(g, g, d))]
    top = embed + [
        _Rule(("patch_bias",), px + "embedding/bias", (d,)),
        *_bv_ln(px + "Transformer/encoder_norm", ("encoder_norm",), d),
        _Rule(("head", "probe"), px + "MAPHead_0/probe", (1, 1, d), lambda a: a.reshape(d)),
        *_bv_mha(px + "MAPHead_0/MultiHeadDotProductAttention_0", ("head",), spec, ("head", "o_bias")),
        *_bv_ln(px + "MAPHead_0/LayerNorm_0", ("head", "norm"), d),
        *_bv_mlp(px + "MAPHead_0/MlpBlock_0", ("head", "mlp"), d, m),
    ]
    block = [*_bv_ln("LayerNorm_0", ("attn_norm",), d),
             *_bv_mha("MultiHeadDotProductAttention_0", ("attn",), spec, ("attn_out_bias",)),
             *_bv_ln("LayerNorm_1", ("mlp_norm",), d),
             *_bv_mlp("MlpBlock_0", ("mlp",), d, m)]

    def block_key(rel: str, i: int | None) -> str:
        return f"{px}Transformer/encoderblock/{rel}" if i is None else f"{px}Transformer/encoderblock_{i}/{rel}"

    return _Layout(tuple(top), tuple(block), block_key, scanned)


# ----------------------------------------------------------------------------- Hugging Face


def _hf_linear(prefix: str, target: Path_, bias_target: Path_, d_in: int, d_out: int,
               to_kernel: Callable[[Any], Any] | None = None,
               to_bias: Callable[[Any], Any] | None = None) -> list[_Rule]:
    """torch Linear (out, in) weight and (out,) bias; default kernel = weight.T."""
    return [_Rule(target, f"{prefix}.weight", (d_out, d_in), to_kernel or (lambda a: a.T)),
            _Rule(bias_target, f"{prefix}.bias", (d_out,), to_bias or (lambda a: a))]


def _hf_ln(prefix: str, target: Path_, d: int) -> list[_Rule]:
    return [_Rule(target + ("scale",), f"{prefix}.weight", (d,)), _Rule(target + ("bias",), f"{prefix}.bias", (d,))]


def _hf_mlp(prefix: str, target: Path_, d: int, m: int) -> list[_Rule]:
    return (_hf_linear(f"{prefix}.fc1", target + ("fc1",), target + ("fc1_bias",), d, m)
            + _hf_linear(f"{prefix}.fc2", target + ("fc2",), target + ("fc2_bias",), m, d))


def _hf_layout(spec: SigLIP2Spec) -> _Layout:
    d, m, p, g, pd = spec.width, spec.mlp_dim, spec.patch_size, spec.posemb_grid, spec.patch_dim
    h, hd = spec.num_heads, spec.head_dim
    px = HF_PREFIX
    def heads_in(a):
        return a.T.reshape(d, h, hd)  # (out=H*Dh, in=D) -> (D, H, Dh)
    def heads_out(a):
        return a.T.reshape(h, hd, d)  # (out=D, in=H*Dh) -> (H, Dh, D)
    def heads_bias(a):
        return a.reshape(h, hd)
    if spec.naflex:  # Linear over (p, p, C)-flattened patches
        patch = _hf_linear(px + "embeddings.patch_embedding", ("patch_embed",), ("patch_bias",), pd, d)
    else:  # Conv2d (D, C, p, p) -> (p, p, C, D) -> (p*p*C, D)
        patch = [_Rule(("patch_embed",), px + "embeddings.patch_embedding.weight", (d, 3, p, p),
                       lambda a: a.transpose(2, 3, 1, 0).reshape(pd, d)),
                 _Rule(("patch_bias",), px + "embeddings.patch_embedding.bias", (d,))]
    in_proj = []  # (3D, D) rows [q; k; v], biases (3D,)
    for j, short in enumerate(("q", "k", "v")):
        rows = slice(j * d, (j + 1) * d)
        in_proj += [_Rule(("head", short), px + "head.attention.in_proj_weight", (3 * d, d),
                          lambda a, r=rows: heads_in(a[r])),
                    _Rule(("head", f"{short}_bias"), px + "head.attention.in_proj_bias", (3 * d,),
                          lambda a, r=rows: heads_bias(a[r]))]
    top = patch + [
        _Rule(("pos_embed",), px + "embeddings.position_embedding.weight", (g * g, d), lambda a: a.reshape(g, g, d)),
        *_hf_ln(px + "post_layernorm", ("encoder_norm",), d),
        _Rule(("head", "probe"), px + "head.probe", (1, 1, d), lambda a: a.reshape(d)),
        *in_proj,
        *_hf_linear(px + "head.attention.out_proj", ("head", "o"), ("head", "o_bias"), d, d, heads_out),
        *_hf_ln(px + "head.layernorm", ("head", "norm"), d),
        *_hf_mlp(px + "head.mlp", ("head", "mlp"), d, m),
    ]
    block = [*_hf_ln("layer_norm1", ("attn_norm",), d)]
    for short in ("q", "k", "v"):
        block += _hf_linear(f"self_attn.{short}_proj", ("attn", short), ("attn", f"{short}_bias"), d, d,
                            heads_in, heads_bias)
    block += [*_hf_linear("self_attn.out_proj", ("attn", "o"), ("attn_out_bias",), d, d, heads_out),
              *_hf_ln("layer_norm2", ("mlp_norm",), d),
              *_hf_mlp("mlp", ("mlp",), d, m)]
    return _Layout(tuple(top), tuple(block), lambda rel, i: f"{px}encoder.layers.{i}.{rel}", False)


# ----------------------------------------------------------------------------- key sets


def _expected(layout: _Layout, depth: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for r in layout.top:
        out[r.key] = r.shape  # in_proj appears three times with the same shape
    for r in layout.block:
        if layout.scanned:
            out[layout.block_key(r.key, None)] = (depth, *r.shape)
        else:
            out.update({layout.block_key(r.key, i): r.shape for i in range(depth)})
    return out


def expected_big_vision_keys(spec: SigLIP2Spec, *, scanned: bool = True) -> dict[str, tuple[int, ...]]:
    """Every image-tower key of a big_vision checkpoint (`params/img/...`) with its shape."""
    return _expected(_big_vision_layout(spec, scanned), spec.depth)


def expected_hf_keys(spec: SigLIP2Spec) -> dict[str, tuple[int, ...]]:
    """Every vision key of a Hugging Face checkpoint (`vision_model....`) with its shape."""
    return _expected(_hf_layout(spec), spec.depth)


def _fmt_keys(items: list[str], limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return "".join(f"\n    {s}" for s in items[:limit]) + more


def check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
               source: str, hints: Mapping[str, str] | None = None) -> None:
    """Raise `SigLIP2CheckpointError` unless `found` (key -> shape) equals `expected` exactly.

    `hints`: extra advice shown when the named key is present with a wrong shape.
    """
    missing = [f"{k}: expected shape {expected[k]}" for k in expected if k not in found]
    extra = [f"{k}: shape {tuple(found[k])}" for k in found if k not in expected]
    wrong = [f"{k}: expected shape {expected[k]}, found {tuple(found[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s):" + _fmt_keys(missing))
    if extra:
        parts.append(f"{len(extra)} unexpected key(s):" + _fmt_keys(extra))
    if wrong:
        parts.append(f"{len(wrong)} key(s) with a wrong shape:" + _fmt_keys(wrong))
    advice = {hints[k] for k in (hints or {}) if k in found and k in expected
              and tuple(found[k]) != tuple(expected[k])}
    parts += sorted(advice)
    if parts:
        raise SigLIP2CheckpointError(f"{source} does not match the SigLIP2 spec:\n  " + "\n  ".join(parts))


# ----------------------------------------------------------------------------- conversion


def _convert(arrays: Mapping[str, Any], layout: _Layout, depth: int, xp: Any) -> dict[Path_, Any]:
    params: dict[Path_, Any] = {r.target: r.convert(arrays[r.key]) for r in layout.top}
    for r in layout.block:
        if layout.scanned:
            stacked = arrays[layout.block_key(r.key, None)]
            per_layer = [stacked[i] for i in range(depth)]
        else:
            per_layer = [arrays[layout.block_key(r.key, i)] for i in range(depth)]
        params[("blocks", *r.target)] = xp.stack([r.convert(a) for a in per_layer])
    return params


def convert_big_vision(arrays: Mapping[str, Any], spec: SigLIP2Spec, *, scanned: bool = True,
                       xp: Any = np) -> dict[Path_, Any]:
    """`params/img/...` arrays -> {module parameter path: array}. xp=jnp works under jax.eval_shape."""
    return _convert(arrays, _big_vision_layout(spec, scanned), spec.depth, xp)


def convert_hf(arrays: Mapping[str, Any], spec: SigLIP2Spec, *, xp: Any = np) -> dict[Path_, Any]:
    """`vision_model....` arrays -> {module parameter path: array}. xp=jnp works under jax.eval_shape."""
    return _convert(arrays, _hf_layout(spec), spec.depth, xp)


def abstract_siglip2(spec: SigLIP2Spec) -> SigLIP2:
    """The module with shape-only parameters (no memory, no random init)."""
    return nnx.eval_shape(lambda: SigLIP2(spec, rngs=nnx.Rngs(0)))


def assemble(params: Mapping[Path_, Any], spec: SigLIP2Spec, module: SigLIP2 | None = None) -> SigLIP2:
    """Put converted parameters into `module` (in place) or into a new module built without init."""
    target = module if module is not None else abstract_siglip2(spec)
    graphdef, state = nnx.split(target)
    want = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    if set(want) != set(params):
        raise SigLIP2CheckpointError(f"converted parameters do not cover the module: missing "
                                     f"{sorted(set(want) - set(params))}, extra {sorted(set(params) - set(want))}")
    values = {}
    for path, var in want.items():
        value = params[path]
        if tuple(value.shape) != tuple(var.shape):
            raise SigLIP2CheckpointError(f"parameter {'.'.join(path)}: module expects {tuple(var.shape)}, "
                                         f"the checkpoint gives {tuple(value.shape)} (spec {spec})")
        values[path] = jnp.asarray(np.asarray(value, np.float32), dtype=spec.param_dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    if module is not None:
        nnx.update(module, state)
        return module
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- file readers

_LAYOUT_HINT = ("hint: NaFlex checkpoints have a Dense patch kernel and a 16x16 position table, "
                "fixed-resolution ones a Conv kernel and a (image_size/16)^2 table; build the spec with "
                "siglip2_spec(variant, naflex=..., image_size=...) to match the file")


def _pick_prefix(keys: Iterable[str], canonical: str, candidates: tuple[str, ...], probe: str) -> str:
    """The key prefix of the image tower: the first candidate under which `probe` exists."""
    keys = set(keys)
    for c in candidates:
        if c + probe in keys:
            return c
    return canonical


def load_siglip2_big_vision_npz(path: str | os.PathLike, spec: SigLIP2Spec, *,
                                module: SigLIP2 | None = None) -> SigLIP2:
    """A SigLIP2 image tower from a big_vision `.npz` (flat `/`-joined keys).

    The tower is read under `params/img/` (also `img/`, `params/` or no prefix for a saved
    image tower alone); other keys are ignored. Encoder blocks may be scanned
    (`Transformer/encoderblock/...`, stacked on axis 0) or looped (`encoderblock_{i}`).
    `module`: fill this module in place instead of building a new one.
    """
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:  # local or gs://
        names = list(npz.files)
        prefix = _pick_prefix(names, BIG_VISION_PREFIX, (BIG_VISION_PREFIX, "img/", "params/", ""),
                              "embedding/kernel")
        arrays = {BIG_VISION_PREFIX + k[len(prefix):]: npz[k] for k in names if k.startswith(prefix)}
    scanned = not any(k.startswith(BIG_VISION_PREFIX + "Transformer/encoderblock_") for k in arrays)
    hints = {BIG_VISION_PREFIX + k: _LAYOUT_HINT for k in ("embedding/kernel", "pos_embedding")}
    check_keys({k: a.shape for k, a in arrays.items()}, expected_big_vision_keys(spec, scanned=scanned),
               f"big_vision checkpoint {path} ({'scanned' if scanned else 'looped'} blocks, prefix {prefix!r})",
               hints)
    return assemble(convert_big_vision(arrays, spec, scanned=scanned), spec, module)


def _safetensors_files(path: str | os.PathLike) -> list[epath.Path]:
    p = epath.Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {p}")
    return files


def _open_safetensors(file: epath.Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], np.ndarray]]:
    """({name: shape}, name -> array) of one file: read lazily from local disk, or whole (its bytes
    through epath) from an object store such as gs://."""
    if "://" in os.fspath(file):
        from safetensors.numpy import load  # noqa: PLC0415

        tensors = load(file.read_bytes())
        return {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__
    from safetensors import safe_open  # noqa: PLC0415  (numpy framework: no torch)

    h = safe_open(os.fspath(file), framework="numpy")
    return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}, h.get_tensor  # safe_open is not iterable


def load_siglip2_hf_safetensors(path: str | os.PathLike, spec: SigLIP2Spec, *,
                                module: SigLIP2 | None = None) -> SigLIP2:
    """A SigLIP2 image tower from Hugging Face safetensors (a file, or a folder of shards).

    Vision keys are read under `vision_model.` (or with no prefix if the file holds the
    tower alone); text-tower keys, `logit_scale` and `logit_bias` are ignored. Shapes are
    checked before any tensor is read. `module`: fill this module in place.
    """
    handles, shapes = {}, {}
    for f in _safetensors_files(path):
        file_shapes, get = _open_safetensors(f)
        for k, shape in file_shapes.items():
            handles[k], shapes[k] = get, shape
    prefix = _pick_prefix(shapes, HF_PREFIX, (HF_PREFIX, ""), "embeddings.patch_embedding.weight")
    ignored = {prefix + k for k in _HF_IGNORED}
    keys = [k for k in shapes if k.startswith(prefix) and k not in ignored]
    if prefix == "":  # a tower saved alone: leave foreign top-level entries out
        keys = [k for k in keys if k.split(".")[0] in ("embeddings", "encoder", "post_layernorm", "head")]
    found = {HF_PREFIX + k[len(prefix):]: shapes[k] for k in keys}
    hints = {HF_PREFIX + k: _LAYOUT_HINT for k in ("embeddings.patch_embedding.weight",
                                                    "embeddings.position_embedding.weight")}
    check_keys(found, expected_hf_keys(spec), f"Hugging Face checkpoint {path} (prefix {prefix!r})", hints)
    arrays = {HF_PREFIX + k[len(prefix):]: handles[k](k) for k in keys}  # vision tensors only
    return assemble(convert_hf(arrays, spec), spec, module)


def converted_shapes(spec: SigLIP2Spec, fmt: str, *, scanned: bool = True) -> dict[Path_, tuple[int, ...]]:
    """Module-parameter shapes the converter makes from a checkpoint of `fmt` ('big_vision' or 'hf'),
    computed abstractly (`jax.eval_shape`, no memory): for checking the tables against the module."""
    if fmt == "big_vision":
        keys, conv = expected_big_vision_keys(spec, scanned=scanned), (
            lambda a: convert_big_vision(a, spec, scanned=scanned, xp=jnp))
    elif fmt == "hf":
        keys, conv = expected_hf_keys(spec), (lambda a: convert_hf(a, spec, xp=jnp))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'big_vision' or 'hf'")
    fake = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in keys.items()}
    out = jax.eval_shape(conv, fake)
    return {path: tuple(v.shape) for path, v in out.items()}
