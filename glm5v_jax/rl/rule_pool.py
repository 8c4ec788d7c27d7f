"""Rule verifiers in worker processes, each call under a wall-clock deadline.

    pool = RulePool(workers=2, timeout_s=5.0, preload=("glm5v_jax.rl.verifiers",))
    out = pool.run(fn, response, reference)   # Outcome(status "ok" | "timeout" | "error", value, message, seconds)
    pool.close()

Why not signals: `signal.alarm` timeouts (math-verify's) only work in the main thread and fail inside the
threads and workers of an RL pipeline. Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one
call, and a killed worker breaks the whole pool. Why not `multiprocessing` at all: its "spawn" and
"forkserver" start methods re-import the parent's `__main__` in every worker (a trainer's main imports jax:
seconds and hundreds of MB per worker), and "fork" is unsafe in a process that holds XLA's threads.

So each worker is a fresh interpreter (`python -m glm5v_jax.rl.rule_pool`, started with fork+exec, which is
safe in a threaded parent) that imports only this module and the verifiers' modules, and serves one call at
a time over a pair of pipes (length-prefixed pickles; the worker's stdout stays free for prints). A call
whose reply does not arrive by its deadline is cut there: that worker is killed and replaced, the call
scores "timeout". A verifier that raises (or returns something that is not a number) scores "error"; a
worker that dies is replaced and its call scores "error". Verifiers must be picklable module-level
functions outside `__main__` (the worker imports them by name).

The deadline (and `Outcome.seconds`) counts from the moment the call reaches an idle, started worker:
waiting for a free worker or for a fresh worker's start does not count.
A worker that outlives its parent (a parent killed by SIGKILL) exits when it notices: its read of the pipe
ends, or, while a verifier runs, a watchdog thread sees the parent gone.
"""
from __future__ import annotations

import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Sequence

_HEADER = struct.Struct("<Q")
_READY = b"ready"
START_TIMEOUT_S = 120.0  # a worker's interpreter start and preload imports


class Outcome(NamedTuple):
    """One call: status "ok" | "timeout" | "error", the value (0.0 unless ok), why (for errors), wall seconds."""

    status: str
    value: float
    message: str
    seconds: float


# --------------------------------------------------------------------------------- framing
def _write(fd: int, payload: bytes) -> None:
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    parts = []
    while n:
        if deadline is not None:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read(fd: int, deadline: float | None = None) -> bytes:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return _read_exact(fd, n, deadline)


# --------------------------------------------------------------------------------- the worker side
def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _serve(rfd: int, wfd: int, parent: int, preload: Sequence[str]) -> None:
    """The worker: import `preload`, say ready, then answer calls until the parent closes the pipe."""
    import importlib
    import math

    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    for name in preload:
        importlib.import_module(name)
    _write(wfd, _READY)
    while True:
        try:
            payload = _read(rfd)
        except EOFError:
            return
        try:
            fn, response, reference = pickle.loads(payload)
            value = float(fn(response, reference))
            reply = ("ok", value, "") if math.isfinite(value) else ("error", 0.0, f"returned {value}")
        except Exception as e:  # noqa: BLE001 - any verifier failure is a scored "error", never a crash
            reply = ("error", 0.0, f"{type(e).__name__}: {e}"[:500])
        _write(wfd, pickle.dumps(reply))


# --------------------------------------------------------------------------------- the parent side
def _environment() -> dict[str, str]:
    """The parent's environment, with its sys.path as PYTHONPATH (as multiprocessing's spawn passes it), so
    the worker finds the verifiers' modules wherever the parent found them."""
    paths = [p or os.getcwd() for p in sys.path]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self, preload: Sequence[str]):
        req_r, self.to = os.pipe()
        self.frm, rep_w = os.pipe()
        args = [sys.executable, "-m", "glm5v_jax.rl.rule_pool", str(req_r), str(rep_w), str(os.getpid()),
                ",".join(preload)]
        try:
            self.proc = subprocess.Popen(args, pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL,
                                         env=_environment(), close_fds=True)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.ready = False

    def wait_ready(self) -> None:
        """Wait for the worker's start (its preload imports); EOFError/TimeoutError if it does not start."""
        if not self.ready:
            if _read(self.frm, time.monotonic() + START_TIMEOUT_S) != _READY:
                raise EOFError("worker did not start")
            self.ready = True

    def call(self, fn: Callable, response: str, reference: Mapping[str, Any], timeout_s: float) -> tuple:
        """(status, value, message); raises TimeoutError past `timeout_s`, EOFError/OSError if the worker died."""
        _write(self.to, pickle.dumps((fn, response, reference)))
        return pickle.loads(_read(self.frm, time.monotonic() + timeout_s))

    def kill(self) -> None:
        for fd in (self.to, self.frm):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _kill_all(workers: set) -> None:
    for w in list(workers):
        w.kill()
    workers.clear()


class RulePool:
    """`workers` verifier processes (started on first use); `run` blocks until a worker is free."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, preload: Sequence[str] = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers, self.timeout_s, self.preload = workers, float(timeout_s), tuple(preload)
        self.restarts = 0  # workers killed (timeouts) or lost (crashes) and replaced
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._all)  # also at interpreter exit

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("RulePool is closed")
            if not self._started:
                for _ in range(self.workers):
                    self._add()
                self._started = True

    def _add(self) -> None:
        w = _Worker(self.preload)
        self._all.add(w)
        self._idle.put(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)
            self.restarts += 1
            if not self._closed:
                self._add()

    def run(self, fn: Callable, response: str, reference: Mapping[str, Any],
            timeout_s: float | None = None) -> Outcome:
        """`fn(response, reference)` in a worker, cut at `timeout_s` (default: the pool's) of wall time."""
        self._start()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        w = self._idle.get()
        if w is None:  # closed while waiting
            self._idle.put(None)
            raise RuntimeError("RulePool is closed")
        t0 = time.perf_counter()
        try:
            w.wait_ready()  # a fresh worker's start counts neither toward the deadline nor the seconds
            t0 = time.perf_counter()
            status, value, message = w.call(fn, response, reference, timeout_s)
        except TimeoutError:
            self._replace(w)
            return Outcome("timeout", 0.0, f"no answer in {timeout_s:g} s", time.perf_counter() - t0)
        except (EOFError, OSError) as e:
            code = w.proc.poll()
            self._replace(w)
            return Outcome("error", 0.0, f"worker died (exit code {code}): {type(e).__name__}",
                           time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - e.g. the verifier or its arguments do not pickle
            self._idle.put(w)
            return Outcome("error", 0.0, f"{type(e).__name__}: {e}"[:500], time.perf_counter() - t0)
        self._idle.put(w)
        return Outcome(status, value, message, time.perf_counter() - t0)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        with self._lock:
            self._closed = True
        self._finalizer()
        self._idle.put(None)  # wakes the callers waiting for a worker


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), [m for m in sys.argv[4].split(",") if m])
