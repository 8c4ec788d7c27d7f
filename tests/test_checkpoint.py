"""Checkpointer: resume from the newest good step; damaged steps (corrupted or flipped bytes, missing
files, non-finite states) are skipped, logged and kept (moved aside, never deleted); a mismatch with
the run (config, structure) is refused and quarantines nothing; a failed async save is reported at once."""
import json
import logging
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.errors import ConfigError
from glm5v_jax.train.checkpoint import CHECKSUMS, Checkpointer
from helpers import checkpoint_array_files


def _state(v):
    noise = np.random.default_rng(v).normal(size=(64, 32)).astype(np.float32)  # incompressible bytes
    return {"w": jnp.asarray(noise + v), "b": jnp.arange(5) + v}


def _save_steps(directory, steps, **meta):
    ck = Checkpointer(directory, max_to_keep=5)
    for s in steps:
        ck.save(s, _state(s), {"next_index": s}, {"seed": 0}, meta=meta, force=True)
    ck.close()
    return ck


def test_restore_newest_with_meta_and_checksums(tmp_path):
    ck = _save_steps(tmp_path, [1, 2, 3], fingerprints={"tokenizer": "abc"})
    assert [r["step"] for r in ck.saved] == [1, 2, 3] and all(r["bytes"] > 0 for r in ck.saved)
    sums = json.loads((tmp_path / "3" / CHECKSUMS).read_text())["files"]
    assert any(k.startswith("state/") for k in sums) and all(len(d) == 64 for _, d in sums.values())
    step, state, data, config, meta = Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 3 and data == {"next_index": 3} and config == {"seed": 0}
    assert meta["fingerprints"] == {"tokenizer": "abc"} and meta["step"] == 3
    np.testing.assert_array_equal(state["w"], _state(3)["w"])


