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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(layers: int, rows: int, seq_len: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(ROOT / "configs"))
    import vlm_pretrain
    from glm5v_jax.data.synthetic import packed_vlm_batch
    from glm5v_jax.models.build import vlm_spec_from_config
    from glm5v_jax.models.vlm import GLM5V
    from glm5v_jax.train.step import make_optimizer, train_step

    cfg = vlm_pretrain.get_config(f"tiny,layers={layers},dtype=float32")
    spec = vlm_spec_from_config(cfg.model)
    model = GLM5V(spec, rngs=nnx.Rngs(0))
    opt = make_optimizer(model, cfg.train.learning_rate)
    batch = jax.tree.map(jnp.asarray, packed_vlm_batch(
        rows=rows, seq_len=seq_len, vocab_size=spec.backbone.vocab_size, image_token_id=spec.image_token_id,
        image_sizes=[(64, 128), (128, 64), (96, 96), (48, 160)][:rows], max_patches=spec.vision.max_patches))
    graphdef, state = nnx.split((model, opt))

    def pure_step(state, batch):
        m, o = nnx.merge(graphdef, state)
        metrics = train_step(m, o, batch)
        return nnx.state((m, o)), metrics

    t0 = time.perf_counter()
    lowered = jax.jit(pure_step, donate_argnums=0).lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return dict(layers=layers, trace_lower_s=t1 - t0, compile_s=t2 - t1, step_s=min(times),
                loss=float(m["loss/total"]), rows=rows, seq_len=seq_len)


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
