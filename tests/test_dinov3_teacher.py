"""DINOv3 teacher (glm5v_jax.models.teachers.dinov3 and dinov3_loaders) on tiny random checkpoints.

Checkpoints are written here with the real key names (HF safetensors; Meta `.pth` through a
hand-written torch zip + pickle writer, no torch) and compared with an independent float64 NumPy
forward that reads the raw checkpoint dict and works on whole images (real conv over pixels,
DINOv3's row-major token order and RoPE tables), not on the module's patch sequences.
"""
from __future__ import annotations

import math
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from scipy.special import erf

from glm5v_jax.data.naflex import pad_patches, patchify
from glm5v_jax.models.teachers.dinov3 import (
    DINOv3,
    dinov3_spec,
    image_grid_from_patch_yx,
    normalize_pixels,
    rope_cos_sin,
)
from glm5v_jax.models.teachers.dinov3_loaders import (
    DINOv3CheckpointError,
    dinov3_from_hf_state_dict,
    dinov3_from_meta_state_dict,
    hf_expected_keys,
    hf_to_state,
    load_dinov3_hf_safetensors,
    load_dinov3_meta_pth,
    meta_expected_keys,
    meta_to_hf,
    read_torch_pth,
)

P = 16
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
GRIDS = [(2, 6), (4, 2)]  # two images of different grids (rows, cols) in one batch
N = 16  # padded sequence length (12 and 8 valid patches)


# ------------------------------------------------------------------------------------------
# Tiny checkpoints with the real key names, written by hand
# ------------------------------------------------------------------------------------------

def _weights(spec, seed=0):
    """Random torch-layout weights per layer, the way a DINOv3 state dict holds them."""
    rng = np.random.default_rng(seed)
    d, f, r = spec.width, spec.mlp_dim, spec.num_register_tokens
    def n(*s, std=1.0):
        return (rng.standard_normal(s) * std).astype(np.float32)
    top = {"cls": n(1, 1, d), "reg": n(1, r, d), "mask": n(1, d), "conv_w": n(d, 3, P, P, std=0.05),
           "conv_b": n(d, std=0.1), "norm_w": 1 + n(d, std=0.1), "norm_b": n(d, std=0.1)}
    layers = []
    for _ in range(spec.depth):
        lw = {"n1w": 1 + n(d, std=0.1), "n1b": n(d, std=0.1), "n2w": 1 + n(d, std=0.1), "n2b": n(d, std=0.1),
              "qkv_w": n(3 * d, d, std=d**-0.5), "qkv_b": n(3 * d, std=0.1),  # k part nonzero: masked
              "proj_w": n(d, d, std=d**-0.5), "proj_b": n(d, std=0.1),
              "ls1": rng.uniform(0.3, 1.0, d).astype(np.float32), "ls2": rng.uniform(0.3, 1.0, d).astype(np.float32)}
        if spec.ffn == "swiglu":
            lw.update(w1=n(f, d, std=d**-0.5), b1=n(f, std=0.1), w2=n(f, d, std=d**-0.5), b2=n(f, std=0.1),
                      w3=n(d, f, std=f**-0.5), b3=n(d, std=0.1))
        else:
            lw.update(fc1=n(f, d, std=d**-0.5), c1=n(f, std=0.1), fc2=n(d, f, std=f**-0.5), c2=n(d, std=0.1))
        layers.append(lw)
    return top, layers


