"""SigLIP2 teacher: the module and its big_vision / Hugging Face loaders on tiny random checkpoints.

The tests write the checkpoints themselves with the real key names (`np.savez`,
`safetensors.numpy.save_file`) and compare the loaded module with a pure NumPy forward
written here from the raw checkpoint dict (flax semantics for big_vision, torch semantics
for HF), one image at a time over its valid patches only (no padding at all).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from glm5v_jax.models.teachers.siglip2 import (
    SIGLIP2_VARIANTS,
    SigLIP2,
    SigLIP2Spec,
    pos_weights,
    siglip2_spec,
)
from glm5v_jax.models.teachers.siglip2_loaders import (
    SigLIP2CheckpointError,
    abstract_siglip2,
    converted_shapes,
    expected_big_vision_keys,
    expected_hf_keys,
    load_siglip2_big_vision_npz,
    load_siglip2_hf_safetensors,
)

TINY = SIGLIP2_VARIANTS["tiny"]  # width 32, depth 2, mlp 64, 4 heads, patch 4, 4x4 table
TOL = {"rtol": 2e-5, "atol": 2e-5}

# ----------------------------------------------------------------------------- checkpoints


def make_big_vision(spec: SigLIP2Spec, seed: int = 0, scanned: bool = True) -> dict[str, np.ndarray]:
    """Random big_vision two-tower checkpoint (image tower + a few text/t/b entries)."""
    rng = np.random.default_rng(seed)
    d, m, h, p, g, L = spec.width, spec.mlp_dim, spec.num_heads, spec.patch_size, spec.posemb_grid, spec.depth
    hd = d // h

    def w(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    def ln(prefix, lead=()):
        return {f"{prefix}/scale": (1 + 0.2 * rng.standard_normal((*lead, d))).astype(np.float32),
                f"{prefix}/bias": w(*lead, d, s=0.1)}

    def mha(prefix, lead=()):
        out = {}
        for n in ("query", "key", "value"):
            out[f"{prefix}/{n}/kernel"] = w(*lead, d, h, hd, s=d**-0.5)
            out[f"{prefix}/{n}/bias"] = w(*lead, h, hd, s=0.2)
        out[f"{prefix}/out/kernel"] = w(*lead, h, hd, d, s=d**-0.5)
        out[f"{prefix}/out/bias"] = w(*lead, d, s=0.1)
        return out

    def mlp(prefix, lead=()):
        return {f"{prefix}/Dense_0/kernel": w(*lead, d, m, s=d**-0.5), f"{prefix}/Dense_0/bias": w(*lead, m, s=0.1),
                f"{prefix}/Dense_1/kernel": w(*lead, m, d, s=m**-0.5), f"{prefix}/Dense_1/bias": w(*lead, d, s=0.1)}

    img = {}
    if spec.naflex:
        img["embedding/kernel"] = w(p * p * 3, d, s=0.1)
        img["pos_embedding"] = w(g, g, d, s=0.5)
    else:
        img["embedding/kernel"] = w(p, p, 3, d, s=0.1)
        img["pos_embedding"] = w(1, g * g, d, s=0.5)
    img["embedding/bias"] = w(d, s=0.1)

    def block(lead):
        return {**ln("LayerNorm_0", lead), **mha("MultiHeadDotProductAttention_0", lead),
                **ln("LayerNorm_1", lead), **mlp("MlpBlock_0", lead)}

    if scanned:
        img.update({f"Transformer/encoderblock/{k}": v for k, v in block((L,)).items()})
    else:
        for i in range(L):
            img.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block(()).items()})
    img.update(ln("Transformer/encoder_norm"))
    img["MAPHead_0/probe"] = w(1, 1, d, s=1.0)
    img.update(mha("MAPHead_0/MultiHeadDotProductAttention_0"))
    img.update(ln("MAPHead_0/LayerNorm_0"))
    img.update(mlp("MAPHead_0/MlpBlock_0"))
    ckpt = {f"params/img/{k}": v for k, v in img.items()}
    ckpt.update({"params/txt/Embed_0/embedding": w(10, d), "params/txt/head/kernel": w(d, d),
                 "params/t": np.float32([2.3]), "params/b": np.float32([-10.0])})
    return ckpt


def big_vision_to_hf(bv: dict[str, np.ndarray], spec: SigLIP2Spec, scanned: bool = True) -> dict[str, np.ndarray]:
    """The same weights in Hugging Face's layout (torch Linear (out, in), Conv (D, C, p, p))."""
    d = spec.width
    def g(k):
        return bv["params/img/" + k]
    def lin(k):
        return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)  # (in, out...) -> (out, in)
    def out_lin(k):
        return np.ascontiguousarray(k.reshape(-1, d).T)  # (H, Dh, D) -> (D, H*Dh)
    hf = {}
    ek = g("embedding/kernel")
    if spec.naflex:
        hf["vision_model.embeddings.patch_embedding.weight"] = np.ascontiguousarray(ek.T)
    else:
        hf["vision_model.embeddings.patch_embedding.weight"] = np.ascontiguousarray(ek.transpose(3, 2, 0, 1))
    hf["vision_model.embeddings.patch_embedding.bias"] = g("embedding/bias")
    hf["vision_model.embeddings.position_embedding.weight"] = np.ascontiguousarray(g("pos_embedding").reshape(-1, d))
    for i in range(spec.depth):
        blk = (lambda k, i=i: g(f"Transformer/encoderblock/{k}")[i]) if scanned else (
            lambda k, i=i: g(f"Transformer/encoderblock_{i}/{k}"))
        pre = f"vision_model.encoder.layers.{i}."
        for a, b in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            hf[pre + a + ".weight"], hf[pre + a + ".bias"] = blk(b + "/scale"), blk(b + "/bias")
        for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
            hf[pre + f"self_attn.{a}_proj.weight"] = lin(blk(f"MultiHeadDotProductAttention_0/{b}/kernel"))
            hf[pre + f"self_attn.{a}_proj.bias"] = blk(f"MultiHeadDotProductAttention_0/{b}/bias").reshape(-1)
        hf[pre + "self_attn.out_proj.weight"] = out_lin(blk("MultiHeadDotProductAttention_0/out/kernel"))
        hf[pre + "self_attn.out_proj.bias"] = blk("MultiHeadDotProductAttention_0/out/bias")
        for a, b in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            hf[pre + f"mlp.{a}.weight"] = lin(blk(f"MlpBlock_0/{b}/kernel"))
            hf[pre + f"mlp.{a}.bias"] = blk(f"MlpBlock_0/{b}/bias")
    hf["vision_model.post_layernorm.weight"] = g("Transformer/encoder_norm/scale")
    hf["vision_model.post_layernorm.bias"] = g("Transformer/encoder_norm/bias")
    mp = "MAPHead_0/MultiHeadDotProductAttention_0/"
    hf["vision_model.head.probe"] = g("MAPHead_0/probe")
    hf["vision_model.head.attention.in_proj_weight"] = np.concatenate(
        [lin(g(mp + f"{n}/kernel")) for n in ("query", "key", "value")])
    hf["vision_model.head.attention.in_proj_bias"] = np.concatenate(
        [g(mp + f"{n}/bias").reshape(-1) for n in ("query", "key", "value")])
    hf["vision_model.head.attention.out_proj.weight"] = out_lin(g(mp + "out/kernel"))
    hf["vision_model.head.attention.out_proj.bias"] = g(mp + "out/bias")
    hf["vision_model.head.layernorm.weight"] = g("MAPHead_0/LayerNorm_0/scale")
    hf["vision_model.head.layernorm.bias"] = g("MAPHead_0/LayerNorm_0/bias")
    for a, b in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        hf[f"vision_model.head.mlp.{a}.weight"] = lin(g(f"MAPHead_0/MlpBlock_0/{b}/kernel"))
        hf[f"vision_model.head.mlp.{a}.bias"] = g(f"MAPHead_0/MlpBlock_0/{b}/bias")
    hf["text_model.embeddings.token_embedding.weight"] = np.zeros((10, d), np.float32)
    hf["logit_scale"], hf["logit_bias"] = np.float32([2.3]), np.float32([-10.0])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}


