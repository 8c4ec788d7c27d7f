"""Load public DINOv3 checkpoints into `glm5v_jax.models.teachers.dinov3.DINOv3`, without torch.

Two formats, both torch state dicts with Linear weights stored (out, in):

* Hugging Face (`facebook/dinov3-vit*16-pretrain-lvd1689m`, `model.safetensors`), read with
  `safetensors.numpy`: `embeddings.{cls_token, mask_token, register_tokens, patch_embeddings}`,
  `layer.{i}.{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1, norm2,
  mlp.{up,down}_proj | mlp.{gate,up,down}_proj, layer_scale2.lambda1}`, `norm`; the key bias
  is absent (the converter drops the masked bias).
* Meta `.pth` (`dinov3_vit*16_pretrain_lvd1689m-*.pth`): a torch zip archive read by a
  restricted unpickler (`read_torch_pth`): `cls_token`, `storage_tokens`, `mask_token`,
  `patch_embed.proj`, `rope_embed.periods`, `blocks.{i}.{norm1, attn.qkv.{weight, bias,
  bias_mask}, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}`, `norm`.
  It is renamed to the HF layout (`meta_to_hf`: qkv split, bias masked) and loaded from there.

The key set is checked exactly (`hf_expected_keys` / `meta_expected_keys` give it per spec):
a missing key, an unexpected key or a wrong shape raises `DINOv3CheckpointError` naming the key
with its expected and found shapes (only the training-only `local_cls_norm` of Meta checkpoints,
`optional_keys`, may be present or not). `mask_token` ((1, D) in Meta's code, (1, 1, D) in HF's)
is checked but not kept: the teacher never masks. The conversions are pure shape operations
over an array namespace (`xp=np` to load, `xp=jnp` under `jax.eval_shape` to check layouts
without memory).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from glm5v_jax.models.teachers.dinov3 import (
    DINOv3,
    DINOv3Spec,
    dinov3_spec,
    rope_periods,
)

Shape = tuple[int, ...]
StatePath = tuple[str, ...]


class DINOv3CheckpointError(ValueError):
    """A checkpoint that does not fit the spec: missing / unexpected keys, wrong shapes, bad values."""


def _spec(spec: DINOv3Spec | str) -> DINOv3Spec:
    return dinov3_spec(spec) if isinstance(spec, str) else spec


# ---------------------------------------------------------------------------------------------
# Expected keys
# ---------------------------------------------------------------------------------------------

def hf_expected_keys(spec: DINOv3Spec | str) -> dict[str, Shape]:
    """Every key of a Hugging Face DINOv3 state dict for `spec`, with its shape."""
    s = _spec(spec)
    d, p, f = s.width, s.patch_size, s.mlp_dim
    keys: dict[str, Shape] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, 1, d),
        "embeddings.patch_embeddings.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.bias": (d,),
        "embeddings.register_tokens": (1, s.num_register_tokens, d),  # HF keeps it even when empty
    }
    for i in range(s.depth):
        pre = f"layer.{i}."
        keys.update({pre + "norm1.weight": (d,), pre + "norm1.bias": (d,),
                     pre + "norm2.weight": (d,), pre + "norm2.bias": (d,)})
        for proj in ("q", "k", "v", "o"):
            keys[f"{pre}attention.{proj}_proj.weight"] = (d, d)
        for proj in ("q", "v") if s.mask_k_bias else ("q", "k", "v"):
            if s.qkv_bias:
                keys[f"{pre}attention.{proj}_proj.bias"] = (d,)
        keys[pre + "attention.o_proj.bias"] = (d,)
        if s.layerscale:
            keys.update({pre + "layer_scale1.lambda1": (d,), pre + "layer_scale2.lambda1": (d,)})
        ins = ("gate_proj", "up_proj") if s.ffn == "swiglu" else ("up_proj",)
        for name in ins:
            keys.update({f"{pre}mlp.{name}.weight": (f, d), f"{pre}mlp.{name}.bias": (f,)})
        keys.update({pre + "mlp.down_proj.weight": (d, f), pre + "mlp.down_proj.bias": (d,)})
    keys.update({"norm.weight": (d,), "norm.bias": (d,)})
    return keys


def meta_expected_keys(spec: DINOv3Spec | str) -> dict[str, Shape]:
    """Every key of a Meta DINOv3 `.pth` state dict for `spec`, with its shape."""
    s = _spec(spec)
    d, p, f = s.width, s.patch_size, s.mlp_dim
    keys: dict[str, Shape] = {
        "cls_token": (1, 1, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "rope_embed.periods": (s.head_dim // 4,),
    }
    if s.num_register_tokens:
        keys["storage_tokens"] = (1, s.num_register_tokens, d)
    for i in range(s.depth):
        pre = f"blocks.{i}."
        keys.update({pre + "norm1.weight": (d,), pre + "norm1.bias": (d,),
                     pre + "norm2.weight": (d,), pre + "norm2.bias": (d,),
                     pre + "attn.qkv.weight": (3 * d, d),
                     pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,)})
        if s.qkv_bias:
            keys[pre + "attn.qkv.bias"] = (3 * d,)
            if s.mask_k_bias:
                keys[pre + "attn.qkv.bias_mask"] = (3 * d,)
        if s.layerscale:
            keys.update({pre + "ls1.gamma": (d,), pre + "ls2.gamma": (d,)})
        if s.ffn == "swiglu":
            mlp = {"w1": (f, d), "w2": (f, d), "w3": (d, f)}
        else:
            mlp = {"fc1": (f, d), "fc2": (d, f)}
        for name, shape in mlp.items():
            keys.update({f"{pre}mlp.{name}.weight": shape, f"{pre}mlp.{name}.bias": (shape[0],)})
    keys.update({"norm.weight": (d,), "norm.bias": (d,)})
    return keys


EXPECTED_KEYS: dict[str, Callable[[DINOv3Spec | str], dict[str, Shape]]] = {
    "hf": hf_expected_keys, "meta": meta_expected_keys}


def optional_keys(spec: DINOv3Spec | str, fmt: str) -> dict[str, Shape]:
    """Keys a checkpoint may hold that inference does not use (shape-checked, then dropped): Meta's
    training-only `local_cls_norm` (`untie_global_and_local_cls_norm`, e.g. the SAT-493M ViT-L)."""
    d = _spec(spec).width
    return {"local_cls_norm.weight": (d,), "local_cls_norm.bias": (d,)} if fmt == "meta" else {}


def check_checkpoint(ckpt: Mapping[str, Any], spec: DINOv3Spec | str, fmt: str, *, source: str = "") -> None:
    """Raise `DINOv3CheckpointError` unless `ckpt` has exactly the keys and shapes of `fmt` for `spec`."""
    if fmt not in EXPECTED_KEYS:
        raise ValueError(f"unknown DINOv3 checkpoint format {fmt!r}; known: {sorted(EXPECTED_KEYS)}")
    expected = EXPECTED_KEYS[fmt](spec)
    optional = optional_keys(spec, fmt)
    where = f"DINOv3 {fmt} checkpoint{' ' + repr(source) if source else ''}"
    problems = []
    for key, shape in expected.items():
        if key not in ckpt:
            problems.append(f"missing key {key!r} (expected shape {shape})")
        elif tuple(ckpt[key].shape) != shape:
            problems.append(f"key {key!r}: expected shape {shape}, found {tuple(ckpt[key].shape)}")
    for key, shape in optional.items():
        if key in ckpt and tuple(ckpt[key].shape) != shape:
            problems.append(f"key {key!r}: expected shape {shape}, found {tuple(ckpt[key].shape)}")
    extra = [k for k in ckpt if k not in expected and k not in optional]
    problems += [f"unexpected key {k!r} (shape {tuple(ckpt[k].shape)})" for k in extra]
    if not problems:
        return
    hint = ""
    missing = [k for k in expected if k not in ckpt]
    for k in extra:  # the same names under a wrapper prefix: suggest it
        tail = next((m for m in missing if k.endswith("." + m)), None)
        if tail is not None:
            hint = f"; the keys look prefixed: pass prefix={k[:-len(tail)]!r}"
            break
    shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
    raise DINOv3CheckpointError(f"{where} does not match the spec ({len(problems)} problems): {shown}{hint}")


def select_prefix(ckpt: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under `prefix` with it removed (all entries when prefix is '')."""
    if not prefix:
        return dict(ckpt)
    return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Conversions (pure shape operations over the array namespace `xp`)
