"""Tests for the Pallas Triton flash attention (glm5v_jax.kernels.flash_attention_gpu), CPU only.

Correctness runs in interpret mode against the pure-jnp reference (forward and the VJP
in q, k, v); the Triton rules interpret mode ignores are checked by lowering for CUDA.
The case matrix covers each factor (ragged S/T, GQA 1/2/4/8, packed segments with a
padded tail, causal or not, D 64/96/128, f32/bf16, test-sized and default blocks)
without taking their product, to stay fast on a 2-core CI.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.kernels.attention_common import BlockSizes
from glm5v_jax.kernels.flash_attention_gpu import flash_attention_gpu
from glm5v_jax.kernels.reference import attention_reference

from helpers import lower_text, rel_err

TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Case:
    s: int
    t: int
    h: int
    kv: int
    d: int
    causal: bool
    segments: bool
    dtype: str
    blocks: BlockSizes | None  # None: the kernel's defaults
    scale: float | None = None


SMALL = BlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=32)
CASES = {
    "g1_causal_seg_f32": Case(100, 100, 4, 4, 64, True, True, "float32", SMALL),
    "g2_seg_d128_f32": Case(77, 77, 4, 2, 128, False, True, "float32", BlockSizes(16, 32, 32, 16)),
    "g4_causal_padonly_f32": Case(130, 130, 8, 2, 64, True, False, "float32", BlockSizes(64, 32)),
    "g8_dense_aligned_d128_f32": Case(64, 64, 8, 1, 128, False, False, "float32", SMALL, 0.3),
    "g2_cross_causal_seg_d96_f32": Case(50, 120, 2, 1, 96, True, True, "float32", SMALL),
    "g4_causal_seg_bf16_defaults": Case(200, 200, 4, 1, 64, True, True, "bfloat16", None),
    "g2_cross_seg_d128_bf16": Case(90, 150, 2, 1, 128, False, True, "bfloat16", SMALL),
}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _segments(rng, length: int, ids: tuple[int, ...]) -> np.ndarray:
    """[B=2, length] packed segments `ids` in random lengths, then a padded tail of zeros."""
    rows = []
    for _ in range(2):
        cuts = np.sort(rng.choice(np.arange(1, length - 4), len(ids), replace=False))
        row = np.zeros(length, np.int32)
        starts = np.concatenate([[0], cuts[:-1]])
        for seg, lo, hi in zip(ids, starts, cuts):
            row[lo:hi] = seg
        rows.append(row)  # ends with >= 4 padding positions
    return np.stack(rows)


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((2, case.s, case.h, case.d)), dtype)
    k = jnp.asarray(rng.standard_normal((2, case.t, case.kv, case.d)), dtype)
    v = jnp.asarray(rng.standard_normal((2, case.t, case.kv, case.d)), dtype)
    ct = jnp.asarray(rng.standard_normal(q.shape), dtype)
    if not case.segments:
        return q, k, v, ct, None, None
    # Cross attention (S != T): the queries also carry a segment (3) no key has.
    q_ids = (1, 2, 3) if case.s != case.t else (1, 2)
    return q, k, v, ct, jnp.asarray(_segments(rng, case.s, q_ids)), jnp.asarray(_segments(rng, case.t, (1, 2)))


def _out_and_grads(attn, q, k, v, ct, qs, ks):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, q_segment_ids=qs, kv_segment_ids=ks), q, k, v)
    return (out, *vjp(ct))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    case = CASES[name]
    q, k, v, ct, qs, ks = _inputs(case)
    flash = functools.partial(flash_attention_gpu, causal=case.causal, scale=case.scale,
                              block_sizes=case.blocks, interpret=True)
    ref = functools.partial(attention_reference, causal=case.causal, scale=case.scale)
    kernel = jax.jit(functools.partial(_out_and_grads, flash))
    reference = jax.jit(functools.partial(_out_and_grads, ref))
    got = kernel(q, k, v, ct, qs, ks)
    # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
    want = reference(*(x.astype(jnp.float32) for x in (q, k, v, ct)), qs, ks)
    for label, x, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == q.dtype and x.shape == w.shape, label
        assert rel_err(x, w) <= TOL[case.dtype], (label, rel_err(x, w))
    if qs is not None:  # rows that see no key: padding, and segment 3 in cross attention
        blind = np.asarray((qs == 0) | ~jnp.any(qs[:, :, None] == ks[:, None, :], axis=-1))
        assert blind.any()
        out, dq = np.asarray(got[0]), np.asarray(got[1])
        assert not np.any(out[blind]) and not np.any(dq[blind])


def _lowered_text(fn, *args) -> str:
    return lower_text(fn, args, "cuda")  # an abstract H100 target; the 0.11 Triton warning silenced


def test_lowers_for_cuda_at_default_blocks():
    b, s, h, kv, d = 1, 300, 8, 2, 128
    q = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, s, kv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, s), jnp.int32)

    def fwd(q, k, v, qs, ks):
        return flash_attention_gpu(q, k, v, causal=True, q_segment_ids=qs, kv_segment_ids=ks)

    def grad(q, k, v, qs, ks):
        return jax.grad(lambda *x: fwd(*x, qs, ks).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    assert _lowered_text(fwd, q, k, k, seg, seg).count(TRITON_CALL) == 1
    assert _lowered_text(grad, q, k, k, seg, seg).count(TRITON_CALL) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("blocks", [
    BlockSizes(block_q=96, block_k=64),
    BlockSizes(block_q=64, block_k=8),
    BlockSizes(block_q=64, block_k=64, block_q_bwd=48),
])
def test_illegal_block_sizes_raise(blocks):
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_sizes"):
        flash_attention_gpu(q, q, q, block_sizes=blocks, interpret=True)
