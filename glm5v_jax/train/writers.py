"""Metric writers that need no TensorFlow: TensorBoard (tensorboardX) and JSON lines.

clu's `metric_writers` and `periodic_actions` import TensorFlow at import time
(see ../shared/reference/ecosystem.md), which would make TensorFlow a hard
dependency. These writers implement the same small interface as clu's
`MetricWriter` (`write_scalars`, `write_hparams`, `flush`, `close`), so the trainer
uses clu's API shape without TensorFlow; `clu.metrics` (TF-free) still does the
metric averaging.

Resume: a run killed after its last checkpoint (step S) logged steps S+1.. that the resumed run
logs again. Before it opens the writers, the run layer calls `rollback_jsonl(path, S)` (or -1 on a
fresh start) and opens `TensorBoardWriter(logdir, purge_step=S + 1)` (0 on a fresh start), so
neither metrics.jsonl nor TensorBoard shows a step twice.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from etils import epath

import numpy as np


log = logging.getLogger(__name__)


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class TensorBoardWriter:
    """Scalars and hparams into TensorBoard event files under `logdir`.

    `purge_step`: this writer's event file starts with a restart marker (a `SessionLog.START` event
    at that step), and TensorBoard hides the events at steps >= `purge_step` of the event files
    before it (those of a run killed after its last checkpoint). Pass the resumed step + 1, and 0
    on a fresh start: TensorBoard's Python loader (`--load_fast=false`) takes the first marker of a
    logdir for the initial start and purges only from the second on, so the first run must write
    one too. TensorBoard's default (Rust) loader instead drops, per tag, the earlier values at steps
    >= a step that goes backwards, with or without the marker.

    Each writer gets its own event file, named so that the files sort in the order they were opened:
    tensorboardX names a file by the second and the host only, so a second writer opened within the
    same second would truncate the first one's file, and TensorBoard reads a logdir's files in name
    order."""

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), flush_secs=10, purge_step=purge_step,
                                     filename_suffix=f".{time.time_ns():020d}")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, _scalar(value), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self._writer.add_text("hparams", json.dumps(flat, indent=1, sort_keys=True), 0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JsonlWriter:
    """One JSON object per write: {"step": n, <scalar>: value, ...} appended to a file. A local file
    is appended to; on an object store (`gs://`, which cannot append) the file is rewritten whole
    at each flush, rows written before (an earlier run of this directory) kept. A file whose last
    line is partial (a kill or a full disk mid-write) gets a newline first, so that the partial
    line stays a line of its own, which `read_jsonl` skips, and the new rows parse."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self._local = "://" not in str(path)
        if self._local:
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell() > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._file.write("\n")
        else:
            self._text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self._dirty = False
            if self._text and not self._text.endswith("\n"):
                self._text, self._dirty = self._text + "\n", True

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        for name, value in scalars.items():
            x = _scalar(value)
            row[name] = x if math.isfinite(x) else str(x)
        line = json.dumps(row, sort_keys=True) + "\n"
        if self._local:
            self._file.write(line)
        else:
            self._text, self._dirty = self._text + line, True

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        if self._local:
            self._file.flush()
        elif self._dirty:
            self.path.write_text(self._text, encoding="utf-8")
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._local:
            self._file.close()