# ----------------------------------------------------------------------------- NumPy reference

def np_layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def np_gelu(x):  # tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] bilinear antialiased resize (triangle kernel widened by n_in/n_out when shrinking)."""
    ratio = n_in / n_out
    width = max(ratio, 1.0)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * ratio - 0.5
        for i in range(n_in):
            m[o, i] = max(0.0, 1 - abs(centre - i) / width)
        m[o] /= m[o].sum()
    return m


def np_mha(xq, xkv, w, pre):
    """Attention with weights as math matrices: q = xq @ W[pre+'wq'] + b (out index = head*Dh + k)."""
    h = w["heads"]
    q, k, v = (x @ w[pre + n] + w[pre + "b" + n[1]] for x, n in ((xq, "wq"), (xkv, "wk"), (xkv, "wv")))
    dh = q.shape[-1] // h
    q, k, v = (t.reshape(t.shape[0], h, dh).transpose(1, 0, 2) for t in (q, k, v))  # [H, S, Dh]
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(1, 0, 2).reshape(xq.shape[0], -1)
    return out @ w[pre + "wo"] + w[pre + "bo"]


def np_forward(w: dict, patches, yx, valid) -> tuple[np.ndarray, np.ndarray]:
    """Per image, valid patches only: tokens [B, N, D] (zero at padding) and pooled [B, D]."""
    b, n, _ = patches.shape
    d = w["patch_w"].shape[1]
    tokens, pooled = np.zeros((b, n, d)), np.zeros((b, d))
    for i in range(b):
        idx = np.nonzero(valid[i])[0]
        ys, xs = yx[i, idx, 0], yx[i, idx, 1]
        gh, gw = ys.max() + 1, xs.max() + 1
        table = w["pos"]  # [g, g, D]
        pos = np.einsum("yi,xj,ijd->yxd", np_resize_matrix(gh, table.shape[0]),
                        np_resize_matrix(gw, table.shape[1]), table)
        x = patches[i, idx].astype(np.float64) @ w["patch_w"] + w["patch_b"] + pos[ys, xs]
        for lw in w["layers"]:
            lw = {**lw, "heads": w["heads"]}
            x = x + np_mha(*(2 * [np_layernorm(x, lw["ln1_s"], lw["ln1_b"])]), lw, "")
            x = x + np_gelu(np_layernorm(x, lw["ln2_s"], lw["ln2_b"]) @ lw["w1"] + lw["b1"]) @ lw["w2"] + lw["b2"]
        x = np_layernorm(x, w["norm_s"], w["norm_b"])
        tokens[i, idx] = x
        hw = {**w["head"], "heads": w["heads"]}
        y = np_mha(hw["probe"][None], x, hw, "")
        y = y + np_gelu(np_layernorm(y, hw["ln_s"], hw["ln_b"]) @ hw["w1"] + hw["b1"]) @ hw["w2"] + hw["b2"]
        pooled[i] = y[0]
    return tokens, pooled


