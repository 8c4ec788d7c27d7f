"""The run-directory lock (glm5v_jax.train.run_lock): one run per directory; a second one is refused
with a ConfigError naming the holder; locks of dead processes, of silent hosts and half-written
ones are taken over; the heartbeat moves; racing runs leave exactly one winner."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from glm5v_jax.errors import ConfigError, config_error_line
from glm5v_jax.train import run_lock as run_lock_lib
from glm5v_jax.train.run_lock import LOCK_NAME, RunLock

# A child that takes the lock on argv[1], prints WON or REFUSED, and keeps what it got until its
# stdin closes. With argv[2], it first waits for that file to appear (a common start line).
CHILD = """
import os, sys, time
from glm5v_jax.errors import ConfigError
from glm5v_jax.train.run_lock import RunLock
if len(sys.argv) > 2:
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
lock = RunLock(sys.argv[1], heartbeat_s=0.05)
try:
    lock.acquire()
    print("WON", flush=True)
except ConfigError as e:
    print("REFUSED", e, flush=True)
sys.stdin.read()
lock.release()
"""


def _child(workdir, *start_file) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(workdir), *map(str, start_file)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **fields) -> str:
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": "someone-else", "started": now,
            "heartbeat": now, **fields}
    path = os.path.join(workdir, LOCK_NAME)
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def _read(workdir) -> dict:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
        return json.load(f)


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    workdir = tmp_path / "run"  # created by the lock
    with RunLock(workdir) as lock:
        assert lock.held
        info = _read(workdir)
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["token"] == lock.token and info["heartbeat"] >= info["started"]
    assert not lock.held and not (workdir / LOCK_NAME).exists()
    with RunLock(workdir):  # free again
        pass
    lock.release()  # a second release is a no-op


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path) as lock:
        with pytest.raises(ConfigError) as e:
            RunLock(tmp_path).acquire()
        assert e.value.field == "workdir"
        line = config_error_line(e.value)
        assert str(tmp_path / LOCK_NAME) in line and f"pid {os.getpid()}" in line and "\n" not in line
        assert "this very process" in line and "--workdir" in line
        with pytest.raises(RuntimeError):
            lock.acquire()
        assert _read(tmp_path)["token"] == lock.token  # the refused one left the lock alone


def test_disabled_lock_does_nothing(tmp_path):
    with RunLock(tmp_path, enabled=False) as lock:
        assert not lock.held and not (tmp_path / LOCK_NAME).exists()
        with RunLock(tmp_path):
            pass


def test_a_dead_pid_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING, logger=run_lock_lib.__name__):
        with RunLock(tmp_path) as lock:
            assert _read(tmp_path)["token"] == lock.token
    assert any(f"pid {pid}" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)


def test_a_reused_pid_or_a_reboot_is_not_the_holder(tmp_path):
    me = run_lock_lib._identity()
    if None in me.values():
        pytest.skip("no /proc")
    _write_lock(tmp_path, **me)
    with pytest.raises(ConfigError):
        RunLock(tmp_path).acquire()
    _write_lock(tmp_path, **{**me, "proc_start": "1"})  # our pid, but a process that started at another time
    with RunLock(tmp_path):
        pass
    _write_lock(tmp_path, **{**me, "boot_id": "another-boot"})
    with RunLock(tmp_path):
        pass


def test_another_pid_namespace_of_this_host_counts_as_another_host(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), pid_ns="pid:[1]")  # its pid means nothing here: go by heartbeat
    with pytest.raises(ConfigError, match="another container"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    _write_lock(tmp_path, pid=_dead_pid(), pid_ns="pid:[1]", heartbeat=time.time() - 120)
    with RunLock(tmp_path, stale_after_s=60):
        pass


def test_a_live_process_lock_refuses_until_it_is_killed(tmp_path, caplog):
    child = _child(tmp_path)
    try:
        assert child.stdout.readline().startswith("WON")
        with pytest.raises(ConfigError, match=f"pid {child.pid}.*last heartbeat"):
            RunLock(tmp_path).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
    assert _read(tmp_path)["pid"] == child.pid  # left behind
    with caplog.at_level(logging.WARNING, logger=run_lock_lib.__name__):
        with RunLock(tmp_path):
            pass
    assert any(f"pid {child.pid}" in r.getMessage() for r in caplog.records)


def test_a_takeover_guard_left_by_a_dead_taker_is_removed(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid())
    guard = tmp_path / f"{LOCK_NAME}.takeover"
    guard.touch()
    old = time.time() - 60
    os.utime(guard, (old, old))
    with caplog.at_level(logging.WARNING, logger=run_lock_lib.__name__):
        with RunLock(tmp_path) as lock:
            assert _read(tmp_path)["token"] == lock.token and not guard.exists()
    assert any("takeover" in r.getMessage() for r in caplog.records)


def test_another_hosts_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
    _write_lock(tmp_path, host="other-host", pid=1, started=time.time() - 3600, heartbeat=time.time() - 5)
    with pytest.raises(ConfigError, match="host other-host, pid 1, started .*last heartbeat 5 s ago"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    _write_lock(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 120)
    with RunLock(tmp_path, stale_after_s=60) as lock:
        assert _read(tmp_path)["token"] == lock.token


def test_a_partial_lock_file_refuses_while_fresh_and_is_taken_when_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "x", "pi')
    with pytest.raises(ConfigError, match=f"{path}.* unreadable"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with RunLock(tmp_path, stale_after_s=60) as lock:
        assert _read(tmp_path)["token"] == lock.token


def test_the_heartbeat_moves_and_stops_when_the_lock_is_taken(tmp_path, caplog):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    first = _read(tmp_path)
    time.sleep(0.3)
    later = _read(tmp_path)
    assert later["heartbeat"] > first["heartbeat"]
    assert {k: v for k, v in later.items() if k != "heartbeat"} == {k: v for k, v in first.items() if k != "heartbeat"}
    with caplog.at_level(logging.ERROR, logger=run_lock_lib.__name__):
        _write_lock(tmp_path, host="intruder", pid=1)  # someone else took it meanwhile
        time.sleep(0.3)
        lock.release()
    assert _read(tmp_path)["host"] == "intruder"  # neither rewritten by the heartbeat nor removed
    lost = [r for r in caplog.records if "Lost the run lock" in r.getMessage()]
    assert len(lost) == 1 and "intruder" in lost[0].getMessage()
    assert not lock._thread  # stopped


def test_object_store_path_writes_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock_lib, "REMOTE_SETTLE_S", 0.0)
    lock, other = RunLock(tmp_path, heartbeat_s=0.05), RunLock(tmp_path)
    lock._local = other._local = False  # the epath branch that gs:// takes, on a local directory
    with lock:
        time.sleep(0.2)
        assert _read(tmp_path)["token"] == lock.token and _read(tmp_path)["heartbeat"] > _read(tmp_path)["started"]
        with pytest.raises(ConfigError, match=LOCK_NAME):
            other.acquire()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale_lock"])
def test_racing_runs_leave_exactly_one_winner(tmp_path, stale):
    if stale:
        _write_lock(tmp_path, pid=_dead_pid())
    start = tmp_path / "start"
    children = [_child(tmp_path, start) for _ in range(4)]
    try:
        time.sleep(0.5)  # all started and spinning on the start line
        start.touch()
        results = [child.stdout.readline().split()[0] for child in children]
        assert sorted(results) == ["REFUSED"] * 3 + ["WON"], results
        winner = children[results.index("WON")]
        assert _read(tmp_path)["pid"] == winner.pid
        assert [p.name for p in tmp_path.iterdir() if p.name != "start"] == [LOCK_NAME]  # nothing left aside
    finally:
        for child in children:
            child.stdin.close()
            child.wait(timeout=10)
    assert not (tmp_path / LOCK_NAME).exists()  # the winner released it