def test_corrupted_newest_falls_back_and_is_kept(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    for f in (tmp_path / "3" / "state").rglob("*"):  # every file of step 3's model state
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        step, state, data = Checkpointer(tmp_path).restore_latest(_state(0))[:3]
    assert step == 2 and data == {"next_index": 2}
    np.testing.assert_array_equal(state["b"], np.arange(5) + 2)
    assert "step 3" in caplog.text and "damaged" in caplog.text
    assert (tmp_path / "3.bad-0").is_dir()  # kept for inspection, not deleted
    assert (tmp_path / "2").is_dir()


@pytest.mark.parametrize("damage", ["overwrite_4k", "flip_one_byte"])
def test_corrupted_array_bytes_are_caught_by_checksums(tmp_path, caplog, damage):
    """Array bytes that still decode (orbax would load them silently) fail the sha256 at restore."""
    _save_steps(tmp_path, [1, 2])
    target = max(checkpoint_array_files(tmp_path / "2"), key=lambda f: f.stat().st_size)
    raw = bytearray(target.read_bytes())
    if damage == "overwrite_4k":
        start = max(0, len(raw) // 2 - 2048)
        raw[start:start + 4096] = np.random.default_rng(0).bytes(min(4096, len(raw) - start))
    else:
        raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        step, state = Checkpointer(tmp_path).restore_latest(_state(0))[:2]
    assert step == 1
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    assert "sha256" in caplog.text and str(target.relative_to(tmp_path / "2")) in caplog.text
    assert (tmp_path / "2.bad-0").is_dir()


def test_step_without_checksums_restores_with_a_warning(tmp_path, caplog):
    _save_steps(tmp_path, [1])
    (tmp_path / "1" / CHECKSUMS).unlink()  # an older version's checkpoint, or killed before hashing
    with caplog.at_level(logging.WARNING):
        assert Checkpointer(tmp_path).restore_latest(_state(0)).step == 1
    assert "no checksums" in caplog.text


def test_incomplete_save_is_ignored(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # What a save killed half-way leaves: an orbax temporary directory for step 3.
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\x00" * 10)
    step, _, data = Checkpointer(tmp_path).restore_latest(_state(0))[:3]
    assert step == 2 and data == {"next_index": 2}


def test_missing_files_step_falls_back(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for f in (tmp_path / "2").rglob("*"):
        if f.is_file():
            f.unlink()
    assert Checkpointer(tmp_path).restore_latest(_state(0)).step == 1


def test_bad_state_is_quarantined(tmp_path):
    """`is_bad` (the run layer's non-finite check) rejects a restored state: the next older step."""
    _save_steps(tmp_path, [1, 2])
    restored = Checkpointer(tmp_path).restore_latest(
        _state(0), is_bad=lambda s: "b is 2" if int(s["b"][0]) == 2 else None)
    assert restored.step == 1 and (tmp_path / "2.bad-0").is_dir()


def test_mismatch_is_refused_and_quarantines_nothing(tmp_path):
    _save_steps(tmp_path, [1, 2])

    def check(config, meta):
        raise ConfigError("config.seed", f"saved {config['seed']}")

    with pytest.raises(ConfigError, match="config.seed: saved 0"):
        Checkpointer(tmp_path).restore_latest(_state(0), check=check)
    other = {"w": jnp.zeros((64, 16)), "c": jnp.zeros(3)}
    with pytest.raises(ConfigError) as e:
        Checkpointer(tmp_path).restore_latest(other)
    assert "w: saved float32[64, 32], this run float32[64, 16]" in str(e.value)
    assert "b: saved, not in this run's state" in str(e.value) and "c: in this run's state, not saved" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved aside


_FAILING_SAVE = """
import resource, signal, sys, time
import jax.numpy as jnp, numpy as np
from glm5v_jax.train.checkpoint import Checkpointer, CheckpointSaveError
ck = Checkpointer(sys.argv[1], max_to_keep=5)
ck.save(1, {"w": jnp.zeros(256)}, {}, {}, force=True)
ck.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # files over 4 KiB: EFBIG, as a full disk fails a write
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
ck.save(2, {"w": jnp.asarray(np.random.default_rng(0).normal(size=256 * 256).astype(np.float32))}, {}, {}, force=True)
t0 = time.time()
while time.time() - t0 < 60:
    try:
        ck.poll()  # what the run loop calls every step
    except CheckpointSaveError as e:
        print("REPORTED", e)
        break
    time.sleep(0.02)
"""


def test_failed_async_save_is_reported_at_once(tmp_path):
    """A save that fails in the background (a write refused, as on a full disk) is reported by the
    next `poll` (the run loop's, every step), naming the step; the earlier step stays intact."""
    out = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert "REPORTED saving checkpoint step 2" in out.stdout, out.stderr[-3000:]
    assert "File too large" in out.stdout
    assert Checkpointer(tmp_path).restore_latest({"w": jnp.zeros(256)}).step == 1


def test_finished_saves_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="glm5v_jax.train.checkpoint"):
        _save_steps(tmp_path, [1, 2])
    assert "checkpoint step 1 saved in" in caplog.text and "checkpoint step 2: sha256 of" in caplog.text


def test_orbax_errors_reach_the_console_as_one_line():
    """`quiet_orbax_logs` (installed by the command line): an orbax record logged with a traceback
    through absl keeps its first line only."""
    from glm5v_jax.train.checkpoint import quiet_orbax_logs

    quiet_orbax_logs()
    quiet_orbax_logs()  # idempotent
    logger = logging.getLogger("absl")
    assert sum(type(f).__name__ == "_OneLineOrbax" for f in logger.filters) == 1
    try:
        raise ValueError("a tree mismatch\n" + "\n".join(f"  leaf {i}" for i in range(5000)))
    except ValueError:
        record = logger.makeRecord("absl", logging.ERROR, "/x/orbax/checkpoint/_src/handler.py", 1,
                                   "restore failed: %s", ("line one\nline two",), sys.exc_info())
    for f in logger.filters:
        f.filter(record)
    assert record.getMessage() == "restore failed: line one" and record.exc_info is None
    assert "\n" not in logging.Formatter().format(record)