def np_weights_big_vision(ck: dict, spec: SigLIP2Spec, scanned: bool = True) -> dict:
    """Flax semantics: Dense y = x @ kernel + bias; MHA kernels (D, H, Dh) / (H, Dh, D)."""
    d, p, g = spec.width, spec.patch_size, spec.posemb_grid
    def get(k):
        return ck["params/img/" + k].astype(np.float64)

    def mha(prefix, take):
        out = {}
        for n, s in (("query", "q"), ("key", "k"), ("value", "v")):
            out["w" + s] = take(f"{prefix}/{n}/kernel").reshape(d, d)
            out["b" + s] = take(f"{prefix}/{n}/bias").reshape(d)
        out["wo"], out["bo"] = take(f"{prefix}/out/kernel").reshape(d, d), take(f"{prefix}/out/bias")
        return out

    def mlp(prefix, take):
        return {"w1": take(f"{prefix}/Dense_0/kernel"), "b1": take(f"{prefix}/Dense_0/bias"),
                "w2": take(f"{prefix}/Dense_1/kernel"), "b2": take(f"{prefix}/Dense_1/bias")}

    layers = []
    for i in range(spec.depth):
        take = (lambda k, i=i: get(f"Transformer/encoderblock/{k}")[i]) if scanned else (
            lambda k, i=i: get(f"Transformer/encoderblock_{i}/{k}"))
        layers.append({"ln1_s": take("LayerNorm_0/scale"), "ln1_b": take("LayerNorm_0/bias"),
                       "ln2_s": take("LayerNorm_1/scale"), "ln2_b": take("LayerNorm_1/bias"),
                       **mha("MultiHeadDotProductAttention_0", take), **mlp("MlpBlock_0", take)})
    head = {"probe": get("MAPHead_0/probe").reshape(d), "ln_s": get("MAPHead_0/LayerNorm_0/scale"),
            "ln_b": get("MAPHead_0/LayerNorm_0/bias"), **mha("MAPHead_0/MultiHeadDotProductAttention_0", get),
            **mlp("MAPHead_0/MlpBlock_0", get)}
    return {"patch_w": get("embedding/kernel").reshape(p * p * 3, d),  # Conv (p,p,3,D) == Dense on (p,p,C)
            "patch_b": get("embedding/bias"), "pos": get("pos_embedding").reshape(g, g, d),
            "layers": layers, "norm_s": get("Transformer/encoder_norm/scale"),
            "norm_b": get("Transformer/encoder_norm/bias"), "head": head, "heads": spec.num_heads}


