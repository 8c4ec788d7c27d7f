"""Tests for the pure-jnp references (glm5v_jax.kernels.reference) and the Attention layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax import kernels
from glm5v_jax.layers.attention import Attention, get_attention_impl

# Jitted once per shape: fewer compiles than running every op eagerly.
attention_reference = jax.jit(kernels.attention_reference, static_argnames=("causal", "return_probs"))
gmm_reference = jax.jit(kernels.gmm_reference)

B, S, H, KV, D = 2, 7, 4, 2, 8
# Row 0: two documents then padding; row 1: three documents, no padding.
SEG = np.array([[1, 1, 1, 2, 2, 0, 0],
                [1, 1, 2, 2, 2, 2, 3]], np.int32)


def _naive_attention(q, k, v, *, causal, q_seg=None, kv_seg=None, scale=None):
    """Explicit loops: per (batch, head, query) softmax over the visible keys (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, s, h, d))
    probs = np.zeros((b, h, s, t))
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // kvh)
            for si in range(s):
                visible = []
                for ti in range(t):
                    ok = True
                    if causal and ti > si:
                        ok = False
                    if q_seg is not None and (q_seg[bi, si] == 0 or q_seg[bi, si] != kv_seg[bi, ti]):
                        ok = False
                    if ok:
                        visible.append(ti)
                if not visible:
                    continue
                logits = np.array([q[bi, si, hi] @ k[bi, ti, g] for ti in visible]) * scale
                p = np.exp(logits - logits.max())
                p /= p.sum()
                for pi, ti in zip(p, visible):
                    probs[bi, hi, si, ti] = pi
                    out[bi, si, hi] += pi * v[bi, ti, g]
    return out, probs


def _qkv(seed, s=S, t=S, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, s, H, D)).astype(dtype)
    k = rng.standard_normal((B, t, KV, D)).astype(dtype)
    v = rng.standard_normal((B, t, KV, D)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_attention_reference_matches_naive_loops(causal, segments):
    """attention_reference (GQA, causal on/off, segments on/off) equals explicit NumPy loops in f32."""
    q, k, v = _qkv(0)
    seg = jnp.asarray(SEG) if segments else None
    out, probs = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                                     q_segment_ids=seg, kv_segment_ids=seg, return_probs=True)
    ref_out, ref_probs = _naive_attention(q, k, v, causal=causal,
                                          q_seg=SEG if segments else None,
                                          kv_seg=SEG if segments else None)
    assert out.dtype == jnp.float32 and out.shape == (B, S, H, D)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), ref_probs, rtol=1e-5, atol=1e-6)


def test_attention_reference_segments_and_padding_are_isolated():
    """Padding query rows are exactly 0; probs are exactly 0 across segments and on padding keys."""
    q, k, v = _qkv(1)
    seg = jnp.asarray(SEG)
    for causal in (False, True):
        out, probs = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                                         return_probs=True)
        out, probs = np.asarray(out), np.asarray(probs)
        pad = SEG == 0
        assert np.all(out[pad] == 0.0)
        assert np.all(probs.transpose(0, 2, 1, 3)[pad] == 0.0)  # padding query rows
        forbidden = (SEG[:, :, None] != SEG[:, None, :]) | pad[:, None, :]  # [B, S, T]
        assert np.all(probs[np.broadcast_to(forbidden[:, None], probs.shape)] == 0.0)
        if causal:
            future = np.triu(np.ones((S, S), bool), 1)
            assert np.all(probs[..., future] == 0.0)
        # Every real query's probabilities sum to one.
        row_sums = probs.transpose(0, 2, 1, 3).sum(-1)  # [B, S, H]
        np.testing.assert_allclose(row_sums[~pad], 1.0, rtol=1e-6)
        # Changing a token of one document leaves the other documents' outputs unchanged.
        k2, v2 = k.copy(), v.copy()
        k2[0, 3] += 5.0
        v2[0, 3] -= 3.0  # row 0, document 2
        out2 = np.asarray(attention_reference(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2),
                                              causal=causal, q_segment_ids=seg, kv_segment_ids=seg))
        np.testing.assert_array_equal(out2[0, :3], out[0, :3])
        np.testing.assert_array_equal(out2[1], out[1])
        assert not np.allclose(out2[0, 3:5], out[0, 3:5])


