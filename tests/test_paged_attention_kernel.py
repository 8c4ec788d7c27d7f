"""`glm5v_jax.kernels.paged_attention`: jax's Pallas TPU decode kernel over the paged KV cache, tested
on CPU against `paged_attention_reference`, the dispatcher's fallbacks, and the attention layer's
cached path.

* HLO interpreter (`interpret=True`): random page tables (permuted pages, garbage entries past a
  row's pages), mixed lengths (0, one token, mid-page, a full row), causal cuts, f32 and bf16 caches,
  GQA ratios 1, 4 and 8; one jit per case serves several tables (they are traced).
  The kernel rounds K and V to bfloat16 inside, also for a float32 cache, so its float32 results are
  compared with the reference at bf16 accuracy, and tightly with the reference on bf16-rounded K/V.
* TPU-semantics interpreter: out-of-bounds reads raise, uninitialised memory is NaN, both megacore
  splits on two simulated cores with the race detector.
* Fallbacks to the reference (S > 1, head_dim not a multiple of 128, a block that does not divide the
  row, odd megacore splits, mismatched pages), and the CPU default: the reference bit for bit.
* Lowering on this CPU host: a Mosaic `tpu_custom_call` for decode shapes only, none for CUDA (the
  reference) unless `backend="gpu"` opts in to jax's Triton kernel; a full Mosaic compile for v5p.
* jax's Pallas-Triton decode kernel (`backend="gpu"`) in Triton interpret mode.
* `Attention.cached`: `impl="pallas"` equals `impl="xla"` bit for bit on CPU and lowers to the kernel
  for TPU.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from glm5v_jax.kernels import paged_attention
from glm5v_jax.kernels.paged_attention import default_pages_per_compute_block, kernel_fallback_reason
from glm5v_jax.kernels.reference import paged_attention_reference
from glm5v_jax.layers.attention import Attention, CachePages, get_paged_attention_impl
from glm5v_jax.tools.aot import libtpu_available, topology_devices

from helpers import lower_text, rel_err


def make_inputs(seed, *, batch=4, heads=8, kv=2, head_dim=128, page=8, pages_per_row=4, spare=3,
                dtype=jnp.float32, lengths=None, positions=None):
    """q `[B, 1, H, D]`, pages `[KV, P, page, D]` (P = B * N + spare), a page table of distinct random
    pages with out-of-range garbage past each row's last page, lengths and q positions `[B, 1]`."""
    rng = np.random.default_rng(seed)
    num_pages = batch * pages_per_row + spare
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((kv, num_pages, page, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((kv, num_pages, page, head_dim)), dtype)
    table = rng.permutation(num_pages)[:batch * pages_per_row].reshape(batch, pages_per_row)
    if lengths is None:
        lengths = rng.integers(0, pages_per_row * page + 1, size=batch)
    lengths = np.asarray(lengths, np.int32)
    used = -(-lengths // page)
    table = np.where(np.arange(pages_per_row)[None] < used[:, None], table, num_pages + 7)  # never read
    if positions is None:
        positions = lengths - 1
    return (q, k, v, jnp.asarray(table, jnp.int32), jnp.asarray(lengths),
            jnp.asarray(np.asarray(positions, np.int32)[:, None]))


def reference(q, k, v, table, lengths, positions, **kw):
    return paged_attention_reference(q, k, v, table, lengths, q_positions=positions, **kw)


@functools.cache
def interpreted(interpret=True, **kw):
    """The dispatcher with the TPU kernel interpreted, jitted once per setting."""
    return jax.jit(lambda q, k, v, t, n, p: paged_attention(q, k, v, t, n, q_positions=p, interpret=interpret, **kw))


def check(got, args, dtype):
    """Kernel output vs the reference: at bf16 accuracy, and tightly against the reference on K/V
    rounded to bf16 (the kernel's own rounding) or on the unrounded cache."""
    q, k, v, *rest = args
    want = reference(q, k, v, *rest)
    assert got.dtype == q.dtype and got.shape == want.shape
    assert np.isfinite(np.asarray(got, np.float32)).all()
    seen = np.minimum(np.asarray(rest[1]), np.asarray(rest[2])[:, 0] + 1)
    assert not np.asarray(got, np.float32)[seen <= 0].any(), "rows that see no key are zeros"
    if dtype == jnp.bfloat16:
        assert rel_err(got, want) <= 1e-2
        return
    assert rel_err(got, want) <= 1e-2
    rounded = reference(q, *(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v)), *rest)
    assert min(rel_err(got, want), rel_err(got, rounded)) <= 1e-5


TABLES = {  # lengths and query positions per row: decode, plus causal cuts (a query before the end)
    "mixed": ([0, 1, 13, 32], None),
    "full_and_page_edges": ([32, 8, 16, 9], None),
    "causal_cut": ([32, 20, 5, 9], [3, 19, 1, 40]),  # row 3: the position is past its length
    "random": (None, None),
}


@pytest.mark.parametrize("dtype, heads, kv", [(jnp.float32, 8, 2), (jnp.bfloat16, 16, 2), (jnp.float32, 4, 4)],
                         ids=["f32-gqa4", "bf16-gqa8", "f32-mha"])
def test_tpu_kernel_matches_reference(dtype, heads, kv):
    """Several page tables and length mixes through one jitted, interpreted dispatcher per case."""
    fn = interpreted(pages_per_compute_block=2)
    for seed, (lengths, positions) in enumerate(TABLES.values()):
        args = make_inputs(seed, heads=heads, kv=kv, dtype=dtype, lengths=lengths, positions=positions)
        check(fn(*args), args, dtype)


def test_tpu_kernel_block_sizes_and_scale():
    """One page per block, the whole row in one block (the default here), and an explicit scale."""
    args = make_inputs(7, page=16, pages_per_row=4, lengths=[64, 17, 0, 48])
    for ppcb in (1, None):
        check(interpreted(pages_per_compute_block=ppcb)(*args), args, jnp.float32)
    q, k, v, t, n, p = args
    got = paged_attention(q, k, v, t, n, q_positions=p, scale=0.3, interpret=True)
    assert rel_err(got, reference(*args, scale=0.3)) <= 1e-2
    # no q_positions: every cached token is visible
    got = paged_attention(q, k, v, t, n, interpret=True)
    assert rel_err(got, paged_attention_reference(q, k, v, t, n)) <= 1e-2


@pytest.fixture
def tpu_interpreter_state():
    state = importlib.import_module("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    pltpu.reset_tpu_interpret_mode_state()
    yield state
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("megacore_mode", [None, "kv_head", "batch"])
def test_tpu_semantics_interpreter(tpu_interpreter_state, megacore_mode):
    """Simulated TPU memory: no out-of-bounds read (garbage table entries are clipped), no read of
    uninitialised memory, and, split over two cores, no race. Zero-length rows first and last."""
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan",
                                   num_cores_or_threads=2 if megacore_mode else 1)
    args = make_inputs(3, batch=4, heads=8, kv=2, lengths=[0, 30, 7, 0])
    fn = interpreted(params, pages_per_compute_block=2, megacore_mode=megacore_mode)
    check(fn(*args), args, jnp.float32)
    races = tpu_interpreter_state.races
    assert races is not None and not races.races_found


FALLBACKS = {  # (make_inputs overrides, dispatcher options, the reason's words)
    "prefill_chunk": (dict(), dict(), "S=3"),
    "head_dim_64": (dict(head_dim=64), dict(), "head_dim=64"),
    "block_not_dividing": (dict(pages_per_row=4), dict(pages_per_compute_block=3), "does not divide"),
    "odd_batch_megacore": (dict(batch=3), dict(megacore_mode="batch"), "even batch"),
    "odd_kv_megacore": (dict(heads=3, kv=1), dict(megacore_mode="kv_head"), "even number of KV heads"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallbacks_are_the_reference(case):
    """Shapes the kernel cannot take run the reference, bit for bit, even when the kernel is forced."""
    overrides, options, words = FALLBACKS[case]
    q, k, v, t, n, p = make_inputs(1, lengths=[5, 32, 9, 1][:overrides.get("batch", 4)], **overrides)
    if case == "prefill_chunk":
        q = jnp.concatenate([q, q * 0.5, -q], axis=1)
        p = jnp.maximum(p + jnp.arange(-2, 1)[None], 0)
    reason = kernel_fallback_reason(q.shape, k, v, t.shape, **options)
    assert reason is not None and words in reason
    want = reference(q, k, v, t, n, p)
    for backend, interpret in ((None, True), ("tpu", None)):
        got = paged_attention(q, k, v, t, n, q_positions=p, backend=backend, interpret=interpret, **options)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fallback_reasons():
    q, k, v, t, *_ = make_inputs(0)
    assert kernel_fallback_reason(q.shape, k, v, t.shape) is None
    assert "differ" in kernel_fallback_reason(q.shape, k, v.astype(jnp.bfloat16), t.shape)
    assert "float" in kernel_fallback_reason(q.shape, k.astype(jnp.int8), v.astype(jnp.int8), t.shape)
    assert "Triton" in kernel_fallback_reason(q[..., :96].shape, k[..., :96], v[..., :96], t.shape, backend="gpu")
    assert "Triton" in kernel_fallback_reason(q.shape, k[:, :, :6], v[:, :, :6], t.shape, backend="gpu")
    with pytest.raises(ValueError, match="megacore_mode"):
        kernel_fallback_reason(q.shape, k, v, t.shape, megacore_mode="both")
    with pytest.raises(ValueError, match="backend"):
        paged_attention(*make_inputs(0)[:5], backend="rocm")
    assert default_pages_per_compute_block(12, 16) == 12  # 192 tokens: the whole row
    assert default_pages_per_compute_block(64, 16) == 32  # 512 tokens
    assert default_pages_per_compute_block(6, 1024) == 1
    assert default_pages_per_compute_block(12, 16, 128, power_of_two=True) == 4


def test_default_on_cpu_is_the_reference_bit_for_bit():
    args = make_inputs(2, lengths=[0, 3, 32, 17])
    want = np.asarray(reference(*args))
    np.testing.assert_array_equal(np.asarray(paged_attention(*args[:5], q_positions=args[5])), want)
    jitted = jax.jit(lambda *a: paged_attention(*a[:5], q_positions=a[5]))
    np.testing.assert_array_equal(np.asarray(jitted(*args)), np.asarray(jax.jit(reference)(*args)))


def _abstract(batch=8, heads=16, kv=2, head_dim=128, page=16, pages_per_row=32, s=1, dtype=jnp.bfloat16,
              sharding=None):
    num_pages = batch * pages_per_row

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    return (sds((batch, s, heads, head_dim), dtype), sds((kv, num_pages, page, head_dim), dtype),
            sds((kv, num_pages, page, head_dim), dtype), sds((batch, pages_per_row), jnp.int32),
            sds((batch,), jnp.int32), sds((batch, s), jnp.int32))


def _dispatch(**kw):
    return lambda q, k, v, t, n, p: paged_attention(q, k, v, t, n, q_positions=p, **kw)


@pytest.mark.parametrize("shapes, platform, options, marker, count", [
    (dict(), "tpu", dict(), "tpu_custom_call", 1),  # decode: the Mosaic kernel
    (dict(dtype=jnp.float32, heads=4), "tpu", dict(), "tpu_custom_call", 1),
    (dict(s=4), "tpu", dict(), "tpu_custom_call", 0),  # a chunk: the reference
    (dict(head_dim=64), "tpu", dict(), "tpu_custom_call", 0),
    (dict(), "cuda", dict(), "tpu_custom_call", 0),  # CUDA: the reference, no kernel of any kind
    (dict(), "cuda", dict(), "triton", 0),
    (dict(), "cuda", dict(backend="gpu"), "__gpu$xla.gpu.triton", 1),  # opt-in Triton kernel
], ids=["tpu-decode-bf16", "tpu-decode-f32", "tpu-chunk", "tpu-d64", "cuda", "cuda-no-triton", "cuda-gpu-opt-in"])
def test_lowering(shapes, platform, options, marker, count):
    """One jitted function lowered for TPU or CUDA on this CPU host (no hardware)."""
    assert lower_text(_dispatch(**options), _abstract(**shapes), platform).count(marker) == count


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_mosaic_compiles_for_v5p():
    """The full TPU compiler (Mosaic included) accepts decode at bf16 with GQA 8, also on megacore."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(topology_devices("v5p:2x2x1")[:1]), ("x",))
    args = _abstract(sharding=NamedSharding(mesh, P()))
    for mode in (None, "kv_head"):
        compiled = jax.jit(_dispatch(megacore_mode=mode)).lower(*args).compile()
        assert compiled.memory_analysis() is not None


def test_gpu_triton_kernel_interpreted():
    """`backend="gpu"`: jax's Pallas-Triton decode kernel in Triton interpret mode (f32 exact-ish)."""
    args = make_inputs(5, heads=8, kv=2, head_dim=64, page=8, pages_per_row=4, lengths=[0, 32, 13, 9],
                       positions=[0, 31, 12, 4])
    got = paged_attention(*args[:5], q_positions=args[5], backend="gpu", interpret=True)
    assert rel_err(got, reference(*args)) <= 1e-5
    assert not np.asarray(got[0]).any()


def _layer(impl, head_dim):
    return Attention(64, 4, 2, head_dim, impl=impl, qk_norm=True, rngs=nnx.Rngs(0))


def _cached_step(layer, x, cache, pages):
    return layer.cached(x, cache, pages)


def test_attention_layer_cached_path():
    """`impl="pallas"` reads the cache through the dispatcher: on CPU bit for bit `impl="xla"`; lowered
    for TPU, a decode step holds the kernel and a chunk does not. Other impls use the reference."""
    assert get_paged_attention_impl("xla") is paged_attention_reference
    assert get_paged_attention_impl("cudnn") is paged_attention_reference
    assert get_paged_attention_impl("pallas") is paged_attention
    rng = np.random.default_rng(0)
    b, page, per_row, head_dim = 2, 4, 3, 128
    cache = {name: jnp.asarray(rng.standard_normal((2, b * per_row, page, head_dim)), jnp.float32)
             for name in ("k", "v")}
    table = jnp.asarray(rng.permutation(b * per_row).reshape(b, per_row), jnp.int32)
    lengths = jnp.asarray([5, 9], jnp.int32)
    pages = CachePages(table, lengths, (lengths - 1)[:, None], jnp.ones((b, 1), bool))
    x = jnp.asarray(rng.standard_normal((b, 1, 64)), jnp.float32)
    step = nnx.jit(_cached_step)
    (want, want_cache), (got, got_cache) = (step(_layer(impl, head_dim), x, cache, pages) for impl in ("xla", "pallas"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_cache["k"]), np.asarray(want_cache["k"]))

    graphdef, state = nnx.split(_layer("pallas", head_dim))

    def lowered(x, index, valid):
        return lower_text(lambda st, x, c: nnx.merge(graphdef, st).cached(
            x, c, CachePages(table, lengths, index, valid))[0], (state, x, cache), "tpu")

    assert lowered(x, pages.token_index, pages.valid).count("tpu_custom_call") == 1
    chunk = jnp.zeros((b, 3, 64), jnp.float32)
    index = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (b, 3))
    assert lowered(chunk, index, jnp.ones((b, 3), bool)).count("tpu_custom_call") == 0