def np_weights_hf(ck: dict, spec: SigLIP2Spec) -> dict:
    """Torch semantics: Linear y = x @ W.T + b; Conv2d weight [D, C, ky, kx]; Embedding rows y*g+x."""
    d, p, g = spec.width, spec.patch_size, spec.posemb_grid
    def get(k):
        return ck["vision_model." + k].astype(np.float64)
    pw = get("embeddings.patch_embedding.weight")
    if spec.naflex:
        patch_w = pw.T  # Linear over patches flattened (p, p, C)
    else:  # a stride-p conv: patch element (ky, kx, c) sits at flat index (ky * p + kx) * 3 + c
        patch_w = np.zeros((p * p * 3, d))
        for ky in range(p):
            for kx in range(p):
                for c in range(3):
                    patch_w[(ky * p + kx) * 3 + c] = pw[:, c, ky, kx]
    layers = []
    for i in range(spec.depth):
        def t(k, i=i):
            return get(f"encoder.layers.{i}.{k}")
        lw = {"ln1_s": t("layer_norm1.weight"), "ln1_b": t("layer_norm1.bias"),
              "ln2_s": t("layer_norm2.weight"), "ln2_b": t("layer_norm2.bias"),
              "w1": t("mlp.fc1.weight").T, "b1": t("mlp.fc1.bias"),
              "w2": t("mlp.fc2.weight").T, "b2": t("mlp.fc2.bias"),
              "wo": t("self_attn.out_proj.weight").T, "bo": t("self_attn.out_proj.bias")}
        for s in "qkv":
            lw["w" + s], lw["b" + s] = t(f"self_attn.{s}_proj.weight").T, t(f"self_attn.{s}_proj.bias")
        layers.append(lw)
    ipw, ipb = get("head.attention.in_proj_weight"), get("head.attention.in_proj_bias")
    head = {"probe": get("head.probe").reshape(d), "ln_s": get("head.layernorm.weight"),
            "ln_b": get("head.layernorm.bias"), "wo": get("head.attention.out_proj.weight").T,
            "bo": get("head.attention.out_proj.bias"), "w1": get("head.mlp.fc1.weight").T,
            "b1": get("head.mlp.fc1.bias"), "w2": get("head.mlp.fc2.weight").T, "b2": get("head.mlp.fc2.bias")}
    for j, s in enumerate("qkv"):
        head["w" + s], head["b" + s] = ipw[j * d:(j + 1) * d].T, ipb[j * d:(j + 1) * d]
    return {"patch_w": patch_w, "patch_b": get("embeddings.patch_embedding.bias"),
            "pos": get("embeddings.position_embedding.weight").reshape(g, g, d), "layers": layers,
            "norm_s": get("post_layernorm.weight"), "norm_b": get("post_layernorm.bias"), "head": head,
            "heads": spec.num_heads}


# ----------------------------------------------------------------------------- inputs

def naflex_batch(spec: SigLIP2Spec, grids: list[tuple[int, int]], n: int, seed: int = 1):
    """Images with the given (h, w) grids, patches in shuffled order, padding filled with junk."""
    rng = np.random.default_rng(seed)
    b, pd = len(grids), spec.patch_dim
    patches = rng.uniform(-1, 1, (b, n, pd)).astype(np.float32)  # padding rows too: must not matter
    yx = rng.integers(0, 99, (b, n, 2)).astype(np.int32)
    valid = np.zeros((b, n), bool)
    for i, (h, w) in enumerate(grids):
        cells = np.stack(np.indices((h, w)), -1).reshape(-1, 2)
        cells = cells[rng.permutation(len(cells))] if i % 2 else cells
        yx[i, :len(cells)], valid[i, :len(cells)] = cells, True
    return patches, yx, valid