# ---------------------------------------------------------------------------------------------

def meta_to_hf(ckpt: Mapping[str, Any], spec: DINOv3Spec | str, *, xp=np) -> dict[str, Any]:
    """Rename a checked Meta state dict to the HF layout: split qkv, apply `bias_mask`, drop the
    key bias (when `mask_k_bias`) and `rope_embed.periods` (recomputed from the spec)."""
    s = _spec(spec)
    d = s.width
    out: dict[str, Any] = {
        "embeddings.cls_token": ckpt["cls_token"],
        "embeddings.mask_token": ckpt["mask_token"].reshape(1, 1, d),
        "embeddings.patch_embeddings.weight": ckpt["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": ckpt["patch_embed.proj.bias"],
        "norm.weight": ckpt["norm.weight"], "norm.bias": ckpt["norm.bias"],
    }
    out["embeddings.register_tokens"] = (ckpt["storage_tokens"] if s.num_register_tokens
                                         else xp.zeros((1, 0, d), np.float32))
    mlp_names = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if s.ffn == "swiglu"
                 else {"fc1": "up_proj", "fc2": "down_proj"})
    for i in range(s.depth):
        src, dst = f"blocks.{i}.", f"layer.{i}."
        for n in ("norm1", "norm2"):
            for t in ("weight", "bias"):
                out[f"{dst}{n}.{t}"] = ckpt[f"{src}{n}.{t}"]
        w = ckpt[src + "attn.qkv.weight"]  # [3D, D]: rows (q | k | v), each (head, head_dim)
        for j, proj in enumerate("qkv"):
            out[f"{dst}attention.{proj}_proj.weight"] = w[j * d:(j + 1) * d]
        if s.qkv_bias:
            b = ckpt[src + "attn.qkv.bias"]
            if s.mask_k_bias:
                b = b * ckpt[src + "attn.qkv.bias_mask"]
            for j, proj in enumerate("qkv"):
                if not (proj == "k" and s.mask_k_bias):
                    out[f"{dst}attention.{proj}_proj.bias"] = b[j * d:(j + 1) * d]
        out[dst + "attention.o_proj.weight"] = ckpt[src + "attn.proj.weight"]
        out[dst + "attention.o_proj.bias"] = ckpt[src + "attn.proj.bias"]
        if s.layerscale:
            out[dst + "layer_scale1.lambda1"] = ckpt[src + "ls1.gamma"]
            out[dst + "layer_scale2.lambda1"] = ckpt[src + "ls2.gamma"]
        for a, b_name in mlp_names.items():
            for t in ("weight", "bias"):
                out[f"{dst}mlp.{b_name}.{t}"] = ckpt[f"{src}mlp.{a}.{t}"]
    return out


