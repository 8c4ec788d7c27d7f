"""The host-side batch check refuses inconsistent batches and names what is wrong."""
import pytest

from glm5v_jax.data.batch import BatchError, validate_vlm_batch
from glm5v_jax.data.synthetic import packed_vlm_batch


def _batch():
    return packed_vlm_batch(rows=2, seq_len=96, vocab_size=256, image_token_id=4,
                            image_sizes=[(32, 64), (64, 48), (40, 40)], max_patches=16)


def test_generated_batch_is_valid():
    validate_vlm_batch(_batch(), image_token_id=4, vocab_size=256)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b["tokens"].__setitem__((0, 0), 4), "<|image|> tokens"),
    (lambda b: b["image_valid"].__setitem__(2, False), "merged tokens"),
    (lambda b: b["tokens"].__setitem__((1, 3), 999), "vocab_size=256"),
    (lambda b: b["image_grid"].__setitem__((0, 0), 3), "multiple of merge"),
    (lambda b: b["patch_valid"].__setitem__((1, 0), False), "patch_valid marks"),
    (lambda b: b.pop("patches"), "no 'patches'"),
])
def test_inconsistent_batches_are_refused(mutate, match):
    batch = _batch()
    mutate(batch)
    with pytest.raises(BatchError, match=match.replace("|", r"\|")):
        validate_vlm_batch(batch, image_token_id=4, vocab_size=256)
