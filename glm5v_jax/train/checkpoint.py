"""Checkpoints with orbax: async saves, checksums, automatic resume, fallback past bad steps.

One `Checkpointer` per run directory holds four items per step: `state` (model and optimizer,
one pytree), `data` (the input iterator's JSON state), `config` (the run's config as JSON) and
`meta` (step, wall time, fingerprints such as the tokenizer's hash).

Saving is asynchronous. `poll()` (the run loop calls it every step) notices a finished save at
once: it logs it, or reports a failed one, and hashes the step's files (sha256, in a background
thread) into `<step>/checksums.json`.

Restoring walks the finalized steps from the newest down, and for each:
  1. reads `meta`, `config` and `data`, and verifies the files against `checksums.json`;
  2. `check(saved config, saved meta)` -- the caller's compatibility check; a ConfigError it raises
     (an incompatible config, another tokenizer) propagates: a mismatch is never treated as damage;
  3. compares the saved tree (paths, shapes, dtypes) with the one asked for (ConfigError naming
     the differing paths);
  4. restores the arrays and asks `is_bad(state)` (e.g. non-finite leaves).
A step that fails 1, 4 or `is_bad` is damaged: it is logged, moved aside to `<step>.bad-<n>` (never
deleted) and the next older step is tried. Incomplete saves (orbax temporary directories) are
never finalized, so they are skipped the same way. A step saved without checksums (by an older
version, or killed between the save and the hashing) is restored with a warning.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError, RunError
from glm5v_jax.paths import as_path

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "meta")
CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20


class _OneLineOrbax(logging.Filter):
    """Orbax's records (through absl) as one short line each: no tracebacks (thousands of lines for
    one tree mismatch) -- the Checkpointer reports what failed, naming the step and file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            text = record.getMessage()
            record.msg, record.args = text.splitlines()[0][:300] if text else text, ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_orbax_logs() -> None:
    """Install `_OneLineOrbax` on the absl logger (the command line does; idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OneLineOrbax) for f in logger.filters):
        logger.addFilter(_OneLineOrbax())


class Restored(NamedTuple):
    """A restored step: the state, the data iterator's state, and the config and meta saved with it."""

    step: int
    state: Any
    data: dict
    config: dict
    meta: dict


class CheckpointSaveError(RunError):
    """An asynchronous save failed (disk full, permissions, ...); earlier steps are intact."""


def file_sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def step_files(step_dir: epath.Path) -> list[str]:
    """Every file under `step_dir` (relative paths, sorted), the checksum file excepted."""
    out, todo = [], [step_dir]
    while todo:  # epath has no recursive glob on object stores
        for path in todo.pop().iterdir():
            if path.is_dir():
                todo.append(path)
            elif (rel := str(path.relative_to(step_dir))) != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def write_checksums(step_dir: epath.Path) -> tuple[int, float]:
    """`<step_dir>/checksums.json`: {relative path: [bytes, sha256]} of every file; atomic where the
    file system allows. Returns (bytes hashed, seconds)."""
    step_dir = as_path(step_dir)
    t0, sums, total = time.time(), {}, 0
    for rel in step_files(step_dir):
        path = step_dir / rel
        size = path.stat().length
        sums[rel] = [size, file_sha256(path)]
        total += size
    text = json.dumps({"algorithm": "sha256", "files": sums}, indent=0, sort_keys=True)
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(text)
    tmp.rename(step_dir / CHECKSUMS)
    return total, time.time() - t0


def verify_checksums(step_dir: epath.Path) -> str | None:
    """None when every recorded file is present with its size and sha256 (or no checksums were
    recorded); else what is wrong, naming the file."""
    step_dir = as_path(step_dir)
    record = step_dir / CHECKSUMS
    if not record.exists():
        return None
    files = json.loads(record.read_text())["files"]
    for rel, (size, digest) in sorted(files.items()):
        path = step_dir / rel
        if not path.exists():
            return f"{rel} is missing"
        if path.stat().length != size:
            return f"{rel} has {path.stat().length} bytes, {size} were saved"
        if file_sha256(path) != digest:
            return f"{rel} does not match its sha256 recorded at save"
    return None


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a/b/c": (shape, dtype)} of a pytree of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
    def is_leaf(x):  # arrays and metadata; an nnx Variable also has .shape, but holds its array as .value
        return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, nnx.Variable)

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(_key(k) for k in path): (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
            for path, leaf in flat if hasattr(leaf, "shape")}