def meta_state_dict(spec, seed=0):
    top, layers = _weights(spec, seed)
    d, hd = spec.width, spec.head_dim
    sd = {"cls_token": top["cls"], "storage_tokens": top["reg"], "mask_token": top["mask"],
          "patch_embed.proj.weight": top["conv_w"], "patch_embed.proj.bias": top["conv_b"],
          "rope_embed.periods": (100.0 ** (2 * np.arange(hd // 4) / (hd // 2))).astype(np.float32),
          "norm.weight": top["norm_w"], "norm.bias": top["norm_b"]}
    mask = np.ones(3 * d, np.float32)
    mask[d:2 * d] = 0
    for i, lw in enumerate(layers):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": lw["n1w"], b + "norm1.bias": lw["n1b"], b + "norm2.weight": lw["n2w"],
                   b + "norm2.bias": lw["n2b"], b + "attn.qkv.weight": lw["qkv_w"], b + "attn.qkv.bias": lw["qkv_b"],
                   b + "attn.qkv.bias_mask": mask, b + "attn.proj.weight": lw["proj_w"],
                   b + "attn.proj.bias": lw["proj_b"], b + "ls1.gamma": lw["ls1"], b + "ls2.gamma": lw["ls2"]})
        if spec.ffn == "swiglu":
            for k, (w, bb) in {"w1": ("w1", "b1"), "w2": ("w2", "b2"), "w3": ("w3", "b3")}.items():
                sd.update({f"{b}mlp.{k}.weight": lw[w], f"{b}mlp.{k}.bias": lw[bb]})
        else:
            sd.update({b + "mlp.fc1.weight": lw["fc1"], b + "mlp.fc1.bias": lw["c1"],
                       b + "mlp.fc2.weight": lw["fc2"], b + "mlp.fc2.bias": lw["c2"]})
    return sd


def hf_state_dict(spec, seed=0):
    top, layers = _weights(spec, seed)
    d = spec.width
    sd = {"embeddings.cls_token": top["cls"], "embeddings.mask_token": top["mask"][None],
          "embeddings.register_tokens": top["reg"], "embeddings.patch_embeddings.weight": top["conv_w"],
          "embeddings.patch_embeddings.bias": top["conv_b"], "norm.weight": top["norm_w"], "norm.bias": top["norm_b"]}
    for i, lw in enumerate(layers):
        b, a = f"layer.{i}.", f"layer.{i}.attention."
        w, bias = lw["qkv_w"], lw["qkv_b"]
        sd.update({b + "norm1.weight": lw["n1w"], b + "norm1.bias": lw["n1b"], b + "norm2.weight": lw["n2w"],
                   b + "norm2.bias": lw["n2b"], a + "q_proj.weight": w[:d], a + "q_proj.bias": bias[:d],
                   a + "k_proj.weight": w[d:2 * d], a + "v_proj.weight": w[2 * d:], a + "v_proj.bias": bias[2 * d:],
                   a + "o_proj.weight": lw["proj_w"], a + "o_proj.bias": lw["proj_b"],
                   b + "layer_scale1.lambda1": lw["ls1"], b + "layer_scale2.lambda1": lw["ls2"]})
        if spec.ffn == "swiglu":
            for k, (ww, bb) in {"gate_proj": ("w1", "b1"), "up_proj": ("w2", "b2"), "down_proj": ("w3", "b3")}.items():
                sd.update({f"{b}mlp.{k}.weight": lw[ww], f"{b}mlp.{k}.bias": lw[bb]})
        else:
            sd.update({b + "mlp.up_proj.weight": lw["fc1"], b + "mlp.up_proj.bias": lw["c1"],
                       b + "mlp.down_proj.weight": lw["fc2"], b + "mlp.down_proj.bias": lw["c2"]})
    return sd


# ------------------------------------------------------------------------------------------
# A torch zip checkpoint writer (pickle protocol 2 opcodes by hand, no torch)
# ------------------------------------------------------------------------------------------

def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage"}


def write_torch_pth(path, tensors: dict, *, shared=(), transposed=(), root="archive"):
    """`tensors` as torch.save writes a state dict: an OrderedDict (with a `_metadata` BUILD) of
    `_rebuild_tensor_v2` records whose storages are raw files `root/data/<key>`. Keys in `shared`
    are packed into one storage at offsets; keys in `transposed` are stored as non-contiguous views."""
    storages: dict[str, bytes] = {}
    records = []
    pack = [k for k in tensors if k in shared]
    if pack:
        flat = np.concatenate([tensors[k].ravel() for k in pack])
        storages["0"] = flat.tobytes()
    off = 0
    for k, arr in tensors.items():
        arr = np.asarray(arr)
        shape = arr.shape
        if k in shared:
            key, offset, numel, dtype = "0", off, flat.size, flat.dtype
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            off += arr.size
        elif k in transposed:  # storage holds arr.T contiguous; the tensor is its transpose
            key, offset, numel, dtype = str(len(storages) + 1), 0, arr.size, arr.dtype
            storages[key] = np.ascontiguousarray(arr.T).tobytes()
            stride = (1, shape[0])
        else:
            key, offset, numel, dtype = str(len(storages) + 1), 0, arr.size, arr.dtype
            storages[key] = np.ascontiguousarray(arr).tobytes()
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        pid = _tuple([_u("storage"), _global("torch", _STORAGE_NAMES[np.dtype(dtype)]), _u(key), _u("cpu"),
                      _int(numel)]) + b"Q"
        hooks = _global("collections", "OrderedDict") + b")R"
        rec = (_global("torch._utils", "_rebuild_tensor_v2")
               + _tuple([pid, _int(offset), _tuple([_int(s) for s in shape]), _tuple([_int(s) for s in stride]),
                         b"\x89", hooks]) + b"R")
        records.append(_u(k) + rec)
    meta_state = b"}" + _u("_metadata") + b"}" + _u("") + b"}" + _u("version") + _int(1) + b"ss" + b"s"
    pkl = (b"\x80\x02" + _global("collections", "OrderedDict") + b")R" + b"(" + b"".join(records) + b"u"
           + meta_state + b"b" + b".")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"{root}/data/{key}", raw)
        z.writestr(f"{root}/version", "3\n")


