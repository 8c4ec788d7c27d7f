"""Checkpoints with orbax: async saves, automatic resume, and fallback past bad steps.

One `Checkpointer` per run directory holds four items per step: `state` (model and
optimizer, one pytree), `data` (the input iterator's JSON state), `config` (the
run's config as JSON) and `meta` (step, wall time). Restoring walks the finalized
steps from the newest down; a step that fails to restore (truncated or corrupted
files) is logged, moved aside to `<step>.bad-<n>` (never deleted) and the next
older step is tried. Incomplete saves (orbax temporary directories) are never
considered finalized, so they are skipped the same way.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from glm5v_jax.paths import as_path

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "meta")


class Checkpointer:
    """Save and restore (state pytree, data-iterator state, config) by step."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._max_to_keep = max_to_keep
        self._async = async_save
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, enable_async_checkpointing=self._async, create=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Start saving `step` (asynchronously); returns whether a save was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave({"step": int(step), "time": time.time()}),
        )
        return self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _quarantine(self, step: int) -> epath.Path:
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.bad-{n}").exists():
            n += 1
        if src.exists():
            src.rename(dst)
        return dst

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, config) of the newest step that restores, or None.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays
        giving the structure to restore into.
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ))
                if int(restored.meta["step"]) != step:
                    raise ValueError(f"meta says step {restored.meta['step']}")
            except Exception as e:  # noqa: BLE001 - any failure means: not a usable checkpoint
                moved = self._quarantine(step)
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved it to %s and "
                            "trying an older step", step, self.directory, type(e).__name__, str(e)[:300], moved)
                self._manager.close()
                self._manager = self._make_manager()
                continue
            log.info("restored checkpoint step %d from %s", step, self.directory)
            return step, restored.state, dict(restored.data), dict(restored.config)
        return None
