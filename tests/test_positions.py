"""Tests for M-RoPE position ids (glm5v_jax.models.positions.mrope_positions)."""
import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.models import positions

# One compile per input shape instead of many eager op compiles.
mrope_positions = jax.jit(positions.mrope_positions, static_argnums=2)

IMG, PAD = 99, 0


def _np_mrope_positions(tokens, segment_ids, grids):
    """The documented rule, token by token.

    grids: merged (rows, cols) of the images in order of appearance over the flattened batch.
    """
    b, s = tokens.shape
    out = np.zeros((b, s, 3), np.int64)
    image = 0
    for bi in range(b):
        si, pos, prev_seg = 0, 0, None
        while si < s:
            if segment_ids[bi, si] != prev_seg:
                pos, prev_seg = 0, segment_ids[bi, si]
            if tokens[bi, si] == IMG:
                gh, gw = grids[image]
                image += 1
                st = pos
                for r in range(gh):
                    for c in range(gw):
                        assert tokens[bi, si] == IMG and segment_ids[bi, si] == prev_seg
                        out[bi, si] = (st, st + r, st + c)
                        si += 1
                pos = st + max(gh, gw)
            else:
                out[bi, si] = pos
                pos += 1
                si += 1
    assert image == len(grids)
    return out


def _row(*parts):
    """Concatenate (token, segment, count) runs into token and segment lists."""
    toks, segs = [], []
    for tok, seg, n in parts:
        toks += [tok] * n
        segs += [seg] * n
    return toks, segs


def _batch():
    # Row 0: doc 1 = text 3, image A (2x3), text 2; doc 2 = image B (4x1) first, text 2; pad 3.
    t0, s0 = _row((5, 1, 3), (IMG, 1, 6), (6, 1, 2), (IMG, 2, 4), (7, 2, 2), (PAD, 0, 3))
    # Row 1: text 2, image C (2x2), text 3, then padding.
    t1, s1 = _row((8, 1, 2), (IMG, 1, 4), (9, 1, 3), (PAD, 0, 11))
    assert len(t0) == len(t1) == 20
    tokens = np.array([t0, t1], np.int32)
    segs = np.array([s0, s1], np.int32)
    # Give text tokens varied ids (anything but IMG).
    text = tokens != IMG
    tokens[text] = np.where(segs[text] == 0, PAD, 1 + np.arange(text.sum()) % 50)
    return tokens, segs


GRIDS = [(2, 3), (4, 1), (2, 2)]


def test_mrope_positions_match_rule_with_images_segments_padding():
    """Three images of different grids over two rows, two documents, padding: exact match."""
    tokens, segs = _batch()
    got = np.asarray(mrope_positions(jnp.asarray(tokens), jnp.asarray(segs), IMG,
                                     jnp.asarray(GRIDS, jnp.int32)))
    want = _np_mrope_positions(tokens, segs, GRIDS)
    assert got.shape == (2, 20, 3) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # Spot checks of the rule itself (guards the NumPy reference too).
    np.testing.assert_array_equal(got[0, 3:9], [[3, 3, 3], [3, 3, 4], [3, 3, 5],
                                                [3, 4, 3], [3, 4, 4], [3, 4, 5]])
    np.testing.assert_array_equal(got[0, 9], [6, 6, 6])      # 3 + max(2, 3)
    np.testing.assert_array_equal(got[0, 11:15, 0], [0] * 4)  # doc 2 restarts at 0
    np.testing.assert_array_equal(got[0, 11:15, 1], [0, 1, 2, 3])
    np.testing.assert_array_equal(got[0, 15], [4, 4, 4])
    np.testing.assert_array_equal(got[0, 17:, 0], [0, 1, 2])   # padding restarts too
    np.testing.assert_array_equal(got[1, 6], [4, 4, 4])        # 2 + max(2, 2)


def test_mrope_positions_skip_invalid_images():
    """Invalid image slots (image_valid False) own no tokens: same result as without them."""
    tokens, segs = _batch()
    grids = jnp.asarray([GRIDS[0], (5, 5), GRIDS[1], GRIDS[2], (3, 3)], jnp.int32)
    valid = jnp.asarray([True, False, True, True, False])
    got = np.asarray(mrope_positions(jnp.asarray(tokens), jnp.asarray(segs), IMG, grids, valid))
    np.testing.assert_array_equal(got, _np_mrope_positions(tokens, segs, GRIDS))


def test_mrope_positions_without_images_are_per_segment_arange():
    """No images: t = h = w = index within the segment (restart at every segment change)."""
    segs = np.array([[1, 1, 1, 2, 2, 3, 0, 0],
                     [4, 4, 4, 4, 4, 4, 4, 4]], np.int32)
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) + 1
    want = np.array([[0, 1, 2, 0, 1, 0, 0, 1],
                     [0, 1, 2, 3, 4, 5, 6, 7]])
    for grids in (None, jnp.zeros((0, 2), jnp.int32)):
        got = np.asarray(mrope_positions(jnp.asarray(tokens), jnp.asarray(segs), IMG, grids))
        assert got.shape == (2, 8, 3)
        for a in range(3):
            np.testing.assert_array_equal(got[..., a], want)


def test_positions_continue_chunk_by_chunk_as_over_the_whole_sequence():
    """Generation: a prompt with an image, decoded tokens one at a time, an image appended
    mid-conversation (with a padded bucket) and more decoding give `mrope_positions` of the whole."""
    from glm5v_jax.models.positions import continue_positions

    img = 9
    a, b = np.array([2, 3]), np.array([2, 2])  # merged grids (rows, cols)
    seq = [1, 2, 3] + [img] * 6 + [4, 5] + [img] * 4 + [6, 7, 8]
    full = np.asarray(mrope_positions(jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32), img,
                                      jnp.asarray([a, b]), jnp.asarray([True, True])))[0]
    chunks = [(seq[:9], [a], 0), ([4], [], 0), ([5], [], 0), (seq[11:16], [b], 3), ([7], [], 0), ([8], [], 0)]
    offset, got = jnp.zeros((1,), jnp.int32), []
    for tokens, grids, pad in chunks:
        toks = jnp.asarray([tokens + [0] * pad])
        valid = jnp.asarray([[True] * len(tokens) + [False] * pad])
        grid = jnp.asarray(grids, jnp.int32).reshape(-1, 2) if grids else None
        pos, offset = continue_positions(toks, valid, offset, img, grid)
        got.extend(np.asarray(pos)[0, :len(tokens)])
    np.testing.assert_array_equal(np.stack(got), full)
    assert int(offset[0]) == int(full[-1, 0]) + 1