class MultiWriter:
    """Fan a write out to several writers."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def _parse_jsonl(text: str) -> tuple[list[tuple[str, dict]], int]:
    """(line, row) for each row of a metrics.jsonl text, and the number of unparsable lines (a
    partial line left by a kill or a full disk, or anything that is not a JSON object with an
    integer "step"). Blank lines are neither."""
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append((line, row))
        else:
            bad += 1
    return rows, bad


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl, by step; for a step logged twice (after a resume) the last row wins.
    Unparsable lines are skipped, with one warning."""
    rows, bad = _parse_jsonl(epath.Path(path).read_text(encoding="utf-8"))
    if bad:
        log.warning("%s: skipped %d unparsable line(s)", path, bad)
    by_step: dict[int, dict] = {}
    for _, row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def rollback_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Rewrites a metrics.jsonl keeping only its rows at steps <= `last_step`, in their order, and
    returns the number of rows dropped; unparsable lines are dropped too (and logged, not counted).
    Called before the writers open: with the resumed step, or -1 on a fresh start. A fresh start
    (`last_step` < 0) in a directory with rows moves the file to `<name>.before-restart-<n>`
    (n = 1, 2, ...: the first free) instead of losing it. A local file is replaced atomically (a
    temporary file beside it, then `os.replace`); an object store (`gs://`) object is rewritten
    whole. A missing file is left missing."""
    path = epath.Path(path)
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    rows, bad = _parse_jsonl(text)
    kept = [line for line, row in rows if row["step"] <= last_step]
    dropped = len(rows) - len(kept)
    if bad:
        log.warning("%s: dropped %d unparsable line(s)", path, bad)
    if last_step < 0 and rows:
        n = 1
        while (backup := path.with_name(f"{path.name}.before-restart-{n}")).exists():
            n += 1
        path.rename(backup)
        log.info("%s: fresh start, the %d rows of an earlier run moved to %s", path, dropped, backup.name)
        return dropped
    new_text = "".join(line + "\n" for line in kept)
    if new_text == text:
        return 0
    if "://" in str(path):
        path.write_text(new_text, encoding="utf-8")
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(new_text)
                f.flush()
                os.fsync(f.fileno())
            shutil.copymode(path, tmp)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)  # a full disk, say: the metrics.jsonl is left as it was
            raise
    if dropped:
        log.info("%s: dropped %d rows after step %d (logged again after the resume)", path, dropped, last_step)
    return dropped


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """PNG of the training loss (total, main, per-depth MTP) and the validation losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    wanted = ("train/loss/main", "train/loss/mtp_", "eval/loss/total", "eval/loss/main", "eval/loss/mtp_")
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith(wanted)})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="o" if key.startswith("eval") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    epath.Path(out_png).write_bytes(buffer.getvalue())


def eval_table(rows: list[dict], step: int) -> str:
    """Markdown table of every eval metric at step 0 (the starting point: random init, or the
    `init_from` checkpoint) and at `step`."""
    first = next((r for r in rows if r["step"] == 0), {})
    last = next((r for r in rows if r["step"] == step), {})
    keys = sorted(k for k in last if k.startswith("eval/"))

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    lines = [f"| metric | step 0 (start) | step {step} |", "|---|---|---|"]
    lines += [f"| {k.removeprefix('eval/')} | {fmt(first.get(k))} | {fmt(last[k])} |" for k in keys]
    return "\n".join(lines)


def write_eval_table(workdir: str | os.PathLike, step: int) -> str:
    """Writes `<workdir>/eval_table.md` (step 0 vs `step`, from metrics.jsonl) and returns it."""
    workdir = epath.Path(workdir)
    table = eval_table(read_jsonl(workdir / "metrics.jsonl"), step)
    (workdir / "eval_table.md").write_text(table + "\n")
    return table


def write_result_files(out_dir: str | os.PathLike, name: str, text: str, result: Mapping[str, Any]) -> list[str]:
    """An experiment's report `<out_dir>/<name>.md` and its numbers `<name>.json` (`json_default`); the paths."""
    stem = os.path.join(os.fspath(out_dir), name)
    os.makedirs(os.fspath(out_dir), exist_ok=True)
    files = [stem + ".md", stem + ".json"]
    epath.Path(files[0]).write_text(text)
    epath.Path(files[1]).write_text(json.dumps(result, indent=1, default=json_default) + "\n")
    return files


def json_default(x: Any) -> Any:
    """`json.dumps(..., default=json_default)` for result files: non-finite floats as null, tuples and sets
    as lists, numpy scalars as Python numbers, anything else as its string."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
