"""Train-step time of several config variants, side by side in one process.

    python experiments/bench_step.py --configs "tiny,mmtp=image_token" "tiny,mmtp=visual_embed"

Each variant: trace+lower time, XLA compile time, best-of-N step time of the full
step (forward, backward, the config's optimizer: Muon by default, `optimizer=adamw`
for AdamW; router-bias update) on the same synthetic packed batch. Report ratios
against the first variant; absolute CPU seconds say little.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402
from glm5v_jax.data.synthetic import packed_vlm_batch  # noqa: E402
from glm5v_jax.models.build import vlm_spec_from_config  # noqa: E402
from glm5v_jax.models.vlm import GLM5V  # noqa: E402
from glm5v_jax.train.step import train_step  # noqa: E402
from glm5v_jax.train.vlm_pretrain import build_optimizer  # noqa: E402

IMAGE_SIZES = [(64, 128), (128, 64), (96, 96), (48, 160), (160, 48), (80, 120), (120, 80), (64, 64)]


def measure(config_arg: str, rows: int = 4, seq_len: int = 128, steps: int = 3) -> dict:
    """Timings of the train step of `configs/vlm_pretrain.py:<config_arg>`."""
    cfg = vlm_pretrain.get_config(config_arg)
    spec = vlm_spec_from_config(cfg.model)
    model = GLM5V(spec, rngs=nnx.Rngs(cfg.seed))
    opt, _, _ = build_optimizer(model, cfg.optim, cfg.total_steps)
    batch = jax.tree.map(jnp.asarray, packed_vlm_batch(
        rows=rows, seq_len=seq_len, vocab_size=spec.backbone.vocab_size, image_token_id=spec.image_token_id,
        image_sizes=IMAGE_SIZES[:rows], max_patches=spec.vision.max_patches))
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
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return dict(config=config_arg, trace_lower_s=t1 - t0, compile_s=t2 - t1, step_s=min(times),
                loss=float(metrics["loss/total"]), rows=rows, seq_len=seq_len, device=str(jax.devices()[0]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    rows = [measure(c, args.rows, args.seq_len, args.steps) for c in args.configs]
    base = rows[0]["step_s"]
    print(f"device: {rows[0]['device']}; batch {args.rows} x {args.seq_len}; best of {args.steps} steps")
    print("| config | compile (s) | step (s) | step vs first |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['config']}` | {r['compile_s']:.2f} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