_forward = nnx.jit(lambda m, a, b, c: m(a, b, c))  # one trace per (spec, shapes)


def run(model, patches, yx, valid):
    out = _forward(model, jnp.asarray(patches), jnp.asarray(yx), jnp.asarray(valid))
    return np.asarray(out["tokens"], np.float64), np.asarray(out["pooled"], np.float64)


@pytest.fixture(scope="module")
def bv_naflex(tmp_path_factory):
    ck = make_big_vision(TINY, seed=0)
    path = tmp_path_factory.mktemp("siglip2") / "siglip2_tiny_naflex.npz"
    np.savez(path, **ck)
    return ck, path, load_siglip2_big_vision_npz(path, TINY)


NAFLEX_GRIDS, NAFLEX_N = [(3, 5), (6, 4), (2, 2)], 24  # padded, full (side > table), small


# ----------------------------------------------------------------------------- tests

def test_position_resize_matches_jax_image_resize():
    """The table resize (module and NumPy reference) is jax.image.resize(bilinear, antialias)."""
    table = np.random.default_rng(0).standard_normal((16, 16, 3)).astype(np.float32)
    resize = jax.jit(lambda t, h, w: jax.image.resize(t, (h, w, 3), "bilinear", antialias=True), static_argnums=(1, 2))
    weights = jax.jit(lambda idx, size: pos_weights(idx, size, 16))
    for h, w in [(3, 7), (16, 16), (20, 5), (1, 70)]:
        want = np.asarray(resize(table, h, w))
        ref = np.einsum("yi,xj,ijd->yxd", np_resize_matrix(h, 16), np_resize_matrix(w, 16), table)
        y, x = np.indices((h, w))
        wy, wx = weights(jnp.asarray(y), jnp.asarray(h)), weights(jnp.asarray(x), jnp.asarray(w))
        got = np.einsum("hwi,hwj,ijd->hwd", wy, wx, table)
        np.testing.assert_allclose(ref, want, atol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_big_vision_naflex_matches_numpy(bv_naflex):
    ck, _, model = bv_naflex
    batch = naflex_batch(TINY, NAFLEX_GRIDS, NAFLEX_N)
    tokens, pooled = run(model, *batch)
    ref_t, ref_p = np_forward(np_weights_big_vision(ck, TINY), *batch)
    np.testing.assert_allclose(tokens, ref_t, **TOL)
    np.testing.assert_allclose(pooled, ref_p, **TOL)
    assert np.all(tokens[~batch[2]] == 0)
    assert np.abs(ref_p).max() > 0.1 and np.abs(ref_t).max() > 0.5  # not a degenerate comparison


def test_big_vision_looped_layout_and_long_grid_side(tmp_path):
    """encoderblock_{i} keys load too; a grid side far beyond the table (1 x 70) works."""
    ck = make_big_vision(TINY, seed=3, scanned=False)
    np.savez(tmp_path / "looped.npz", **ck)
    model = load_siglip2_big_vision_npz(tmp_path / "looped.npz", TINY)
    batch = naflex_batch(TINY, [(1, 70)], 72)
    tokens, pooled = run(model, *batch)
    ref_t, ref_p = np_forward(np_weights_big_vision(ck, TINY, scanned=False), *batch)
    assert np.isfinite(tokens).all()
    np.testing.assert_allclose(tokens, ref_t, **TOL)
    np.testing.assert_allclose(pooled, ref_p, **TOL)
    # Filling an existing (randomly initialised) module in place gives the same tower.
    filled = SigLIP2(TINY, rngs=nnx.Rngs(7))
    assert load_siglip2_big_vision_npz(tmp_path / "looped.npz", TINY, module=filled) is filled
    np.testing.assert_array_equal(run(filled, *batch)[1], pooled)


def test_hf_naflex_matches_numpy_and_big_vision(tmp_path, bv_naflex):
    ck, _, bv_model = bv_naflex
    hf = big_vision_to_hf(ck, TINY)
    assert {k for k in hf if k.startswith("vision_model.")} == set(expected_hf_keys(TINY))
    save_file(hf, str(tmp_path / "model.safetensors"))
    model = load_siglip2_hf_safetensors(tmp_path / "model.safetensors", TINY)
    batch = naflex_batch(TINY, NAFLEX_GRIDS, NAFLEX_N)
    tokens, pooled = run(model, *batch)
    ref_t, ref_p = np_forward(np_weights_hf(hf, TINY), *batch)
    np.testing.assert_allclose(tokens, ref_t, **TOL)
    np.testing.assert_allclose(pooled, ref_p, **TOL)
    bv_t, bv_p = run(bv_model, *batch)  # same weights in the other format: same outputs
    np.testing.assert_allclose(tokens, bv_t, atol=1e-6)
    np.testing.assert_allclose(pooled, bv_p, atol=1e-6)
    # bfloat16 tensors (read as numpy through ml_dtypes) load as their float32 values.
    hf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf.items()}
    save_file(hf16, str(tmp_path / "bf16.safetensors"))
    m16 = load_siglip2_hf_safetensors(tmp_path / "bf16.safetensors", TINY)
    np.testing.assert_array_equal(np.asarray(m16.head.mlp.fc2[...]),
                                  hf16["vision_model.head.mlp.fc2.weight"].astype(np.float32).T)


