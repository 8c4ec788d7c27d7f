"""Compile time of the full train step vs backbone depth, and the tiny step time, on CPU.

    python experiments/bench_compile.py [--layers 4,8,24] [--out experiments/results/compile_time_cpu.md]

The layer stacks are scanned, so compile time should stay nearly flat with depth.
Each depth is measured in a fresh process (no compilation cache shared between them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(layers: int, rows: int, seq_len: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_step import measure as measure_step

    out = measure_step(f"tiny,layers={layers},dtype=float32", rows, seq_len, steps)
    return dict(out, layers=layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="4,8,24")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/compile_time_cpu.md"))
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.seq_len, args.steps)))
        return
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        out = subprocess.run([sys.executable, __file__, f"--child={n}", f"--rows={args.rows}",
                              f"--seq-len={args.seq_len}", f"--steps={args.steps}"],
                             capture_output=True, text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import jax
    lines = [
        "# Train-step compile time vs depth (tiny preset, float32, CPU)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}.",
        f"Batch: {args.rows} packed rows x {args.seq_len} tokens with images; full step "
        "(forward, backward, AdamW, router-bias update). Each depth in a fresh process.",
        "",
        "| backbone layers | trace+lower (s) | XLA compile (s) | step (s) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['layers']} | {r['trace_lower_s']:.2f} | {r['compile_s']:.2f} | {r['step_s']:.3f} |" for r in rows]
    base = rows[0]["compile_s"]
    lines += ["", "Compile time relative to the first row: " +
              ", ".join(f"{r['layers']} layers {r['compile_s'] / base:.2f}x" for r in rows)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
