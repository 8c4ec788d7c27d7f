"""The TPU flash-attention kernel against the pure-jnp reference (interpret mode on CPU),
under the TPU-semantics interpreter with race detection, lowered and Mosaic-compiled for
TPU, and the public `flash_attention` dispatcher."""
from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.kernels import flash_attention
from glm5v_jax.kernels.attention_common import BlockSizes, block_visibility, visible_ranges
from glm5v_jax.kernels.flash_attention_tpu import flash_attention_tpu, plan_axis
from glm5v_jax.kernels.reference import attention_reference
from glm5v_jax.tools.aot import libtpu_available, topology_devices

from helpers import lower_text, rel_err

B128 = BlockSizes(128, 128, 128, 128)


def packed_segments(rng: np.random.Generator, batch: int, length: int, n_segments: int, pad: int) -> np.ndarray:
    """Rows of `n_segments` consecutive documents (ids 1..n) and `pad` trailing zeros."""
    seg = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length - pad - b  # rows differ in their padding
        cuts = np.sort(rng.choice(np.arange(1, used), n_segments - 1, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used])):
            seg[b, lo:hi] = i + 1
    return seg


@dataclasses.dataclass(frozen=True)
class Case:
    s: int
    t: int
    heads: int
    kv_heads: int
    d: int
    causal: bool
    segments: int  # 0 = no segment ids
    pad: int
    dtype: str
    blocks: BlockSizes | None = B128


# A compact matrix: every factor (S, T off the block grid; GQA 1/2/4/8; 2-3 packed segments;
# padded tails; causal or not; D 64/128; f32/bf16; default and unequal backward blocks) appears.
CASES = [
    Case(200, 200, 4, 2, 64, True, 3, 9, "float32"),
    Case(300, 300, 8, 1, 128, False, 2, 20, "float32"),
    Case(256, 256, 2, 2, 64, True, 0, 0, "float32", None),
    Case(136, 264, 4, 1, 128, False, 3, 5, "float32"),
    Case(384, 384, 2, 1, 64, True, 3, 30, "float32", BlockSizes(128, 256, 256, 128)),
    Case(200, 200, 4, 1, 128, True, 2, 11, "bfloat16"),
    Case(300, 300, 4, 2, 64, False, 0, 0, "bfloat16"),
    Case(130, 130, 8, 1, 64, True, 3, 3, "bfloat16"),
]


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((2, case.s, case.heads, case.d)), dt)
    k = jnp.asarray(rng.standard_normal((2, case.t, case.kv_heads, case.d)), dt)
    v = jnp.asarray(rng.standard_normal((2, case.t, case.kv_heads, case.d)), dt)
    do = jnp.asarray(rng.standard_normal((2, case.s, case.heads, case.d)), dt)
    seg = {}
    if case.segments:
        qs = packed_segments(rng, 2, case.s, case.segments, case.pad)
        ks = qs if case.t == case.s else packed_segments(rng, 2, case.t, case.segments, case.pad)
        seg = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
    return (q, k, v, do), seg


def kernel_and_reference(case: Case, fn=flash_attention_tpu, **kernel_kw):
    (q, k, v, do), seg = make_inputs(case)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def kernel(q, k, v):
        return fn(q, k, v, causal=case.causal, block_sizes=case.blocks, **seg, **kernel_kw)

    def reference(q, k, v):
        return attention_reference(f32(q), f32(k), f32(v), causal=case.causal, **seg)

    out, vjp = jax.jit(lambda *a: jax.vjp(kernel, *a))(q, k, v)
    ref, ref_vjp = jax.vjp(reference, q, k, v)
    return (out, *vjp(do)), (ref, *ref_vjp(f32(do))), seg


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c.s}T{c.t}H{c.heads}KV{c.kv_heads}D{c.d}"
                         f"{'causal' if c.causal else 'full'}seg{c.segments}{c.dtype}")
def test_matches_reference(case):
    got, want, seg = kernel_and_reference(case, interpret=True)
    tol = 1e-5 if case.dtype == "float32" else 2e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.dtype(case.dtype)
        assert rel_err(g, w) <= tol, (name, rel_err(g, w))
    if seg:  # padding query rows: zero output and no gradient; padding keys: no gradient
        pad_q = np.asarray(seg["q_segment_ids"]) == 0
        pad_k = np.asarray(seg["kv_segment_ids"]) == 0
        assert np.all(np.asarray(got[0])[pad_q] == 0) and np.all(np.asarray(got[1])[pad_q] == 0)
        assert np.all(np.asarray(got[2])[pad_k] == 0) and np.all(np.asarray(got[3])[pad_k] == 0)


