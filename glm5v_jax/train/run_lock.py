"""An exclusive lock on a run directory, so that two training runs never share one.

`RunLock(workdir)` holds the file `<workdir>/run.lock`, JSON naming the holder: host, pid, a random
token, start time and a heartbeat time that a daemon thread refreshes every `heartbeat_s`.

    with RunLock(workdir, enabled=jax.process_index() == 0):
        ...  # train

A second run on the same directory gets `ConfigError("workdir", ...)` naming the holder and what
to do. A lock left behind by a run that is gone is stale and taken over with a warning:
- same host: the holder's pid is not alive (or is a zombie, or is a later process that reuses the
  pid: its start time differs from the one recorded), or the host has rebooted since (boot id);
- another host, or another pid namespace of this host (containers that share the host name): its
  heartbeat is older than `stale_after_s` (host clocks are assumed in sync);
- unreadable (partial JSON left by a kill while writing): its mtime is older than `stale_after_s`.
A lock held by this very process (another RunLock on the same directory) is refused like any
other: sharing a run directory within one process is a bug, not re-entrance.

Local filesystems get an atomic create (`O_CREAT | O_EXCL`). A stale lock is removed under a guard
file (`run.lock.takeover`, also `O_EXCL`) and only if it still is the lock judged stale, so that a
slow taker never removes the fresh lock of a faster one; the lock is then created again with
`O_EXCL`: of runs racing to start, exactly one wins. Object stores (`gs://...`) have no
exclusive create through epath: the lock is written, read back after `REMOTE_SETTLE_S` and kept
only if it still holds our token. That is best effort: two runs starting within the settle time of
each other may both believe they won. Heartbeats check the token before rewriting the file; a
holder stalled for over `stale_after_s` can, in a narrow window, overwrite its taker's lock.

Only one process of a multi-host JAX run should take the lock: pass `enabled=False` elsewhere
(this module does not import jax).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from glm5v_jax.errors import ConfigError
from glm5v_jax.paths import as_path, is_uri

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
REMOTE_SETTLE_S = 2.0  # object stores: wait this long between writing the lock and reading it back
_ATTEMPTS = 50  # create / judge / take over rounds before giving up on a lock that keeps changing
_GUARD_STALE_S = 10.0  # a takeover guard file older than this was left by a taker that died


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of `pid` from /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
        return fields[0], fields[19]  # fields 3 (state) and 22 (starttime) of proc(5)
    except (OSError, IndexError):
        return None


def _read_text(path: str, link: bool = False) -> str | None:
    try:
        if link:
            return os.readlink(path)
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _identity() -> dict[str, str | None]:
    """What tells this process apart from a later one with its pid (Linux; None elsewhere)."""
    stat = _proc_stat(os.getpid())
    return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _read_text("/proc/self/ns/pid", link=True), "proc_start": stat[1] if stat else None}


def _differs(a: Any, b: Any) -> bool:
    """Both known and different."""
    return a is not None and b is not None and a != b


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    """Whether `pid` on this host is the live process that wrote a lock recording `proc_start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and (proc_start is None or start == proc_start)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class RunLock:
    """Exclusive lock on the run directory `workdir` (local or `gs://`): the file `run.lock`.

    `acquire()` raises ConfigError("workdir", ...) when a live run holds it; `release()` stops the
    heartbeat and deletes the file if it still holds our token. With `enabled=False` both do
    nothing (the processes of a multi-host run other than process 0).
    """

    def __init__(self, workdir: Any, *, enabled: bool = True, stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0):
        self.workdir = as_path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.enabled = enabled
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s)
        self.token = secrets.token_hex(16)
        self._local = not is_uri(workdir)
        self._held = False
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._io = threading.Lock()  # heartbeat writes vs release
        self._thread: threading.Thread | None = None
        self._lost_logged = False

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.workdir)!r}, held={self._held})"

    # ---- acquire / release ----

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        if self._held:
            raise RuntimeError(f"{self!r} is already acquired")
        self.workdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "started": now,
                      "heartbeat": now, **_identity()}
        for _ in range(_ATTEMPTS):
            if self._create():
                self._held = True
                self._start_heartbeat()
                return self
            raw = self._read()
            if raw is None:  # gone between our create and our read: try again
                continue
            reason = self._stale_reason(raw)  # raises ConfigError when held by a live run
            if self._remove_stale(raw):
                holder = _parse(raw) or {}
                log.warning("Taking over the stale lock %s of host %s, pid %s: %s", self.path,
                            holder.get("host", "?"), holder.get("pid", "?"), reason)
        raise ConfigError("workdir", f"could not take the lock {self.path}: it kept changing while other runs "
                          "started on this run directory; use another --workdir or retry")

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        with self._io:
            self._held = False
            try:
                if self._holds_token():
                    self._delete()
                else:
                    log.error("Not removing %s at release: it no longer holds this run's lock", self.path)
            except OSError as e:
                log.error("Could not remove the lock %s: %s", self.path, e)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None

    # ---- the file ----

    def _encode(self) -> bytes:
        return json.dumps(self._info, indent=1).encode()

    def _create(self) -> bool:
        """Write our lock if there is none; whether we hold it now."""
        if not self._local:
            if self.path.exists():
                return False
            self.path.write_bytes(self._encode())
            time.sleep(REMOTE_SETTLE_S)
            return self._holds_token()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._encode())
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _holds_token(self) -> bool:
        raw = self._read()
        return raw is not None and (_parse(raw) or {}).get("token") == self.token

    def _delete(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write_heartbeat(self) -> None:
        data = self._encode()
        if not self._local:
            self.path.write_bytes(data)
            return
        tmp = f"{self.path}.{self.token[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ---- staleness ----

    def _stale_reason(self, raw: bytes) -> str:
        """Why the lock `raw` is stale; ConfigError when its holder may still be running."""
        now = time.time()
        holder = _parse(raw)
        if holder is None:
            try:
                age = now - self.path.stat().mtime
            except FileNotFoundError:
                return "it is gone"
            if age > self.stale_after_s:
                return f"unreadable and last written {age:.0f} s ago"
            raise ConfigError("workdir", f"the lock file {self.path} is unreadable (not the JSON a run writes) and "
                              f"was written {age:.0f} s ago: another run may be starting on this run directory. "
                              f"Wait, use another --workdir, or delete {self.path} if you are sure no run uses it "
                              f"(it is taken over by itself after {self.stale_after_s:.0f} s)")
        host, pid = holder["host"], holder["pid"]
        age = now - holder["heartbeat"]
        me = _identity()
        if host == socket.gethostname() and not _differs(holder.get("pid_ns"), me["pid_ns"]):
            if _differs(holder.get("boot_id"), me["boot_id"]):
                return "its host has rebooted since"
            if not _pid_alive(pid, holder.get("proc_start")):
                return "its process is gone"
            who = "this very process (another RunLock on the same directory)" if pid == os.getpid() else "a live run"
        elif age > self.stale_after_s:
            return f"its last heartbeat is {age:.0f} s old (over {self.stale_after_s:.0f} s)"
        else:
            who = "a run on another host" if host != socket.gethostname() else "a run in another container"
        raise ConfigError("workdir", f"the run directory {self.workdir} is in use by {who}: the lock file "
                          f"{self.path} is held by host {host}, pid {pid}, started {_when(holder['started'])}, "
                          f"last heartbeat {max(age, 0.0):.0f} s ago. Wait for that run to finish, use another "
                          f"--workdir, or delete {self.path} if you are sure that run is gone")

    def _remove_stale(self, raw: bytes) -> bool:
        """Remove the lock judged stale from its contents `raw`, unless it has changed meanwhile; whether
        this call removed it. Locally under the guard file `run.lock.takeover` (O_EXCL), so that a taker
        that judged an older lock stale never removes the fresh lock of the taker that won."""
        if not self._local:
            if self._read() != raw:
                return False
            self._delete()
            return True
        guard = f"{self.path}.takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # another taker is at it: look again after it
            try:
                age = time.time() - os.stat(guard).st_mtime
            except FileNotFoundError:
                return False
            if age > _GUARD_STALE_S:  # left by a taker killed within these few lines
                log.warning("Removing %s, left %.0f s ago by a run that was taking over %s", guard, age, self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guard)
            else:
                time.sleep(0.01)
            return False
        try:
            if self._read() != raw:
                return False
            self._delete()
            return True
        finally:
            os.unlink(guard)

    # ---- heartbeat ----

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name=f"run-lock-heartbeat {self.path}",
                                        daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception as e:  # never kill the thread: the next beat may succeed
                log.warning("Run lock heartbeat on %s failed: %s", self.path, e)

    def _beat(self) -> None:
        with self._io:
            if self._stop.is_set():
                return
            raw = self._read()
            holder = None if raw is None else _parse(raw)
            if holder is None or holder.get("token") != self.token:
                if not self._lost_logged:
                    self._lost_logged = True
                    now_held = "gone" if raw is None else (
                        f"held by host {holder.get('host')}, pid {holder.get('pid')}" if holder else "unreadable")
                    log.error("Lost the run lock %s: it is %s. Another run may be writing to %s", self.path,
                              now_held, self.workdir)
                return
            self._info["heartbeat"] = time.time()
            self._write_heartbeat()


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lock's fields, or None when `raw` is not a complete lock."""
    try:
        info = json.loads(raw)
        if not (isinstance(info, dict) and isinstance(info.get("host"), str) and isinstance(info.get("pid"), int)
                and info["pid"] > 0 and isinstance(info.get("token"), str)
                and all(isinstance(info.get(k), (int, float)) for k in ("started", "heartbeat"))):
            return None
        return info
    except ValueError:
        return None
