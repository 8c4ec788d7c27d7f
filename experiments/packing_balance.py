"""Joint packing against text-only packing: how even data-parallel ranks come out in text tokens and ViT tokens.

    python experiments/packing_balance.py                      # 4000 samples, 8 / 16 / 32 / 64 ranks (seconds)
    python experiments/packing_balance.py --samples=20000 --seq_len=8192 --vit_capacity=16384

Samples are drawn with lognormal text lengths and a Poisson number of images of lognormal ViT token counts
(the shape of a multimodal SFT or rollout batch). Three ways to get per-rank work:

  text-only   rows packed first-fit decreasing on text length alone (no ViT capacity), balanced on text tokens
              (what verl and slime do): a row may carry any number of images
  text-bal    rows packed on both capacities (`data.packing.pack_rows`), balanced on text tokens alone
  joint       rows packed on both capacities, balanced on (text, ViT) (`data.packing.balance_ranks`)

Reported per rank count: max / mean over ranks of the summed text tokens and ViT tokens (1.00 = even; the
slowest rank sets the step), the rows per rank and the fill of the rows. Output: a table, printed and
written with a json to `<out_dir>/packing_balance.md|.json`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from glm5v_jax.data.packing import balance_ranks, imbalance, pack_rows, row_loads
from glm5v_jax.train.writers import write_result_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def draw(args) -> tuple[np.ndarray, np.ndarray]:
    """(text tokens, ViT tokens) of `args.samples` samples."""
    rng = np.random.default_rng(args.seed)
    text = np.clip(rng.lognormal(np.log(args.text_median), args.text_sigma, args.samples), 16, args.seq_len)
    images = rng.poisson(args.images_mean, args.samples)
    vit = np.array([rng.lognormal(np.log(args.vit_median), 0.6, k).sum() for k in images])
    return text.astype(np.int64), np.minimum(vit, args.vit_capacity).astype(np.int64)


def run(args, log: Callable[[str], None] = print) -> dict:
    text, vit = draw(args)
    joint_rows, skipped = pack_rows(text, vit, seq_len=args.seq_len, vit_capacity=args.vit_capacity)
    text_rows, _ = pack_rows(text, np.zeros_like(vit), seq_len=args.seq_len, vit_capacity=0)
    joint_loads, text_loads = row_loads(joint_rows, text, vit), row_loads(text_rows, text, vit)
    rows = []
    for ranks in args.ranks:
        for mode, loads, by in (("text-only", text_loads, text_loads[:, :1]), ("text-bal", joint_loads,
                                                                              joint_loads[:, :1]),
                                ("joint", joint_loads, joint_loads)):
            t0 = time.perf_counter()
            groups = balance_ranks(by, ranks)
            seconds = time.perf_counter() - t0
            imb = imbalance(groups, loads)
            rows.append(dict(ranks=ranks, mode=mode, rows=len(loads), rows_per_rank=len(groups[0]),
                             text_max_over_mean=float(imb[0]), vit_max_over_mean=float(imb[1]),
                             text_fill=float(loads[:, 0].sum() / (len(loads) * args.seq_len)),
                             max_vit_per_row=int(loads[:, 1].max()), seconds=seconds))
            log(f"{ranks} ranks, {mode}: text {imb[0]:.3f}, ViT {imb[1]:.3f}")
    return dict(rows=rows, skipped=len(skipped), settings={k: v for k, v in vars(args).items() if k != "argv"},
                argv=args.argv)


def report(result: dict) -> str:
    s = result["settings"]
    head = ["ranks", "mode", "rows (per rank)", "text max/mean", "ViT max/mean", "text fill", "max ViT per row"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---" + "|---:" * (len(head) - 2) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['ranks']} | {r['mode']} | {r['rows']} ({r['rows_per_rank']}) | "
                     f"{r['text_max_over_mean']:.3f} | {r['vit_max_over_mean']:.3f} | {r['text_fill']:.3f} | "
                     f"{r['max_vit_per_row']} |")
    return "\n".join([
        "# Joint packing: rank balance in text and ViT tokens", "",
        f"{s['samples']} samples: text lognormal (median {s['text_median']}, sigma {s['text_sigma']}, within "
        f"[16, {s['seq_len']}]), Poisson({s['images_mean']}) images of lognormal ViT tokens (median "
        f"{s['vit_median']} each); rows of {s['seq_len']} tokens and, packing on both, {s['vit_capacity']} ViT "
        f"tokens ({result['skipped']} samples over it left out). Command: "
        f"`python experiments/packing_balance.py {' '.join(result['argv'])}` ({result['wall_s']:.1f} s wall).", "",
        *lines, "",
        "text-only: rows packed and balanced on text length alone (verl's and slime's balancing); text-bal: rows "
        "packed on both capacities, balanced on text; joint: packed on both, balanced on both "
        "(`glm5v_jax.data.packing`). Every rank gets the same number of rows (micro-batches).", ""])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--vit_capacity", type=int, default=8192)
    ap.add_argument("--text_median", type=int, default=600)
    ap.add_argument("--text_sigma", type=float, default=0.8)
    ap.add_argument("--images_mean", type=float, default=1.5)
    ap.add_argument("--vit_median", type=int, default=700)
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    args = ap.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args, log)
    result["wall_s"] = time.perf_counter() - t0
    text = report(result)
    log(text)
    if args.out_dir:
        result["files"] = write_result_files(args.out_dir, "packing_balance", text, result)
    return result


if __name__ == "__main__":
    main()