def structure_differences(saved: Any, target: Any, limit: int = 8) -> list[str]:
    """Paths whose presence, shape or dtype differ between a saved tree's metadata and `target`."""
    a, b = _leaf_specs(saved), _leaf_specs(target)
    out = [f"{p}: saved, not in this run's state" for p in sorted(a.keys() - b.keys())]
    out += [f"{p}: in this run's state, not saved" for p in sorted(b.keys() - a.keys())]
    out += [f"{p}: saved {a[p][1]}{list(a[p][0])}, this run {b[p][1]}{list(b[p][0])}"
            for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


class Checkpointer:
    """Save and restore (state pytree, data-iterator state, config, meta) by step."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
                 checksums: bool = True):
        self.directory = as_path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._max_to_keep = max_to_keep
        self._async = async_save
        self._checksums = checksums and jax.process_index() == 0
        self._manager = self._make_manager()
        self._pending: tuple[int, float] | None = None  # (step, start time) of the save in flight
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checksums")
        self._hashing: list[concurrent.futures.Future] = []
        self.saved: list[dict] = []  # {"step", "seconds", "bytes", "hash_seconds"} of each finished save

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, enable_async_checkpointing=self._async, create=True)
        handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                        config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, data_state: dict, config: dict, *, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving `step` (asynchronously); returns whether a save was started."""
        self.poll(wait=True)  # orbax waits for the previous save anyway: report it first
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(dict(meta or {}, step=int(step), time=time.time())),
        )
        started = self._manager.save(step, args=args, force=force)
        if started:
            self._pending = (int(step), time.time())
        return started

    def poll(self, *, wait: bool = False) -> None:
        """Report the save in flight if it has finished (`wait`: wait for it): a log line, and its
        checksums started; a failed save raises CheckpointSaveError at once."""
        if self._pending is None or (not wait and self._manager.is_saving_in_progress()):
            return
        try:  # returns at once when the save is over; re-raises its error (check_for_errors does not)
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(e)
        step, t0 = self._pending
        self._pending = None
        record = {"step": step, "seconds": time.time() - t0}
        self.saved.append(record)
        log.info("checkpoint step %d saved in %s (%.1f s)", step, self.directory, record["seconds"])
        if self._checksums:
            self._hashing.append(self._hasher.submit(self._hash_step, step, record))

    def _failed(self, error: Exception) -> None:
        step = self._pending[0] if self._pending else "?"
        self._pending = None
        raise CheckpointSaveError(f"saving checkpoint step {step} in {self.directory} failed: "
                                  f"{type(error).__name__}: {str(error)[:500]} (the steps saved before are "
                                  "intact; rerunning resumes from the newest)") from None

    def _hash_step(self, step: int, record: dict) -> None:
        step_dir = self.directory / str(step)
        try:
            record["bytes"], record["hash_seconds"] = write_checksums(step_dir)
        except FileNotFoundError:  # removed by max_to_keep while hashing
            return
        except Exception as e:  # noqa: BLE001 - a step without checksums still restores (with a warning)
            log.warning("could not record checksums of checkpoint step %d: %s", step, e)
            return
        log.info("checkpoint step %d: sha256 of %.1f MiB in %.2f s", step, record["bytes"] / 2**20,
                 record["hash_seconds"])

    def wait(self) -> None:
        self.poll(wait=True)
        for future in self._hashing:
            future.result()
        self._hashing.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._hasher.shutdown(wait=True)
            self._manager.close()

    # ------------------------------------------------------------------ restoring
    def _quarantine(self, step: int) -> epath.Path:
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.bad-{n}").exists():
            n += 1
        if src.exists() and jax.process_index() == 0:
            src.rename(dst)
        return dst

    def _damaged(self, step: int, reason: str) -> None:
        moved = self._quarantine(step)
        log.warning("checkpoint step %d in %s is damaged (%s); moved it to %s and trying an older step",
                    step, self.directory, reason, moved)
        self._manager.close()
        self._manager = self._make_manager()

    def restore_latest(self, abstract_state: Any, *, check: Callable[[dict, dict], None] | None = None,
                       is_bad: Callable[[Any], str | None] | None = None,
                       ) -> Restored | None:
        """The newest good step (step, state, data, config, meta), or None.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays giving
        the structure to restore into. `check(config, meta)` may raise ConfigError (propagated);
        `is_bad(state)` returns why a restored state must not be used (None: good).
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        for step in reversed(self.all_steps()):
            try:
                side = self._manager.restore(step, args=ocp.args.Composite(
                    data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                if int(side.meta["step"]) != step:
                    raise ValueError(f"meta says step {side.meta['step']}")
                problem = verify_checksums(self.directory / str(step))
            except Exception as e:  # noqa: BLE001 - unreadable side items: damage
                problem = f"{type(e).__name__}: {str(e)[:300]}"
            if problem is not None:
                self._damaged(step, problem)
                continue
            if check is not None:
                check(dict(side.config), dict(side.meta))
            try:
                saved = self._manager.item_metadata(step).state
            except Exception as e:  # noqa: BLE001
                self._damaged(step, f"unreadable metadata: {type(e).__name__}: {str(e)[:300]}")
                continue
            saved = saved.tree if hasattr(saved, "tree") else saved
            differences = structure_differences(saved, target) if saved is not None else []
            if differences:
                raise ConfigError("config", f"checkpoint step {step} in {self.directory} does not fit this run's "
                                            "model or optimizer: " + "; ".join(differences))
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
                state = self._manager.restore(step, args=args).state
                problem = is_bad(state) if is_bad is not None else None
            except Exception as e:  # noqa: BLE001 - truncated or corrupted arrays
                problem = f"{type(e).__name__}: {str(e)[:300]}"
            if problem is not None:
                self._damaged(step, problem)
                continue
            if not (self.directory / str(step) / CHECKSUMS).exists():
                log.warning("checkpoint step %d has no checksums (saved by an older version, or the run stopped "
                            "before hashing it): restored unverified", step)
            log.info("restored checkpoint step %d from %s", step, self.directory)
            return Restored(step, state, dict(side.data), dict(side.config), dict(side.meta))
        return None