@pytest.mark.parametrize("fmt", ["big_vision", "hf"])
def test_fixed_resolution_checkpoint(tmp_path, fmt):
    """Conv patch kernel and (1, N, D) / (N, D) table; native grid reads the table as is."""
    spec = siglip2_spec("tiny", naflex=False, image_size=16)  # 4x4 grid of 4-px patches
    ck = make_big_vision(spec, seed=5)
    if fmt == "big_vision":
        np.savez(tmp_path / "fixed.npz", **ck)
        model = load_siglip2_big_vision_npz(tmp_path / "fixed.npz", spec)
        weights = np_weights_big_vision(ck, spec)
    else:
        hf = big_vision_to_hf(ck, spec)
        assert hf["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 4, 4)
        save_file(hf, str(tmp_path / "model.safetensors"))
        model = load_siglip2_hf_safetensors(tmp_path, spec)  # a folder of shards works too
        weights = np_weights_hf(hf, spec)
    # Native 4x4 grid in raster order, and a 3x6 grid (table resized) with padding.
    batch = naflex_batch(spec, [(4, 4), (3, 6)], 20, seed=2)
    tokens, pooled = run(model, *batch)
    ref_t, ref_p = np_forward(weights, *batch)
    np.testing.assert_allclose(tokens, ref_t, **TOL)
    np.testing.assert_allclose(pooled, ref_p, **TOL)
    # At the native grid the position of patch (y, x) is row y*g + x of the stored table.
    _, yx, valid = batch
    m_pos = np.asarray(model.position_embeddings(jnp.asarray(yx), jnp.asarray(valid)))
    rows = yx[0, :16, 0] * 4 + yx[0, :16, 1]
    np.testing.assert_array_equal(m_pos[0, :16], ck["params/img/pos_embedding"][0, rows])


def test_padding_never_affects_valid_outputs(bv_naflex):
    _, _, model = bv_naflex
    p, yx, valid = naflex_batch(TINY, NAFLEX_GRIDS, NAFLEX_N, seed=1)
    t1, p1 = run(model, p, yx, valid)
    rng = np.random.default_rng(9)
    p2, yx2 = p.copy(), yx.copy()
    p2[~valid] = rng.uniform(-50, 50, p2[~valid].shape)
    yx2[~valid] = rng.integers(0, 500, yx2[~valid].shape)
    t2, p2_ = run(model, p2, yx2, valid)
    np.testing.assert_allclose(t2, t1, atol=1e-6)
    np.testing.assert_allclose(p2_, p1, atol=1e-6)
    # More padding (longer sequence) changes nothing either.
    extra = 8
    t3, p3 = run(model, np.pad(p, ((0, 0), (0, extra), (0, 0)), constant_values=3.0),
                 np.pad(yx, ((0, 0), (0, extra), (0, 0))), np.pad(valid, ((0, 0), (0, extra))))
    np.testing.assert_allclose(t3[:, :NAFLEX_N], t1, atol=1e-5)
    np.testing.assert_allclose(p3, p1, atol=1e-5)
    assert np.all(t2[~valid] == 0) and np.all(t3[:, NAFLEX_N:] == 0)
    # A row that is all padding (a filler image) stays finite and leaves the others alone.
    t4, p4 = run(model, p, yx, np.concatenate([valid[:2], np.zeros_like(valid[2:])]))
    assert np.isfinite(p4).all() and np.all(t4[2] == 0)
    np.testing.assert_allclose(t4[:2], t1[:2], atol=1e-6)


def test_bfloat16_compute_stays_close(bv_naflex):
    _, path, model = bv_naflex
    """bfloat16 matmuls (float32 parameters, residual stream and outputs) stay within a few percent."""
    _, path, model = bv_naflex
    spec16 = dataclasses.replace(TINY, dtype="bfloat16")
    assert spec16.dtype == jnp.bfloat16
    model16 = load_siglip2_big_vision_npz(path, spec16)
    assert model16.patch_embed[...].dtype == jnp.float32
    batch = naflex_batch(TINY, NAFLEX_GRIDS, NAFLEX_N)
    out = _forward(model16, *map(jnp.asarray, batch))
    assert out["tokens"].dtype == jnp.float32 and out["pooled"].dtype == jnp.float32
    t16, p16 = np.asarray(out["tokens"], np.float64), np.asarray(out["pooled"], np.float64)
    t32, p32 = run(model, *batch)
    assert np.isfinite(t16).all() and np.all(t16[~batch[2]] == 0)
    assert np.abs(t16 - t32).max() < 0.05 * np.abs(t32).max()
    assert np.abs(p16 - p32).max() < 0.05 * np.abs(p32).max()
    assert np.abs(t16 - t32).max() > 0  # bfloat16 really was used


def test_missing_unexpected_and_misshapen_keys_raise(tmp_path):
    ck = make_big_vision(TINY, seed=0)
    key = "params/img/MAPHead_0/LayerNorm_0/scale"
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in ck.items() if k != key})
    with pytest.raises(SigLIP2CheckpointError, match="missing key") as e:
        load_siglip2_big_vision_npz(tmp_path / "missing.npz", TINY)
    assert key in str(e.value) and "(32,)" in str(e.value)

    key = "params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    bad = {**ck, key: ck[key][:, :, :60]}
    np.savez(tmp_path / "shape.npz", **bad)
    with pytest.raises(SigLIP2CheckpointError, match="wrong shape") as e:
        load_siglip2_big_vision_npz(tmp_path / "shape.npz", TINY)
    assert f"{key}: expected shape (2, 32, 64), found (2, 32, 60)" in str(e.value)

    extra = "params/img/Transformer/encoderblock/LayerNorm_2/scale"
    np.savez(tmp_path / "extra.npz", **{**ck, extra: np.ones((2, 32), np.float32)})
    with pytest.raises(SigLIP2CheckpointError, match="unexpected key") as e:
        load_siglip2_big_vision_npz(tmp_path / "extra.npz", TINY)
    assert extra in str(e.value)

    hf = big_vision_to_hf(ck, TINY)
    key = "vision_model.head.attention.in_proj_weight"
    save_file({**hf, key: hf[key][:64]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SigLIP2CheckpointError) as e:
        load_siglip2_hf_safetensors(tmp_path / "bad.safetensors", TINY)
    assert f"{key}: expected shape (96, 32), found (64, 32)" in str(e.value)
    key = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in hf.items() if k != key}, str(tmp_path / "miss.safetensors"))
    with pytest.raises(SigLIP2CheckpointError, match="missing key") as e:
        load_siglip2_hf_safetensors(tmp_path / "miss.safetensors", TINY)
    assert key in str(e.value)
    with pytest.raises(SigLIP2CheckpointError, match="wrong shape"):  # a spec that does not fit the file
        load_siglip2_hf_safetensors(tmp_path / "miss.safetensors", dataclasses.replace(TINY, mlp_dim=48))

    # A fixed-resolution file read with a NaFlex spec: the error says which knob to turn.
    np.savez(tmp_path / "fixed.npz", **make_big_vision(siglip2_spec("tiny", naflex=False, image_size=20)))
    with pytest.raises(SigLIP2CheckpointError, match="naflex=") as e:
        load_siglip2_big_vision_npz(tmp_path / "fixed.npz", TINY)
    assert "params/img/embedding/kernel: expected shape (48, 32), found (4, 4, 3, 32)" in str(e.value)
    assert "params/img/pos_embedding: expected shape (4, 4, 32), found (1, 25, 32)" in str(e.value)


