"""Metric writers that need no TensorFlow: TensorBoard (tensorboardX) and JSON lines.

clu's `metric_writers` and `periodic_actions` import TensorFlow at import time
(see ../shared/reference/ecosystem.md), which would make TensorFlow a hard
dependency. These writers implement the same small interface as clu's
`MetricWriter` (`write_scalars`, `write_hparams`, `flush`, `close`), so the trainer
uses clu's API shape without TensorFlow; `clu.metrics` (TF-free) still does the
metric averaging.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Mapping

from etils import epath

import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class TensorBoardWriter:
    """Scalars and hparams into TensorBoard event files under `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), flush_secs=10)

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
    at each flush, rows written before (an earlier run of this directory) kept."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self._local = "://" not in str(path)
        if self._local:
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self._dirty = False

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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl; for a step logged twice (after a resume) the last row wins."""
    by_step: dict[int, dict] = {}
    for line in epath.Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


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