def test_attention_reference_cross_lengths_and_scale():
    """S != T without masks, with an explicit scale, matches the naive loops."""
    q, k, v = _qkv(2, s=3, t=6)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3)
    ref, _ = _naive_attention(q, k, v, causal=False, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_attention_reference_bf16():
    """bf16 inputs: output is bf16 and close (2e-2) to the f64 loops on the same bf16 values."""
    q, k, v = _qkv(3)
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    seg = jnp.asarray(SEG)
    out = attention_reference(qb, kb, vb, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert out.dtype == jnp.bfloat16
    ref, _ = _naive_attention(*(np.asarray(a.astype(jnp.float32)) for a in (qb, kb, vb)),
                              causal=True, q_seg=SEG, kv_seg=SEG)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2e-2, atol=2e-2)


def test_attention_reference_rejects_bad_gqa():
    """Query heads that are not a multiple of the K/V heads raise ValueError."""
    q = jnp.zeros((1, 2, 3, 4))
    k = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError):
        kernels.attention_reference(q, k, k)


@pytest.mark.parametrize("sizes,m", [
    ([3, 0, 5, 2], 10),     # empty group, sizes sum to m
    ([4, 0, 1, 3], 13),     # sum 8 < m: 5 tail rows are zero
    ([0, 0, 7, 0], 7),      # one non-empty group in the middle
])
def test_gmm_reference_matches_group_loop(sizes, m):
    """gmm_reference equals a NumPy loop over groups; rows past sum(sizes) are zero."""
    rng = np.random.default_rng(sum(sizes) + m)
    kdim, n = 5, 3
    lhs = rng.standard_normal((m, kdim)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), kdim, n)).astype(np.float32)
    out = np.asarray(gmm_reference(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32)))
    ref = np.zeros((m, n))
    start = 0
    for g, size in enumerate(sizes):
        for r in range(start, start + size):
            ref[r] = lhs[r].astype(np.float64) @ rhs[g].astype(np.float64)
        start += size
    assert out.shape == (m, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(out[sum(sizes):] == 0.0)


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_attention_layer_qknorm_bias_matches_numpy():
    """Attention(qk_norm, qkv_bias), no rope, causal + segments, equals a NumPy re-implementation."""
    e = 12
    # Built abstractly, then every parameter gets non-trivial values (biases would start
    # at 0 and norm scales at 1).
    layer = nnx.eval_shape(lambda: Attention(e, H, KV, D, qkv_bias=True, qk_norm=True,
                                             norm_eps=1e-5, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(5)
    names = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
    for name in names:
        var = getattr(layer, name)
        var.set_value(jnp.asarray(rng.standard_normal(var.shape).astype(np.float32) * 0.5))
    x = rng.standard_normal((B, S, e)).astype(np.float32)
    fwd = nnx.jit(lambda m, xs, seg: m(xs, segment_ids=seg, causal=True))
    out = np.asarray(fwd(layer, jnp.asarray(x), jnp.asarray(SEG)))

    p = {n: np.asarray(getattr(layer, n)[...], np.float64) for n in names}
    x64 = x.astype(np.float64)
    q = np.einsum("bse,ehd->bshd", x64, p["q"]) + p["q_bias"]
    k = np.einsum("bse,ehd->bshd", x64, p["k"]) + p["k_bias"]
    v = np.einsum("bse,ehd->bshd", x64, p["v"]) + p["v_bias"]
    q = _np_rms(q, p["q_norm"], layer.norm_eps)
    k = _np_rms(k, p["k_norm"], layer.norm_eps)
    att, _ = _naive_attention(q, k, v, causal=True, q_seg=SEG, kv_seg=SEG, scale=D ** -0.5)
    ref = np.einsum("bshd,hde->bse", att, p["o"])
    assert out.shape == (B, S, e)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert np.all(out[SEG == 0] == 0.0)


def test_attention_unknown_impl_raises():
    """An unknown attention impl name raises ValueError (at construction and on lookup)."""
    with pytest.raises(ValueError):
        Attention(8, 2, 1, 4, impl="no_such_impl", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        get_attention_impl("no_such_impl")