# Published shapes: width D, depth L, MLP M, heads H (head_dim D/H), 16-px patches.
VARIANTS = {"B/16": (768, 12, 3072, 12), "L/16": (1024, 24, 4096, 16), "So400m/16": (1152, 27, 4304, 16)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("naflex", [True, False])
def test_expected_key_sets_per_variant(variant, naflex):
    """Full key sets per format; the converters' output matches the module's parameters (abstractly)."""
    d, depth, m, h = VARIANTS[variant]
    spec = siglip2_spec(variant, naflex=naflex, image_size=None if naflex else 384)
    g = 16 if naflex else 24
    bv, bv_loop, hf = (expected_big_vision_keys(spec), expected_big_vision_keys(spec, scanned=False),
                       expected_hf_keys(spec))
    # 3 embedding + 2 encoder_norm + 15 MAP head + 16 per block (scanned: once, stacked).
    assert len(bv) == 36 and len(bv_loop) == 20 + 16 * depth and len(hf) == 16 + 16 * depth
    px = "params/img/"
    assert bv[px + "embedding/kernel"] == ((768, d) if naflex else (16, 16, 3, d))
    assert bv[px + "pos_embedding"] == ((16, 16, d) if naflex else (1, g * g, d))
    assert bv[px + "Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (depth, d, h, d // h)
    assert bv[px + "Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"] == (depth, h, d // h, d)
    assert bv[px + "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (depth, d, m)
    assert bv_loop[px + f"Transformer/encoderblock_{depth - 1}/MlpBlock_0/Dense_1/kernel"] == (m, d)
    assert bv[px + "MAPHead_0/probe"] == (1, 1, d) and bv[px + "MAPHead_0/MlpBlock_0/Dense_0/kernel"] == (d, m)
    assert all(k.startswith(px) for k in bv)
    vm = "vision_model."
    assert hf[vm + "embeddings.patch_embedding.weight"] == ((d, 768) if naflex else (d, 3, 16, 16))
    assert hf[vm + "embeddings.position_embedding.weight"] == (g * g, d)
    assert hf[vm + f"encoder.layers.{depth - 1}.self_attn.q_proj.weight"] == (d, d)
    assert hf[vm + "encoder.layers.0.mlp.fc1.weight"] == (m, d)
    assert hf[vm + "head.attention.in_proj_weight"] == (3 * d, d) and hf[vm + "head.attention.in_proj_bias"] == (3 * d,)
    assert hf[vm + "head.probe"] == (1, 1, d) and hf[vm + "post_layernorm.weight"] == (d,)
    assert f"{vm}encoder.layers.{depth}.layer_norm1.weight" not in hf
    # The converters, run on shapes only, give exactly the module's parameters.
    module = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract_siglip2(spec)))}
    assert sum(math.prod(s) for s in module.values()) == sum(math.prod(s) for s in hf.values())
    for fmt, scanned in (("big_vision", True), ("big_vision", False), ("hf", True)):
        assert converted_shapes(spec, fmt, scanned=scanned) == module, (fmt, scanned)


def test_variant_registry_and_spec_checks():
    assert {"tiny", "B/16", "L/16", "So400m/16"} <= set(SIGLIP2_VARIANTS)
    for name, (d, depth, m, h) in VARIANTS.items():
        s = SIGLIP2_VARIANTS[name]
        assert (s.width, s.depth, s.mlp_dim, s.num_heads, s.patch_size, s.posemb_grid, s.naflex) == (
            d, depth, m, h, 16, 16, True)
    assert siglip2_spec("So400m/16", naflex=False, image_size=512).posemb_grid == 32
    with pytest.raises(ValueError, match="image_size"):
        siglip2_spec("B/16", naflex=False)
    with pytest.raises(ValueError, match="num_heads"):
        SigLIP2Spec(width=30, depth=1, mlp_dim=8, num_heads=4)
