"""Image batches for CogViT pre-training: NaFlex arrays, labels from shapes world, captions as
tokens, bad records skipped and counted, exact resume from the iterator state, named mixtures, extra
views of each image for teachers of another patch size, and attached per-record arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest

from glm5v_jax.data import shapes_world
from glm5v_jax.data.image_batches import LABELS, ImageBatchConfig, labels_of, make_image_batch_iterator, view_key
from glm5v_jax.data.sources import mix_sources


class _Tokenizer:
    """Enough of glm5v_jax.data.tokenizer.Tokenizer for captions: one id per word."""

    eos_id, pad_id = 2, 0

    def encode(self, text):
        return [10 + (hash(w) % 50) for w in text.split()]


@pytest.fixture(scope="module")
def records():
    good = [shapes_world.generate_image_example(0, "train", i) for i in range(12)]
    bad = [dict(good[0], id="broken", image=b"not a png"), dict(good[1], id="text-only", image=b"", kind="text")]
    return good[:5] + bad[:1] + good[5:9] + bad[1:] + good[9:]


def _config(**kw):
    return ImageBatchConfig(**{"batch_size": 3, "max_patches": 64, "seed": 1, **kw})


def test_batches_hold_naflex_images_and_labels(records):
    it = make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1))
    batch = next(it)
    assert batch["patches"].shape == (3, 64, 768) and batch["patch_yx"].shape == (3, 64, 2)
    assert batch["valid"].shape == (3, 64) and batch["grid"].shape == (3, 2)
    for row, record in zip(range(3), records[:3]):
        assert int(batch["valid"][row].sum()) == int(np.prod(batch["grid"][row]))
        first = json.loads(record["boxes_json"])[0]["label"]  # "colour shape"
        assert LABELS["colour"][batch["colour_label"][row]] + " " + LABELS["shape"][batch["shape_label"][row]] == first


def test_bad_records_are_skipped_and_counted(records):
    it = make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1))
    batches = list(it)
    assert len(batches) == 4  # 12 good images, 3 per batch; the 2 bad records never reach a batch
    assert it.stats["skipped/undecodable_image"] == 1 and it.stats["skipped/empty_image"] == 1
    assert it.stats["images"] == 12
    assert labels_of({"boxes_json": "not json"}) == {"shape": -1, "colour": -1}


def test_too_many_skips_in_a_row_is_an_error_naming_the_counts():
    it = make_image_batch_iterator([{"image": b""}] * 10, _config(max_consecutive_skips=5))
    with pytest.raises(RuntimeError, match="skipped/empty_image"):
        next(it)


def test_captions_become_padded_tokens_ending_in_eos(records):
    it = make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1, text_len=8), _Tokenizer())
    batch = next(it)
    assert batch["text"].shape == (3, 8)
    for row in batch["text"]:
        ids = list(row[row != 0])
        assert ids[-1] == 2 and len(ids) <= 8
    with pytest.raises(ValueError, match="tokenizer"):
        make_image_batch_iterator(records, _config(text_len=8))


def test_restored_state_continues_with_the_exact_next_batch(records):
    it = make_image_batch_iterator(records, _config())
    for _ in range(5):  # past one epoch: the shuffled repeat goes on
        next(it)
    state = it.get_state()
    expected = next(it)
    again = make_image_batch_iterator(records, _config())
    again.set_state(json.loads(json.dumps(state)))  # the state survives JSON (orbax JsonSave)
    got = next(again)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert again.stats == it.stats
    with pytest.raises(ValueError, match="batch_size"):
        make_image_batch_iterator(records, _config(batch_size=4)).set_state(state)


def test_named_mixture_by_weight(records):
    sources = {"natural": records[:6], "instruction": records[6:10], "scientific": records[10:]}
    mixed = mix_sources(sources, {"natural": 0.8, "instruction": 0.1, "scientific": 0.1}, seed=0)
    ids = [r["id"].split("/")[0] for r in mixed]
    counts = {name: ids.count(name) / len(ids) for name in sources}
    assert counts["natural"] == pytest.approx(0.8, abs=0.05)
    batch = next(make_image_batch_iterator(mixed, _config()))
    assert batch["patches"].shape[0] == 3


def test_teacher_views_are_the_same_image_at_another_patch_size(records):
    views = ((8, 256), (14, 84))
    it = make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1, teacher_views=views))
    batch = next(it)
    px = batch["grid"] * 16  # [B, 2] the student view's size in pixels
    for p, n in views:
        patches, yx, valid, grid = (batch[view_key(k, p, n)] for k in ("patches", "patch_yx", "valid", "grid"))
        assert patches.shape == (3, n, p * p * 3) and yx.shape == (3, n, 2) and valid.shape == (3, n)
        np.testing.assert_array_equal(valid.sum(1), grid.prod(1))
        np.testing.assert_array_equal(yx.max(1, where=valid[..., None], initial=0) + 1, grid)
        # Both are resizes of the whole image to about the same area: sizes agree within the
        # student's rounding (one merge group of 2 x 16 px per side) and so do the mean colours.
        assert np.all(np.abs(grid * p - px) <= 32), (p, grid * p, px)
        for row in range(3):
            mean_t = patches[row][valid[row]].reshape(-1, 3).mean(0)
            mean_s = batch["patches"][row][batch["valid"][row]].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(mean_t, mean_s, atol=0.005)
    state = it.get_state()
    assert state["config"]["teacher_views"] == [[8, 256], [14, 84]]
    with pytest.raises(ValueError, match="teacher_views"):
        make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1)).set_state(state)
    with pytest.raises(ValueError, match="teacher_views"):
        _config(teacher_views=((8, 0),))


def _attach(record):
    """Extra arrays for some records, a skip reason for the others (as the teacher cache does)."""
    return {"extra": np.int32(len(record["id"]))} if record["id"] != "broken" else "skipped/no_extra"


def test_attach_adds_arrays_or_skips_and_counts(records):
    records = [dict(r, id=r.get("id", f"r{i}")) for i, r in enumerate(records)]
    records[0]["id"] = "broken"
    it = make_image_batch_iterator(records, _config(shuffle=False, num_epochs=1), attach=_attach)
    batch = next(it)
    assert batch["extra"].shape == (3,) and it.stats["skipped/no_extra"] == 1