def check_meta_values(ckpt: Mapping[str, np.ndarray], spec: DINOv3Spec | str) -> None:
    """Value checks the shapes cannot make: the masked key bias is zero, the RoPE periods match."""
    s = _spec(spec)
    d = s.width
    if s.qkv_bias and s.mask_k_bias:
        for i in range(s.depth):
            key = f"blocks.{i}.attn.qkv"
            kb = (np.asarray(ckpt[key + ".bias"], np.float32) * np.asarray(ckpt[key + ".bias_mask"], np.float32))
            if np.any(kb[d:2 * d] != 0):
                raise DINOv3CheckpointError(
                    f"key {key + '.bias_mask'!r}: the key bias is not masked to zero (max |bias*mask| over "
                    f"[{d}:{2 * d}] = {np.max(np.abs(kb[d:2 * d])):.3g}) but the spec has mask_k_bias=True")
    periods = np.asarray(ckpt["rope_embed.periods"], np.float32)
    want = rope_periods(s.head_dim, s.rope_base)
    if not np.allclose(periods, want, rtol=1e-2):
        raise DINOv3CheckpointError(f"key 'rope_embed.periods': {periods.tolist()} differ from the spec's "
                                    f"rope_base={s.rope_base}: {want.tolist()}")


def hf_to_state(ckpt: Mapping[str, Any], spec: DINOv3Spec | str, *, xp=np) -> dict[StatePath, Any]:
    """A checked HF state dict -> the `DINOv3` parameter paths (blocks stacked on axis 0)."""
    s = _spec(spec)
    d, h, hd = s.width, s.num_heads, s.head_dim
    w = ckpt["embeddings.patch_embeddings.weight"]  # [D, C, p, p] -> [(p, p, C), D]
    state: dict[StatePath, Any] = {
        ("patch_embed",): w.transpose(2, 3, 1, 0).reshape(s.patch_size * s.patch_size * 3, d),
        ("patch_bias",): ckpt["embeddings.patch_embeddings.bias"],
        ("cls_token",): ckpt["embeddings.cls_token"].reshape(d),
        ("norm", "scale"): ckpt["norm.weight"],
        ("norm", "bias"): ckpt["norm.bias"],
    }
    if s.num_register_tokens:
        state[("register_tokens",)] = ckpt["embeddings.register_tokens"].reshape(s.num_register_tokens, d)

    def layer(i: int) -> dict[StatePath, Any]:
        def g(name):
            return ckpt[f"layer.{i}.{name}"]
        st: dict[StatePath, Any] = {
            ("norm1", "scale"): g("norm1.weight"), ("norm1", "bias"): g("norm1.bias"),
            ("norm2", "scale"): g("norm2.weight"), ("norm2", "bias"): g("norm2.bias"),
            ("attn", "o"): g("attention.o_proj.weight").T.reshape(h, hd, d),
            ("attn_out_bias",): g("attention.o_proj.bias"),
        }
        for proj in "qkv":
            st[("attn", proj)] = g(f"attention.{proj}_proj.weight").T.reshape(d, h, hd)
            if s.qkv_bias and not (proj == "k" and s.mask_k_bias):
                st[("attn", f"{proj}_bias")] = g(f"attention.{proj}_proj.bias").reshape(h, hd)
        if s.layerscale:
            st[("ls1",)], st[("ls2",)] = g("layer_scale1.lambda1"), g("layer_scale2.lambda1")
        names = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if s.ffn == "swiglu"
                 else {"fc1": "up_proj", "fc2": "down_proj"})
        for ours, theirs in names.items():
            st[("mlp", ours)] = g(f"mlp.{theirs}.weight").T
            st[("mlp", ours + "_bias")] = g(f"mlp.{theirs}.bias")
        return st

    layers = [layer(i) for i in range(s.depth)]
    for path in layers[0]:
        state[("blocks",) + path] = xp.stack([lay[path] for lay in layers])
    return state


