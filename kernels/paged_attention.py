"""`paged_attention`: attention of new queries over the paged generation KV cache, one entry point.

    out = paged_attention(q, k_pages, v_pages, page_table, lengths, q_positions=index, scale=s)

Arguments and semantics are those of `glm5v_jax.kernels.reference.paged_attention_reference`:
q `[B, S, H, D]`, k_pages / v_pages `[KV, P, page, D]`, page_table `[B, N]`, lengths `[B]` (cached
tokens per row, the new ones included), q_positions `[B, S]` (the queries' token indices: causal);
query s of row b sees key t when t < lengths[b] and t <= q_positions[b, s]; returns `[B, S, H, D]`
in q's dtype, and zeros for a query that sees no key.

Kernel: jax's Pallas TPU paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`,
the same code in jax 0.10.2 and 0.11.0) serves decode, S == 1. It has no causal mask and no scale,
so each row's visible length becomes `min(lengths, q_positions + 1)` (exactly the reference's mask
for one query per row) and q is pre-scaled in float32. It takes GQA as the ratio H // KV and
streams pages straight from the page pool, so nothing is gathered. Note: it rounds K and V to
bfloat16 inside (also for a float32 cache), so its float32 results are bf16-accurate (~1e-3
relative), not bitwise those of the reference.

Fallback to `paged_attention_reference` (rather than an error; the reference itself still raises
for q and pages that do not match, e.g. H not a multiple of KV) when the kernel does not fit:
  * S > 1 (prefill, chunked extend, speculative verify): jax's mixed prefill/decode kernel
    (`ops.tpu.ragged_paged_attention`) wants K and V interleaved in one `[P, page, 2 * KV, D]`
    pool and packed ragged queries, not this cache layout;
  * head_dim not a multiple of 128 (TPU lane rule: the kernel's block shapes fail Mosaic lowering);
  * `pages_per_compute_block` that does not divide N (the pages per row);
  * `megacore_mode="batch"` with an odd batch, or `"kv_head"` with an odd KV;
  * K/V pages of different shapes or dtypes, or a non-float cache.
`kernel_fallback_reason(...)` says which rule applies (None: the kernel runs).

Backend choice (`backend=None`), like `flash_attention` but with the reference as the CPU default:
  tpu   -> the TPU kernel, picked at lowering time with `jax.lax.platform_dependent`, so an
           ahead-of-time compile for a TPU topology from a CPU host gets it;
  other -> the reference (CPU, and CUDA: see below), bitwise the same as calling it directly.
`interpret=True` (HLO interpreter) or a `pltpu.InterpretParams` (TPU-semantics interpreter) runs
the TPU kernel interpreted, e.g. on CPU (the kernel has no interpret argument: it is traced under
`pltpu.force_tpu_interpret_mode`). `backend="tpu"` forces the TPU kernel (on hardware unless
interpreted). `backend="gpu"` opts in to jax's Pallas-Triton decode kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`; same code in 0.10.2 and 0.11.0, deprecated
at jax HEAD after 0.11.0 in favour of tokamax, and the Triton backend itself is deprecated from 0.11.0). It
runs in Triton interpret mode and lowers for CUDA on a CPU host but is not yet checked on a GPU,
so CUDA keeps the reference by default. Its extra rules: head_dim, page size and
pages_per_compute_block powers of two, head_dim and page * pages_per_compute_block >= 16.

Page-table entries past a row's visible pages are never read for the result, but a kernel block
loads `pages_per_compute_block` pages at once, so entries are clipped into [0, P) first.
"""
from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from glm5v_jax.kernels.dispatch import check_backend
from glm5v_jax.kernels.reference import paged_attention_reference

# Tokens per kernel block when `pages_per_compute_block` is not given: the largest divisor of the
# pages per row that keeps a block within this many tokens (at least one page).
TPU_BLOCK_TOKENS = 512
GPU_BLOCK_TOKENS = 128
GPU_MAX_K_SPLITS = 16  # jax's default for its Triton kernel
MEGACORE_MODES = (None, "kv_head", "batch")


def _tpu_kernel():
    """jax's Pallas TPU paged-attention kernel, or None when this jax has none."""
    try:
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel
    except ImportError:
        return None
    return kernel


