"""The paged KV cache: paged reference attention equals `attention_reference` for random page tables and
mixed lengths (decode and chunked extend, GQA), writes land where the page table says, and the host
page pool shares, copies on write and frees every page exactly once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.generate.kv_cache import StackCache, copy_pages
from glm5v_jax.generate.pages import OutOfPages, PagePool, pages_needed
from glm5v_jax.kernels import attention_reference, gather_pages, paged_attention_reference, paged_write

KV, H, D, PAGE, N = 2, 4, 8, 4, 5  # a row holds up to N * PAGE = 20 tokens
LENGTHS = np.array([20, 7, 1, 13, 4])


def _scatter(x: np.ndarray, table: np.ndarray, num_pages: int, rng) -> np.ndarray:
    """Contiguous `[B, T, KV, D]` stored in pages `[KV, P, page, D]` by page tables `[B, N]` (garbage elsewhere)."""
    pages = rng.normal(size=(KV, num_pages, PAGE, D)).astype(np.float32)
    for i in range(x.shape[0]):
        for t in range(LENGTHS[i]):
            pages[:, table[i, t // PAGE], t % PAGE] = x[i, t]
    return pages


@pytest.mark.parametrize("chunk", [1, 3])  # decode, and an extend of 3 tokens
def test_paged_attention_equals_attention_reference(chunk):
    rng = np.random.default_rng(chunk)
    b, t = len(LENGTHS), N * PAGE
    q = rng.normal(size=(b, t, H, D)).astype(np.float32)
    k = rng.normal(size=(b, t, KV, D)).astype(np.float32)
    v = rng.normal(size=(b, t, KV, D)).astype(np.float32)
    seg = (np.arange(t)[None] < LENGTHS[:, None]).astype(np.int32)
    full = np.asarray(attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
                                          q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg)))
    num_pages = b * N + 3
    table = rng.permutation(num_pages)[:b * N].reshape(b, N)  # random pages, in random order
    k_pages, v_pages = _scatter(k, table, num_pages, rng), _scatter(v, table, num_pages, rng)
    positions = np.maximum(LENGTHS[:, None] - chunk + np.arange(chunk)[None], 0)  # the last `chunk` tokens
    q_new = np.take_along_axis(q, positions[:, :, None, None], axis=1)
    out = jax.jit(paged_attention_reference)(jnp.asarray(q_new), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                             jnp.asarray(table), jnp.asarray(LENGTHS),
                                             q_positions=jnp.asarray(positions))
    want = np.take_along_axis(full, positions[:, :, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_empty_row_gives_zeros():
    q = jnp.ones((1, 1, H, D))
    pages = jnp.ones((KV, 2, PAGE, D))
    out = paged_attention_reference(q, pages, pages, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32))
    assert not np.asarray(out).any()


def test_written_tokens_read_back_and_padding_is_dropped():
    rng = np.random.default_rng(0)
    cache = StackCache(num_layers=2, num_kv_heads=KV, head_dim=D).init(num_pages=12, page_size=PAGE)
    table = jnp.asarray([[3, 7, 1], [0, 5, 9]], jnp.int32)
    new = jnp.asarray(rng.normal(size=(2, 6, KV, D)), jnp.float32)
    positions = jnp.asarray([[2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5]], jnp.int32)
    valid = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
    layer0 = jax.jit(paged_write)(cache["k"][0], new, table, positions, valid)
    back = np.asarray(gather_pages(layer0, table))  # [B, 3 * PAGE, KV, D]
    np.testing.assert_array_equal(back[0, 2:8], np.asarray(new[0]))
    np.testing.assert_array_equal(back[1, 0:4], np.asarray(new[1, :4]))
    assert not back[1, 4:].any() and not back[0, :2].any()  # padding dropped, nothing else touched
    untouched = np.ones(12, bool)
    untouched[[3, 7, 0, 5]] = False
    assert not np.asarray(layer0)[:, untouched].any()


def test_copy_pages_copies_every_layer():
    cache = {"k": jnp.arange(2 * KV * 6 * PAGE * D, dtype=jnp.float32).reshape(2, KV, 6, PAGE, D)}
    out = copy_pages(cache, jnp.asarray([1, 4]), jnp.asarray([5, 0]))
    np.testing.assert_array_equal(out["k"][:, :, 5], cache["k"][:, :, 1])
    np.testing.assert_array_equal(out["k"][:, :, 0], cache["k"][:, :, 4])
    np.testing.assert_array_equal(out["k"][:, :, 2], cache["k"][:, :, 2])


def test_pool_forks_share_full_pages_copy_the_last_and_free_each_page_once():
    pool = PagePool(num_pages=10, page_size=4)
    parent = pool.allocate(pages_needed(10, 4))  # 10 tokens: 2 full pages + 1 partial
    assert parent == [0, 1, 2] and pool.free_pages == 7
    children = [pool.fork(parent, 10) for _ in range(3)]
    for child in children:
        assert child.pages[:2] == parent[:2] and len(child.copies) == 1 and child.copies[0][0] == parent[2]
    assert pool.refcount(0) == 4 and pool.refcount(2) == 1 and pool.free_pages == 4
    added = pool.grow(children[0].pages, 13)  # the child fills its copy and needs one more page
    assert len(added) == 1 and len(children[0].pages) == 4
    freed = pool.release(parent)
    assert freed == [2]  # the shared pages stay while the children hold them
    for child in children:
        freed += pool.release(child.pages)
    assert pool.free_pages == 10 and sorted(freed) == list(range(7))  # each page handed out freed once
    with pytest.raises(ValueError, match="double free"):
        pool.release([0])


def test_pool_out_of_pages_allocates_nothing():
    pool = PagePool(num_pages=4, page_size=8)
    held = pool.allocate(3)
    with pytest.raises(OutOfPages, match="2 pages needed, 1 of 4 free"):
        pool.allocate(2)
    assert pool.free_pages == 1
    pool.release(held)
    assert pool.free_pages == 4
    full = pool.allocate(4)
    with pytest.raises(OutOfPages):
        pool.fork(full[:2], 12)  # the partial last page needs a fresh one
    assert [pool.refcount(p) for p in full] == [1, 1, 1, 1]  # the failed fork changed nothing


def test_a_stack_read_and_written_at_a_layer_equals_that_layers_pages():
    """The layer-indexed forms (a loop over layers carrying the whole stack) write only that layer, in
    place, and read what the layer's own pages give."""
    rng = np.random.default_rng(3)
    layers, kv, pages, page, d, b, s = 3, 2, 10, 4, 8, 2, 3
    stack = jnp.asarray(rng.normal(size=(layers, kv, pages, page, d)), jnp.float32)
    table = jnp.asarray(rng.permutation(pages)[:8].reshape(b, 4), jnp.int32)
    index = jnp.asarray([[5, 6, 7], [0, 1, 2]], jnp.int32)
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    new = jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, s, 2 * kv, d)), jnp.float32)
    lengths = jnp.asarray([7, 3], jnp.int32)
    for layer in range(layers):
        written = paged_write(stack, new, table, index, valid, jnp.int32(layer))
        one = paged_write(stack[layer], new, table, index, valid)
        np.testing.assert_array_equal(written[layer], one)
        others = np.asarray([i for i in range(layers) if i != layer])
        np.testing.assert_array_equal(written[others], stack[others])
        np.testing.assert_array_equal(gather_pages(written, table, jnp.int32(layer)), gather_pages(one, table))
        got = paged_attention_reference(q, written, written, table, lengths, q_positions=index,
                                        layer=jnp.int32(layer))
        want = paged_attention_reference(q, one, one, table, lengths, q_positions=index)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
