"""Muon vs AdamW on the tiny preset: steps to a target validation loss, each tuned on a grid.

    python experiments/muon_vs_adamw.py --steps 200 --lrs 1e-3,3e-3,1e-2

1. AdamW: every group's `lr` scaled to each grid value (vision keeps its 0.5x ratio).
2. Muon: every group's `muon_lr` on the same grid; the AdamW branch (embeddings, head,
   norms, biases) uses AdamW's best LR from step 1, so only the matrix optimizer differs.
Both use the preset's warmup and cosine schedule over the same number of steps, the
same data order (seed) and the same evaluation batches. The best run of each optimizer
(lowest final validation loss) is compared by the first evaluation step at which its
validation loss reaches the target: by default the higher of the two best final losses,
so that both reach it. Writes `experiments/results/muon_vs_adamw_cpu.{md,png}` and the
raw curves as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402
from glm5v_jax.train.run import train_and_evaluate  # noqa: E402
from glm5v_jax.train.writers import read_jsonl  # noqa: E402

GROUP_RATIO = {"vision": 0.5, "projector": 1.0, "text": 1.0}  # the preset's per-group ratios


def run(optimizer: str, lr: float, adam_lr: float, args, workdir: Path) -> dict:
    """Train one configuration; returns {step: eval total loss} and timing."""
    cfg = vlm_pretrain.get_config(f"tiny,optimizer={optimizer}")
    cfg.total_steps = args.steps
    cfg.eval_every = args.eval_every
    cfg.log_every = args.eval_every
    cfg.checkpoint_every = args.steps
    cfg.measure_pipeline_batches = 0
    cfg.data.data_dir = str(args.data_dir)
    cfg.data.eval_batches = args.eval_batches
    for name, ratio in GROUP_RATIO.items():
        group = cfg.optim.groups[name]
        group.lr = adam_lr * ratio
        group.muon_lr = lr * ratio
        group.warmup_steps = max(1, args.steps // 10)
    shutil.rmtree(workdir, ignore_errors=True)  # never resume an older run
    t0 = time.time()
    train_and_evaluate(cfg, str(workdir))
    rows = read_jsonl(workdir / "metrics.jsonl")
    curve = {r["step"]: r["eval/loss/total"] for r in rows if "eval/loss/total" in r}
    main = {r["step"]: r["eval/loss/main"] for r in rows if "eval/loss/main" in r}
    return {"optimizer": optimizer, "lr": lr, "adam_lr": adam_lr, "eval_total": curve, "eval_main": main,
            "seconds": time.time() - t0}


def steps_to(curve: dict, target: float) -> float | None:
    """First step whose eval loss is <= target, linearly interpolated between evaluations."""
    points = sorted(curve.items())
    if points and points[0][1] <= target:
        return points[0][0]
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= target:  # l0 > target >= l1
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def final(r: dict) -> float:
    return r["eval_total"][max(r["eval_total"])]


def write_results(runs: list[dict], args, out: Path) -> str:
    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=final) for opt in ("adamw", "muon")}
    target = args.target if args.target else max(final(r) for r in best.values())
    lines = [
        "# Muon vs AdamW on the tiny preset (CPU)",
        "",
        f"Command: `python experiments/muon_vs_adamw.py --steps {args.steps} --lrs {args.lrs} "
        f"--eval_every {args.eval_every} --eval_batches {args.eval_batches}` on this project's 2-core x86_64 "
        f"CPU host (jax {jax.__version__}). Tiny preset (about 10M parameters), shapes world, 4 packed rows x "
        f"256 tokens per step, warmup {max(1, args.steps // 10)} steps then cosine decay to 10%; validation "
        f"= total loss (main + 0.3 MTP) over {args.eval_batches} fixed batches every {args.eval_every} steps. "
        "Muon: polar_express, 5 steps, bf16, rms scaling (0.2 sqrt(max(fan_in, fan_out))), weight decay 0.1; "
        "its AdamW branch (embeddings, head, norms, biases) runs at AdamW's best LR.",
        "",
        "| optimizer | peak LR (text; vision 0.5x) | AdamW-branch LR | final val loss | final val main loss "
        "| steps to target | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = steps_to(r["eval_total"], target)
        mark = " (best)" if r is best[r["optimizer"]] else ""
        lines.append(f"| {r['optimizer']}{mark} | {r['lr']:g} | {r['adam_lr']:g} | {final(r):.4f} | "
                     f"{r['eval_main'][max(r['eval_main'])]:.4f} | {'-' if s is None else f'{s:.0f}'} | "
                     f"{r['seconds']:.0f} |")
    s_adam, s_muon = (steps_to(best[o]["eval_total"], target) for o in ("adamw", "muon"))
    lines += ["", f"Target validation loss: {target:.4f} "
              f"({'given' if args.target else 'the higher of the two best final losses'})."]
    if s_adam and s_muon:
        lines.append(f"Steps to target, best of each: AdamW {s_adam:.0f}, Muon {s_muon:.0f}: "
                     f"Muon needs {s_muon / s_adam:.2f}x AdamW's steps.")
    lines += ["", "![validation loss](muon_vs_adamw_cpu.png)", ""]
    text = "\n".join(lines)
    (out / "muon_vs_adamw_cpu.md").write_text(text)
    _plot(runs, best, target, out / "muon_vs_adamw_cpu.png")
    return text


def _plot(runs, best, target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    for r in runs:
        steps = sorted(r["eval_total"])
        ax.plot(steps, [r["eval_total"][s] for s in steps], color=colors[r["optimizer"]],
                alpha=1.0 if r is best[r["optimizer"]] else 0.3, marker="." if r is best[r["optimizer"]] else None,
                label=f"{r['optimizer']} lr={r['lr']:g}")
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (main + 0.3 MTP)")
    ax.set_yscale("log")
    ax.set_title("tiny preset: Muon vs AdamW (best LR of each bold)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated peak LR grid (text group)")
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.0, help="target validation loss; 0: automatic")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/muon_vs_adamw"))
    parser.add_argument("--data_dir", type=Path, default=Path("/tmp/muon_vs_adamw/data"))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lrs = [float(x) for x in args.lrs.split(",")]
    runs_path = args.out / "muon_vs_adamw_cpu.json"
    runs: list[dict] = []
    for lr in lrs:
        runs.append(run("adamw", lr, lr, args, args.workdir / f"adamw_{lr:g}"))
        print(f"adamw lr={lr:g}: final val loss {final(runs[-1]):.4f} ({runs[-1]['seconds']:.0f} s)", flush=True)
    adam_best = min(runs, key=final)["lr"]
    for lr in lrs:
        runs.append(run("muon", lr, adam_best, args, args.workdir / f"muon_{lr:g}"))
        print(f"muon lr={lr:g}: final val loss {final(runs[-1]):.4f} ({runs[-1]['seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path.write_text(json.dumps(runs, indent=1))
    print(write_results(runs, args, args.out))


if __name__ == "__main__":
    main()