# ------------------------------------------------------------------------------------------
# Independent NumPy forward (float64) on whole images
# ------------------------------------------------------------------------------------------

def _ln(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _meta_layer(sd, i):
    def g(k):
        return sd[f"blocks.{i}.{k}"].astype(np.float64)
    qkv_b = g("attn.qkv.bias") * g("attn.qkv.bias_mask")
    mlp = ({"gate": (g("mlp.w1.weight"), g("mlp.w1.bias")), "up": (g("mlp.w2.weight"), g("mlp.w2.bias")),
            "down": (g("mlp.w3.weight"), g("mlp.w3.bias"))} if f"blocks.{i}.mlp.w1.weight" in sd else
           {"up": (g("mlp.fc1.weight"), g("mlp.fc1.bias")), "down": (g("mlp.fc2.weight"), g("mlp.fc2.bias"))})
    return {"n1": (g("norm1.weight"), g("norm1.bias")), "n2": (g("norm2.weight"), g("norm2.bias")),
            "qkv": (g("attn.qkv.weight"), qkv_b), "proj": (g("attn.proj.weight"), g("attn.proj.bias")),
            "ls1": g("ls1.gamma"), "ls2": g("ls2.gamma"), "mlp": mlp}


def numpy_dinov3(sd, spec, image):
    """DINOv3 on one image `[H*p, W*p, 3]` in [-1, 1] from a Meta state dict: (cls, registers, patches [H, W, D])."""
    d, nh, hd, r = spec.width, spec.num_heads, spec.head_dim, spec.num_register_tokens
    pre = 1 + r
    hp, wp, _ = image.shape
    h, w = hp // P, wp // P
    x = ((image.astype(np.float64) + 1) / 2 - MEAN) / STD
    conv_w = sd["patch_embed.proj.weight"].astype(np.float64)  # [D, C, p, p]
    patches = np.einsum("hiwjc,dcij->hwd", x.reshape(h, P, w, P, 3), conv_w) + sd["patch_embed.proj.bias"]
    tok = np.concatenate([sd["cls_token"][0], sd["storage_tokens"][0], patches.reshape(h * w, d)]).astype(np.float64)
    # RoPE: DINOv3's tables for this image's own grid.
    periods = 100.0 ** (2 * np.arange(hd // 4) / (hd // 2))
    ch, cw = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), -1).reshape(h * w, 2) * 2 - 1
    ang = (2 * np.pi * coords[:, :, None] / periods).reshape(h * w, hd // 2)
    cos, sin = np.cos(np.tile(ang, 2)), np.sin(np.tile(ang, 2))

    def rope(t):  # t [heads, S, hd]; prefix tokens untouched
        p_ = t[:, pre:]
        rot = np.concatenate([-p_[..., hd // 2:], p_[..., :hd // 2]], -1)
        return np.concatenate([t[:, :pre], p_ * cos + rot * sin], 1)

    s = tok.shape[0]
    for i in range(spec.depth):
        lw = _meta_layer(sd, i)
        y = _ln(tok, *lw["n1"])
        qkv = (y @ lw["qkv"][0].T + lw["qkv"][1]).reshape(s, 3, nh, hd).transpose(1, 2, 0, 3)
        q, k, v = rope(qkv[0]), rope(qkv[1]), qkv[2]
        a = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v  # [heads, S, hd]
        tok = tok + lw["ls1"] * (a.transpose(1, 0, 2).reshape(s, d) @ lw["proj"][0].T + lw["proj"][1])
        y = _ln(tok, *lw["n2"])
        m = lw["mlp"]
        if "gate" in m:
            g_ = y @ m["gate"][0].T + m["gate"][1]
            hid = g_ / (1 + np.exp(-g_)) * (y @ m["up"][0].T + m["up"][1])
        else:
            u = y @ m["up"][0].T + m["up"][1]
            hid = 0.5 * u * (1 + erf(u / math.sqrt(2)))
        tok = tok + lw["ls2"] * (hid @ m["down"][0].T + m["down"][1])
    out = _ln(tok, sd["norm.weight"], sd["norm.bias"])
    return out[0], out[1:pre], out[pre:].reshape(h, w, d)


# ------------------------------------------------------------------------------------------
# Inputs and helpers
# ------------------------------------------------------------------------------------------

def naflex_batch(grids=GRIDS, n=N, seed=1, pad_seed=2):
    """Images `[gh*p, gw*p, 3]` in [-1, 1] and their padded NaFlex batch (garbage in padding)."""
    rng, prng = np.random.default_rng(seed), np.random.default_rng(pad_seed)
    images, rows = [], []
    for gh, gw in grids:
        img = rng.uniform(-1, 1, (gh * P, gw * P, 3)).astype(np.float32)
        patches, yx = patchify(img, P, merge=2)  # merge-window order, as the data pipeline emits
        patches, yx, valid = pad_patches(patches, yx, n)
        pad = ~valid
        patches[pad] = prng.uniform(-5, 5, (pad.sum(), patches.shape[1]))
        yx[pad] = prng.integers(0, 9, (pad.sum(), 2))
        images.append(img)
        rows.append((patches, yx, valid))
    patches, yx, valid = (np.stack(c) for c in zip(*rows))
    return images, jnp.asarray(patches), jnp.asarray(yx), jnp.asarray(valid)


@nnx.jit
def forward(model, patches, yx, valid):
    return model(patches, yx, valid)


def check_against_reference(out, sd, spec, images, yx, valid, tol=1e-5):
    for b, img in enumerate(images):
        cls, regs, grid = numpy_dinov3(sd, spec, img)
        np.testing.assert_allclose(out["cls"][b], cls, atol=tol, rtol=tol)
        np.testing.assert_allclose(out["registers"][b], regs, atol=tol, rtol=tol)
        v = np.asarray(valid[b])
        y, x = np.asarray(yx[b])[v].T
        np.testing.assert_allclose(np.asarray(out["tokens"][b])[v], grid[y, x], atol=tol, rtol=tol)
        assert np.all(np.asarray(out["tokens"][b])[~v] == 0)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "tiny+"])
def test_hf_and_meta_checkpoints_match_numpy_forward(tmp_path, variant):
    """Both formats load to the same parameters and match the NumPy forward to 1e-5 in float32,
    for two image grids in one padded NaFlex batch."""
    spec = dinov3_spec(variant)
    meta, hf = meta_state_dict(spec), hf_state_dict(spec)
    save_file(hf, str(tmp_path / "model.safetensors"))
    write_torch_pth(tmp_path / "dinov3.pth", meta, shared=("cls_token", "storage_tokens", "mask_token"),
                    transposed=("blocks.0.attn.proj.weight", "blocks.1.mlp.w3.weight", "blocks.1.mlp.fc2.weight"))
    assert set(read_torch_pth(tmp_path / "dinov3.pth")) == set(meta)
    m_hf = load_dinov3_hf_safetensors(tmp_path / "model.safetensors", spec)
    m_meta = load_dinov3_meta_pth(tmp_path / "dinov3.pth", spec)
    s_hf, s_meta = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (m_hf, m_meta))
    assert s_hf.keys() == s_meta.keys()
    for k in s_hf:
        np.testing.assert_array_equal(s_hf[k][...], s_meta[k][...], err_msg=str(k))
    images, patches, yx, valid = naflex_batch()
    out = forward(m_meta, patches, yx, valid)
    assert out["cls"].shape == (2, spec.width) and out["registers"].shape == (2, 4, spec.width)
    assert out["tokens"].shape == (2, N, spec.width) and out["tokens"].dtype == jnp.float32
    check_against_reference(out, meta, spec, images, yx, valid)


def test_padding_never_affects_valid_outputs():
    spec = dinov3_spec("tiny")
    model = dinov3_from_meta_state_dict(meta_state_dict(spec), spec)
    _, p1, yx1, v1 = naflex_batch(pad_seed=2)
    _, p2, yx2, v2 = naflex_batch(pad_seed=3)  # other garbage in the padding
    assert not np.array_equal(p1, p2)
    o1, o2 = forward(model, p1, yx1, v1), forward(model, p2, yx2, v2)
    _, p3, yx3, v3 = naflex_batch(n=24)  # more padding
    o3 = forward(model, p3, yx3, v3)
    # Same shapes: bit-identical. Another length: the masked key sums are float32 reductions over a
    # different number of terms, which XLA may fuse and order differently per machine; compare at
    # float32 rounding relative to the outputs' scale, not at a fixed absolute 1e-6.
    def close(a, b):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)

    for k in ("cls", "registers"):
        np.testing.assert_array_equal(o1[k], o2[k])
        close(o1[k], o3[k])
    np.testing.assert_array_equal(o1["tokens"], o2["tokens"])
    close(o1["tokens"], o3["tokens"][:, :N])
    assert np.all(np.asarray(o3["tokens"])[~np.asarray(v3)] == 0)


def test_rope_of_an_image_depends_only_on_its_own_grid():
    spec = dinov3_spec("tiny")
    hd, pre = spec.head_dim, spec.num_prefix_tokens
    _, _, yx, valid = naflex_batch()
    grid = image_grid_from_patch_yx(yx, valid)
    np.testing.assert_array_equal(grid, np.array(GRIDS))
    cos, sin = rope_cos_sin(yx, grid, hd, spec.rope_base, pre)
    assert cos.shape == (2, pre + N, hd // 2)
    np.testing.assert_array_equal(cos[:, :pre], 1.0)
    np.testing.assert_array_equal(sin[:, :pre], 0.0)
    for b in range(2):  # each row alone gives the same tables as inside the batch
        c1, s1 = rope_cos_sin(yx[b:b + 1], grid[b:b + 1], hd, spec.rope_base, pre)
        np.testing.assert_array_equal(c1[0], cos[b])
        np.testing.assert_array_equal(s1[0], sin[b])
    # The model: image 0's outputs do not move when image 1 changes grid.
    model = dinov3_from_hf_state_dict(hf_state_dict(spec), spec)
    _, pa, yxa, va = naflex_batch(grids=[(2, 6), (4, 2)])
    _, pb, yxb, vb = naflex_batch(grids=[(2, 6), (2, 2)])
    oa, ob = forward(model, pa, yxa, va), forward(model, pb, yxb, vb)
    np.testing.assert_allclose(oa["tokens"][0], ob["tokens"][0], atol=1e-6)
    np.testing.assert_allclose(oa["cls"][0], ob["cls"][0], atol=1e-6)
    # An explicit image_grid equals the derived one.
    oc = model(pa, yxa, va, image_grid=jnp.asarray(GRIDS))
    np.testing.assert_allclose(oc["tokens"], oa["tokens"], atol=1e-6)


def test_bfloat16_compute_runs_and_stays_close():
    spec = dinov3_spec("tiny+")
    sd = hf_state_dict(spec)
    ref = forward(dinov3_from_hf_state_dict(sd, spec), *naflex_batch()[1:])
    bf = dinov3_spec("tiny+", dtype="bfloat16")
    model = dinov3_from_hf_state_dict(sd, bf)
    assert model.blocks.attn.q[...].dtype == jnp.float32  # params stay float32
    out = forward(model, *naflex_batch()[1:])
    for k in ("cls", "registers", "tokens"):
        assert out[k].dtype == jnp.float32 and np.all(np.isfinite(out[k]))
        err = np.max(np.abs(out[k] - ref[k])) / np.max(np.abs(ref[k]))
        assert err < 5e-2, (k, err)


def test_normalize_pixels_is_imagenet_per_channel():
    rgb = np.array([-1.0, 0.0, 1.0], np.float32)
    patches = jnp.asarray(np.tile(rgb, (1, 1, P * P)))  # [1, 1, P*P*3], (p, p, C) with C last
    out = np.asarray(normalize_pixels(patches, P)).reshape(P * P, 3)
    np.testing.assert_allclose(out, np.tile(((rgb + 1) / 2 - MEAN) / STD, (P * P, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="patch_size"):
        normalize_pixels(jnp.zeros((1, 1, 10)), P)


# Per-variant key sets: counts, spot shapes, parameter totals (README: 21M, 29M, 86M, 300M, 840M).
_VARIANTS = {
    "S": (12, "mlp.up_proj.weight", (1536, 384), 21.6e6),
    "S+": (12, "mlp.gate_proj.weight", (1536, 384), 28.7e6),
    "B": (12, "mlp.up_proj.weight", (3072, 768), 85.7e6),
    "L": (24, "mlp.up_proj.weight", (4096, 1024), 303.1e6),
    "H+": (32, "mlp.gate_proj.weight", (5120, 1280), 840.6e6),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_expected_keys_and_shapes_per_variant(variant):
    """Each format's full key set converts (abstractly) to exactly the model's parameter shapes."""
    spec = dinov3_spec(variant)
    depth, mlp_key, mlp_shape, total = _VARIANTS[variant]
    d, hd = spec.width, spec.head_dim
    abstract = nnx.eval_shape(lambda: DINOv3(spec, rngs=nnx.Rngs(0)))
    model_shapes = {tuple(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    hf, meta = hf_expected_keys(spec), meta_expected_keys(spec)
    swiglu = spec.ffn == "swiglu"
    assert len(hf) == 7 + depth * (17 + 2 * swiglu) and len(meta) == 8 + depth * (15 + 2 * swiglu)
    assert hf[f"layer.{depth - 1}.{mlp_key}"] == mlp_shape
    assert hf["embeddings.patch_embeddings.weight"] == (d, 3, 16, 16)
    assert hf["embeddings.register_tokens"] == meta["storage_tokens"] == (1, 4, d)
    assert "layer.0.attention.k_proj.bias" not in hf and hf["layer.0.attention.q_proj.bias"] == (d,)
    assert meta["blocks.0.attn.qkv.weight"] == (3 * d, d) and meta["blocks.0.attn.qkv.bias_mask"] == (3 * d,)
    assert meta["rope_embed.periods"] == (hd // 4,)
    n_params = sum(math.prod(s) for k, s in hf.items() if "mask_token" not in k)
    assert n_params == sum(math.prod(s) for s in model_shapes.values())
    assert abs(n_params - total) / total < 2e-3, n_params
    for fmt, keys in (("hf", hf), ("meta", meta)):
        ckpt = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in keys.items()}
        if fmt == "hf":
            def convert(c):
                return hf_to_state(c, spec, xp=jnp)
        else:
            def convert(c):
                return hf_to_state(meta_to_hf(c, spec, xp=jnp), spec, xp=jnp)
        got = jax.eval_shape(convert, ckpt)
        assert {k: tuple(v.shape) for k, v in got.items()} == model_shapes, fmt


def test_missing_key_raises_naming_it():
    spec = dinov3_spec("tiny")
    sd = hf_state_dict(spec)
    del sd["layer.1.attention.v_proj.bias"]
    with pytest.raises(DINOv3CheckpointError, match=r"missing key 'layer\.1\.attention\.v_proj\.bias' "
                                                    r"\(expected shape \(32,\)\)"):
        dinov3_from_hf_state_dict(sd, spec)
    meta = meta_state_dict(spec)
    del meta["blocks.0.ls2.gamma"]
    with pytest.raises(DINOv3CheckpointError, match=r"missing key 'blocks\.0\.ls2\.gamma'"):
        dinov3_from_meta_state_dict(meta, spec)


def test_wrong_shape_and_unexpected_key_raise_naming_them():
    spec = dinov3_spec("tiny")
    meta = meta_state_dict(spec)
    meta["blocks.1.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(DINOv3CheckpointError, match=r"key 'blocks\.1\.mlp\.fc1\.weight': expected shape "
                                                    r"\(128, 32\), found \(64, 32\)"):
        dinov3_from_meta_state_dict(meta, spec)
    sd = hf_state_dict(spec)
    sd["layer.0.attention.k_proj.bias"] = np.zeros(32, np.float32)  # a key bias the spec masks
    with pytest.raises(DINOv3CheckpointError, match=r"unexpected key 'layer\.0\.attention\.k_proj\.bias'"):
        dinov3_from_hf_state_dict(sd, spec)
    wrapped = {"backbone." + k: v for k, v in hf_state_dict(spec).items()}
    with pytest.raises(DINOv3CheckpointError, match=r"prefix='backbone\.'"):
        dinov3_from_hf_state_dict(wrapped, spec)


def test_meta_key_bias_must_be_masked():
    spec = dinov3_spec("tiny")
    meta = meta_state_dict(spec)
    meta["blocks.0.attn.qkv.bias_mask"] = np.ones(96, np.float32)  # key bias would be live
    with pytest.raises(DINOv3CheckpointError, match=r"blocks\.0\.attn\.qkv\.bias_mask.*not masked"):
        dinov3_from_meta_state_dict(meta, spec)


def test_meta_training_only_keys_are_accepted():
    spec = dinov3_spec("tiny")
    meta = meta_state_dict(spec)
    meta["local_cls_norm.weight"], meta["local_cls_norm.bias"] = np.ones(32, np.float32), np.zeros(32, np.float32)
    dinov3_from_meta_state_dict(meta, spec)  # unused at inference: accepted
    meta["local_cls_norm.bias"] = np.zeros(31, np.float32)
    with pytest.raises(DINOv3CheckpointError, match=r"key 'local_cls_norm\.bias': expected shape \(32,\)"):
        dinov3_from_meta_state_dict(meta, spec)


def test_pth_reader_refuses_other_globals(tmp_path):
    evil = b"\x80\x02" + _global("os", "system") + _tuple([_u("echo hi")]) + b"R."
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("archive/data.pkl", evil)
    with pytest.raises(pickle.UnpicklingError, match="refused global os.system"):
        read_torch_pth(tmp_path / "evil.pth")
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DINOv3CheckpointError, match="not a zip"):
        read_torch_pth(tmp_path / "legacy.pth")
    # float16 storages and plain-dict nesting read back exactly.
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    write_torch_pth(tmp_path / "h.pth", {"x": x})
    np.testing.assert_array_equal(read_torch_pth(tmp_path / "h.pth")["x"], x)
