"""Checkpointer: resume from the newest good step; bad or incomplete steps are skipped,
logged and kept (moved aside, never deleted)."""
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from glm5v_jax.train.checkpoint import Checkpointer


def _state(v):
    return {"w": jnp.full((4, 3), float(v)), "b": jnp.arange(5) + v}


def _save_steps(directory, steps):
    ck = Checkpointer(directory, max_to_keep=5)
    for s in steps:
        ck.save(s, _state(s), {"next_index": s}, {"seed": 0}, force=True)
    ck.close()


def test_restore_newest(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    step, state, data, config = Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 3 and data == {"next_index": 3} and config == {"seed": 0}
    np.testing.assert_array_equal(state["w"], np.full((4, 3), 3.0))


def test_corrupted_newest_falls_back_and_is_kept(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    # Corrupt every file of step 3's model state.
    for f in (Path(tmp_path) / "3" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        step, state, data, _ = Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 2 and data == {"next_index": 2}
    np.testing.assert_array_equal(state["b"], np.arange(5) + 2)
    assert "step 3" in caplog.text and "cannot be restored" in caplog.text
    assert (Path(tmp_path) / "3.bad-0").is_dir()  # kept for inspection, not deleted
    assert (Path(tmp_path) / "2").is_dir()


def test_incomplete_save_is_ignored(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # What a save killed half-way leaves: an orbax temporary directory for step 3.
    tmp = Path(tmp_path) / "3.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\x00" * 10)
    step, _, data, _ = Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 2 and data == {"next_index": 2}


def test_missing_metadata_step_falls_back(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for f in (Path(tmp_path) / "2").rglob("*"):
        if f.is_file():
            f.unlink()
    step, _, _, _ = Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 1