def _gpu_kernel():
    """jax's Pallas-Triton paged-attention kernel, or None when this jax has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the module (after 0.11.0) and Triton (0.11)
            from jax.experimental.pallas.ops.gpu import paged_attention as module
    except ImportError:
        return None
    return module.paged_attention


def default_pages_per_compute_block(pages_per_row: int, page_size: int, block_tokens: int = TPU_BLOCK_TOKENS,
                                    *, power_of_two: bool = False) -> int:
    """The largest divisor of `pages_per_row` whose block holds at most `block_tokens` tokens (>= 1);
    with `power_of_two`, the largest power-of-two divisor that does."""
    best = 1
    for n in range(1, pages_per_row + 1):
        if pages_per_row % n == 0 and n * page_size <= block_tokens and (not power_of_two or n & (n - 1) == 0):
            best = n
    return best


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_fallback_reason(q_shape, k_pages, v_pages, page_table_shape, *, backend: str = "tpu",
                           pages_per_compute_block: int | None = None, megacore_mode: str | None = None) -> str | None:
    """Why `paged_attention` would use the reference instead of `backend`'s kernel ('tpu' or 'gpu')
    for these shapes (arrays or ShapeDtypeStructs for the pages), or None when the kernel runs."""
    check_backend(backend)
    if megacore_mode not in MEGACORE_MODES:
        raise ValueError(f"megacore_mode must be one of {MEGACORE_MODES}; got {megacore_mode!r}")
    b, s, h, d = q_shape
    kv, _, page, dk = k_pages.shape
    n = page_table_shape[1]
    if s != 1:
        return f"S={s} new queries per row: the kernels serve decode (S == 1) only"
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        return f"k_pages {k_pages.shape} {k_pages.dtype} and v_pages {v_pages.shape} {v_pages.dtype} differ"
    if not jnp.issubdtype(k_pages.dtype, jnp.floating):
        return f"cache dtype {k_pages.dtype} is not a float type"
    if dk != d or h % kv:
        return f"q {q_shape} does not fit pages {k_pages.shape}"  # the reference raises
    if (_tpu_kernel if backend == "tpu" else _gpu_kernel)() is None:
        return f"this jax ({jax.__version__}) has no Pallas {backend} paged-attention kernel"
    ppcb = pages_per_compute_block
    if ppcb is not None and (ppcb < 1 or n % ppcb):
        return f"pages_per_compute_block={ppcb} does not divide the {n} pages per row"
    if backend == "tpu":
        if d % 128:
            return f"head_dim={d} is not a multiple of 128 (TPU lane rule)"
        if megacore_mode == "batch" and b % 2:
            return f"megacore_mode='batch' needs an even batch; got {b}"
        if megacore_mode == "kv_head" and kv % 2:
            return f"megacore_mode='kv_head' needs an even number of KV heads; got {kv}"
        return None
    if megacore_mode is not None:
        return "megacore_mode is a TPU option"
    ppcb = ppcb or default_pages_per_compute_block(n, page, GPU_BLOCK_TOKENS, power_of_two=True)
    if not (_is_power_of_two(d) and d >= 16):
        return f"head_dim={d} is not a power of two >= 16 (Triton rule)"
    if not (_is_power_of_two(page) and _is_power_of_two(ppcb) and page * ppcb >= 16):
        return f"page size {page} x pages_per_compute_block {ppcb} is not a power of two >= 16 (Triton rule)"
    if k_pages.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"cache dtype {k_pages.dtype} is not float32, bfloat16 or float16"
    return None


def visible_lengths(lengths: jax.Array, q_positions: jax.Array | None, max_tokens: int) -> jax.Array:
    """int32 `[B]`: how many leading cached tokens the single query of each row sees (decode)."""
    n = jnp.asarray(lengths, jnp.int32)
    if q_positions is not None:
        n = jnp.minimum(n, jnp.asarray(q_positions, jnp.int32)[:, 0] + 1)
    return jnp.clip(n, 0, max_tokens)


def _decode_inputs(q, k_pages, page_table, lengths, q_positions, scale):
    """(pre-scaled float32 q `[B, H, D]`, clipped int32 page table, visible lengths)."""
    _, num_pages, page, _ = k_pages.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, num_pages - 1)
    seen = visible_lengths(lengths, q_positions, table.shape[1] * page)
    return q[:, 0].astype(jnp.float32) * scale, table, seen


def _finish(out, seen, dtype):
    """Kernel output `[B, H, D]` -> `[B, 1, H, D]`; rows that see no key are zeros, as in the reference."""
    return jnp.where((seen > 0)[:, None, None], out.astype(jnp.float32), 0.0)[:, None].astype(dtype)


def paged_attention_tpu(q, k_pages, v_pages, page_table, lengths, *, q_positions=None, scale=None,
                        pages_per_compute_block: int | None = None, megacore_mode: str | None = None, interpret=None):
    """Decode (S == 1) through jax's Pallas TPU kernel; shapes must fit (`kernel_fallback_reason`)."""
    ppcb = pages_per_compute_block or default_pages_per_compute_block(page_table.shape[1], k_pages.shape[2])
    q1, table, seen = _decode_inputs(q, k_pages, page_table, lengths, q_positions, scale)
    ctx = pltpu.force_tpu_interpret_mode(interpret) if interpret else contextlib.nullcontext()
    with ctx:
        out = _tpu_kernel()(q1, k_pages, v_pages, seen, table, pages_per_compute_block=ppcb,
                            megacore_mode=megacore_mode)
    return _finish(out, seen, q.dtype)