def test_block_skipping_ranges():
    """Causal + packed rows: each q block visits exactly the kv blocks that hold visible keys."""
    seg = np.zeros((1, 512), np.int32)
    seg[0, :200], seg[0, 200:450] = 1, 2  # 62 padding positions
    vis = block_visibility(jnp.asarray(seg), jnp.asarray(seg), batch=1, q_pad=512, kv_pad=512,
                           block_q=128, block_k=128, causal=True)
    lo, hi = visible_ranges(vis)
    # q block 0 (rows 0-127, doc 1) sees kv block 0; block 1 (docs 1, 2) sees 0-1;
    # block 2 (doc 2) sees 1-2 (doc 2 starts in kv block 1); block 3 (doc 2 + pad) sees 1-3.
    assert lo.tolist() == [[0, 0, 1, 1]] and hi.tolist() == [[0, 1, 2, 3]]
    all_pad = block_visibility(jnp.zeros((1, 256), jnp.int32), jnp.zeros((1, 256), jnp.int32), batch=1,
                               q_pad=256, kv_pad=256, block_q=128, block_k=128, causal=False)
    lo, hi = visible_ranges(all_pad)
    assert np.all(np.asarray(hi) < np.asarray(lo))  # nothing to visit


def test_rows_without_visible_keys_are_zero_and_finite():
    """Cross attention where one q segment has no matching key segment."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 64, 2, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 32, 1, 64)), jnp.float32)
    qs = jnp.asarray(np.r_[np.ones(32), np.full(32, 2)][None], jnp.int32)
    ks = jnp.ones((1, 32), jnp.int32)

    def loss(q, k):
        return flash_attention_tpu(q, k, k, q_segment_ids=qs, kv_segment_ids=ks, interpret=True).sum()

    out = flash_attention_tpu(q, k, k, q_segment_ids=qs, kv_segment_ids=ks, interpret=True)
    dq, dk = jax.grad(loss, argnums=(0, 1))(q, k)
    assert np.all(np.asarray(out)[0, 32:] == 0) and np.all(np.asarray(dq)[0, 32:] == 0)
    assert np.all(np.isfinite(np.asarray(dk)))


def test_no_races_under_tpu_interpreter():
    """The TPU-semantics interpreter (two cores sharing the "parallel" axes) sees no races."""
    from jax.experimental.pallas import tpu as pltpu

    state = importlib.import_module("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    case = Case(256, 256, 2, 1, 64, True, 2, 10, "float32")
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    pltpu.reset_tpu_interpret_mode_state()
    try:
        got, want, _ = kernel_and_reference(case, interpret=params)
        assert state.races is not None and not state.races.races_found
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_illegal_block_sizes_are_refused_before_lowering():
    q = jnp.zeros((1, 1000, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"block_sizes.block_q=64 .*multiple of 128"):
        flash_attention_tpu(q, q, q, block_sizes=BlockSizes(64, 128))
    with pytest.raises(ValueError, match=r"block_sizes.block_k=200"):
        flash_attention_tpu(q, q, q, block_sizes=BlockSizes(128, 200))
    # A block longer than the row covers it whole, whatever its size.
    assert plan_axis("block_q", 40, (64, 512)) == (40, (40, 40))
    assert plan_axis("block_q", 300, (512, 128)) == (384, (384, 128))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention_tpu(q, q[:, :, :1].repeat(3, 2), q[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="given together"):
        flash_attention_tpu(q, q, q, q_segment_ids=jnp.ones((1, 1000), jnp.int32))


def _grad_fn(causal=True):
    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
        return out.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_one_function_lowers_to_each_backends_kernel(platform, marker):
    """The dispatcher, lowered for TPU or CUDA (no hardware) at the default blocks: one kernel
    call forward, three with the backward (forward, dq, dk/dv)."""
    q = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 1, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    def fwd(q, k, v, s):
        return flash_attention(q, k, v, causal=True, q_segment_ids=s, kv_segment_ids=s)

    assert lower_text(fwd, (q, kv, kv, seg), platform).count(marker) == 1
    assert lower_text(_grad_fn(), (q, kv, kv, seg), platform).count(marker) == 3


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_mosaic_compiles_for_v5p():
    """The full TPU compiler (Mosaic included) accepts the kernels at default blocks, D=128 and 64."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(topology_devices("v5p:2x2x1")[:1]), ("x",))
    rep = NamedSharding(mesh, P())
    for s, d in ((2048, 128), (200, 64)):
        q = jax.ShapeDtypeStruct((1, s, 8, d), jnp.bfloat16, sharding=rep)
        kv = jax.ShapeDtypeStruct((1, s, 2, d), jnp.bfloat16, sharding=rep)
        seg = jax.ShapeDtypeStruct((1, s), jnp.int32, sharding=rep)
        compiled = jax.jit(_grad_fn()).lower(q, kv, kv, seg).compile()
        assert compiled.memory_analysis() is not None


def test_dispatcher_on_cpu_runs_the_interpreted_kernel():
    case = Case(200, 200, 4, 2, 64, True, 2, 7, "float32")
    got, want, _ = kernel_and_reference(case, fn=flash_attention)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    with pytest.raises(ValueError, match="backend"):
        flash_attention(*make_inputs(case)[0][:3], backend="rocm")