def model_from_state(spec: DINOv3Spec | str, state: Mapping[StatePath, Any]) -> DINOv3:
    """A `DINOv3` whose parameters are `state` (cast to `spec.param_dtype`); nothing random is built."""
    s = _spec(spec)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DINOv3(s, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(abstract))
    wanted = {tuple(str(k) for k in path) for path, _ in flat}
    extra = sorted(set(state) - wanted)
    if extra:
        raise DINOv3CheckpointError(f"converted state has parameters the model lacks: {extra}")
    new = []
    for path, var in flat:
        key = tuple(str(k) for k in path)
        if key not in state:
            raise DINOv3CheckpointError(f"converted state lacks model parameter {'/'.join(key)}")
        value = state[key]
        if tuple(value.shape) != tuple(var.shape):
            raise DINOv3CheckpointError(f"model parameter {'/'.join(key)}: expected shape {tuple(var.shape)}, "
                                        f"found {tuple(value.shape)}")
        new.append((path, var.replace(jnp.asarray(np.asarray(value, np.float32), var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file (local, or read whole through epath from e.g. gs://) as
    numpy arrays (bfloat16 through ml_dtypes)."""
    from safetensors.numpy import load, load_file

    return load(epath.Path(path).read_bytes()) if "://" in os.fspath(path) else load_file(os.fspath(path))


_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.<X>Storage` in a persistent id: only its element dtype matters."""

    name: str
    dtype: Any


@dataclasses.dataclass(frozen=True)
class _Storage:
    data: np.ndarray  # 1-D, the storage's elements


class _TensorClass:
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in x):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {x!r}")
    return tuple(x)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """`torch._utils._rebuild_tensor(_v2)`: a (strided) view of a storage, as numpy."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or offset < 0:
        raise pickle.UnpicklingError("malformed tensor record (storage, offset)")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    base = storage.data
    count = math.prod(size)
    end = offset + (sum((n - 1) * st for n, st in zip(size, stride)) + 1 if count else 0)
    if end > base.size:
        raise pickle.UnpicklingError(f"tensor {size} at offset {offset} overruns its storage ({base.size} elements)")
    contiguous = all(st == math.prod(size[k + 1:]) for k, st in enumerate(stride) if size[k] > 1)
    if contiguous:
        return base[offset:offset + count].reshape(size)
    view = np.lib.stride_tricks.as_strided(base[offset:], size, [st * base.itemsize for st in stride])
    return np.array(view)


def _rebuild_parameter(data: Any, *_: Any) -> np.ndarray:
    """`torch._utils._rebuild_parameter(_with_state)`: the data alone."""
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError("parameter record without tensor data")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> np.ndarray:
    """`torch._tensor._rebuild_from_type_v2` for plain tensors and parameters only."""
    known = func is _rebuild_tensor or func is _rebuild_parameter
    if not known or new_type is not _TensorClass or not isinstance(args, tuple):
        raise pickle.UnpicklingError("refused _rebuild_from_type_v2 of something other than a tensor")
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
}


class _TorchStateUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's `data.pkl` into numpy, allowing only the torch tensor
    rebuild functions, storage types and OrderedDict; any other global is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str, big_endian: bool):
        super().__init__(file)
        self._archive, self._root, self._big = archive, root, big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a DINOv3 checkpoint holds only "
                                     f"tensors in (Ordered)dicts")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._root}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is not in the archive") from None
            dtype = np.dtype(stype.dtype).newbyteorder(">" if self._big else "<")
            if len(raw) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} holds {len(raw)} bytes, needs {numel * dtype.itemsize}")
            data = np.frombuffer(raw, dtype, count=numel)
            self._storages[key] = _Storage(data.astype(data.dtype.newbyteorder("="), copy=False))
        return self._storages[key]


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Nested dicts of arrays -> {'a.b.c': array}; non-array leaves (versions, epochs) are skipped."""
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, name + ".", out)
        elif isinstance(v, np.ndarray):
            out[name] = v


def read_torch_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch zip checkpoint (`torch.save` since 1.6) as {dotted name: numpy array}.

    The pickle is read by a restricted unpickler (no torch, no arbitrary code); tensor data comes
    from the raw storages under `<root>/data/`. Legacy (non-zip) checkpoints are refused.
    """
    path = os.fspath(path)
    with epath.Path(path).open("rb") as file:  # local or gs://
        if not zipfile.is_zipfile(file):
            raise DINOv3CheckpointError(f"{path!r} is not a zip-format torch checkpoint (legacy .pth is unsupported)")
        obj = _read_torch_zip(file, path)
    if not isinstance(obj, dict):
        raise DINOv3CheckpointError(f"{path!r}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


def _read_torch_zip(file: Any, path: str) -> Any:
    """The unpickled object of an open torch zip checkpoint."""
    with zipfile.ZipFile(file) as archive:
        pkls = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise DINOv3CheckpointError(f"{path!r}: expected one data.pkl in the archive, found {pkls}")
        root = pkls[0][:-len("data.pkl")]
        names = set(archive.namelist())
        big = root + "byteorder" in names and archive.read(root + "byteorder").strip() == b"big"
        with archive.open(pkls[0]) as f:
            return _TorchStateUnpickler(f, archive, root, big).load()


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

def dinov3_from_hf_state_dict(ckpt: Mapping[str, np.ndarray], spec: DINOv3Spec | str, *,
                              source: str = "") -> DINOv3:
    """A `DINOv3` from an HF-layout state dict of numpy arrays (checked first)."""
    check_checkpoint(ckpt, spec, "hf", source=source)
    return model_from_state(spec, hf_to_state(ckpt, spec))


def dinov3_from_meta_state_dict(ckpt: Mapping[str, np.ndarray], spec: DINOv3Spec | str, *,
                                source: str = "") -> DINOv3:
    """A `DINOv3` from a Meta-layout state dict of numpy arrays (checked first)."""
    check_checkpoint(ckpt, spec, "meta", source=source)
    check_meta_values(ckpt, spec)
    return dinov3_from_hf_state_dict(meta_to_hf(ckpt, spec), spec, source=source)


def load_dinov3_hf_safetensors(path: str | os.PathLike, spec: DINOv3Spec | str, *, prefix: str = "") -> DINOv3:
    """A `DINOv3` from a Hugging Face `model.safetensors`; `prefix` selects a wrapped sub-dict."""
    ckpt = select_prefix(read_safetensors(path), prefix)
    return dinov3_from_hf_state_dict(ckpt, spec, source=os.fspath(path))


def load_dinov3_meta_pth(path: str | os.PathLike, spec: DINOv3Spec | str, *, prefix: str = "") -> DINOv3:
    """A `DINOv3` from a Meta `.pth` checkpoint, read without torch; `prefix` selects a sub-dict
    (e.g. 'teacher.backbone.' in a training checkpoint)."""
    ckpt = select_prefix(read_torch_pth(path), prefix)
    return dinov3_from_meta_state_dict(ckpt, spec, source=os.fspath(path))


def load_dinov3(path: str | os.PathLike, spec: DINOv3Spec | str, *, prefix: str = "") -> DINOv3:
    """Pick the loader by file suffix: `.safetensors` (HF) or `.pth` / `.pt` (Meta)."""
    p = os.fspath(path)
    if p.endswith(".safetensors"):
        return load_dinov3_hf_safetensors(p, spec, prefix=prefix)
    if p.endswith((".pth", ".pt")):
        return load_dinov3_meta_pth(p, spec, prefix=prefix)
    raise DINOv3CheckpointError(f"{p!r}: unknown checkpoint suffix; expected .safetensors, .pth or .pt")