def paged_attention_gpu(q, k_pages, v_pages, page_table, lengths, *, q_positions=None, scale=None,
                        pages_per_compute_block: int | None = None, interpret=None):
    """Decode (S == 1) through jax's Pallas-Triton kernel; shapes must fit (`kernel_fallback_reason`)."""
    n, page = page_table.shape[1], k_pages.shape[2]
    ppcb = pages_per_compute_block or default_pages_per_compute_block(n, page, GPU_BLOCK_TOKENS, power_of_two=True)
    k_splits = max(d for d in range(1, min(n // ppcb, GPU_MAX_K_SPLITS) + 1) if (n // ppcb) % d == 0)
    q1, table, seen = _decode_inputs(q, k_pages, page_table, lengths, q_positions, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = _gpu_kernel()(q1.astype(k_pages.dtype), k_pages, v_pages, table, seen, pages_per_compute_block=ppcb,
                            k_splits=k_splits, interpret=bool(interpret))
    return _finish(out, seen, q.dtype)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    interpret=None,
    pages_per_compute_block: int | None = None,
    megacore_mode: str | None = None,
    layer: jax.Array | None = None,
) -> jax.Array:
    """Paged attention with a kernel where one fits, else the reference; see the module docstring.

    With `layer`, k_pages and v_pages are whole stacks `[L, KV, P, page, D]` read at that layer (the
    reference gathers from the stack directly; the kernels get the layer's slice).

    `pages_per_compute_block` (None: the largest divisor of N within 512 tokens on TPU, a power of
    two within 128 tokens on GPU) sets how many pages one kernel step loads. `megacore_mode`
    ('kv_head' | 'batch' | None) splits the TPU kernel over the two TensorCores of a megacore chip
    (v4, v5p); leave it None elsewhere (jax warns the kernel may hang without megacore).
    """
    check_backend(backend)
    if layer is not None:
        one_layer = (jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in (k_pages, v_pages))
        reason = kernel_fallback_reason(q.shape, *one_layer, page_table.shape, backend=backend or "tpu",
                                        pages_per_compute_block=pages_per_compute_block, megacore_mode=megacore_mode)
        if reason is not None:
            return paged_attention_reference(q, k_pages, v_pages, page_table, lengths, q_positions=q_positions,
                                             scale=scale, layer=layer)
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    reference = lambda q, k, v, t, n, p: paged_attention_reference(q, k, v, t, n, q_positions=p,  # noqa: E731
                                                                   scale=scale)
    kernel_backend = backend or "tpu"
    reason = kernel_fallback_reason(q.shape, k_pages, v_pages, page_table.shape, backend=kernel_backend,
                                    pages_per_compute_block=pages_per_compute_block, megacore_mode=megacore_mode)
    if reason is not None:
        return reference(q, k_pages, v_pages, page_table, lengths, q_positions)
    if kernel_backend == "gpu":
        return paged_attention_gpu(q, k_pages, v_pages, page_table, lengths, q_positions=q_positions, scale=scale,
                                   pages_per_compute_block=pages_per_compute_block, interpret=interpret)

    def tpu(q, k, v, t, n, p, interpret=None):
        return paged_attention_tpu(q, k, v, t, n, q_positions=p, scale=scale,
                                   pages_per_compute_block=pages_per_compute_block, megacore_mode=megacore_mode,
                                   interpret=interpret)

    args = (q, k_pages, v_pages, page_table, lengths, q_positions)
    if backend == "tpu" or interpret:
        return tpu(*args, interpret=interpret)
    if q_positions is None:  # platform_dependent takes arrays only
        return jax.lax.platform_dependent(*args[:5], tpu=lambda *a: tpu(*a, None),
                                          default=lambda *a: reference(*a, None))
    return jax.lax.platform_dependent(*args, tpu=tpu, default=reference)
