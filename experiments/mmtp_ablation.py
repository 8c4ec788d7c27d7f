"""MMTP ablation: image_token vs visual_embed vs mask, same seeds, data order and hyper-parameters.

    python experiments/mmtp_ablation.py                      # tiny, 3 modes x 3 seeds x 70 steps: ~25 min, 2 CPUs
    python experiments/mmtp_ablation.py --preset 0p5b --steps 20000 --seeds 0,1,2   # accelerators

For every seed, each mode trains from the same initialisation (config.seed) on the same data
order (the pipeline is seeded with config.seed), with identical hyper-parameters; only
`model.mtp.mode` differs. With `--batch_hash` (default on) the trainer logs a 48-bit sha256
prefix of every host batch (`data/batch_hash`), and the runner checks that the runs of one seed
saw byte-identical batches. The 0p5b preset keeps its config's mesh (train_and_evaluate builds it
from config.mesh), so on a pod the same command shards the model as the preset says; hashing a
0p5b batch (about 3 GB of patches per host) costs seconds per step, so pass `--no-batch_hash` there
once the order is verified.

Writes to `--out_dir` (default experiments/results/mmtp_ablation/):
  results.md    the tables, definitions, the exact command, machine and jax info
  results.json  raw per-step curves of every run plus the summary rows
  curves.png    training main loss, MTP loss per depth and gradient norm: mean over seeds with
                a min-max band, one colour per mode

Definitions (per run, then mean and std over seeds):
  end          value at the last step (training losses are per step: log_every=1)
  tail mean    mean over the last `--tail` fraction of steps (default 20%)
  smoothness   variance of the step-to-step change of the training main LM loss,
               var(loss[t] - loss[t-1]), over the steps after the first 10% (so the initial
               steep descent does not dominate); lower is smoother
  grad spikes  steps t with grad_norm[t] > k x median(grad_norm[t-w:t]), the running median of the
               previous w steps (k = --spike_k, default 2; w = --spike_window, default 20), counted
               once at least 5 previous steps exist
  s/step       median of the trainer's per-step wall time (1 / perf/steps_per_s with log_every=1:
               data + step + host sync, evaluation excluded) over the steps after the first 10%
               (at least 2 skipped: step 1 includes compilation)
  vision B/step  bytes of vision features that enter the MTP stream per step, analytic:
               sum over depths k of #{stream positions i whose input e_{i+k} is an image position}
               x embed width x compute-dtype bytes for visual_embed (the stream takes the merged
               input embeddings); 0 for image_token (the shared <|image|> embedding row) and mask
               (image positions leave the stream). Positions are counted on the first
               `--vision_batches` batches of the seed's data order, replayed through the pipeline.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402
from glm5v_jax.train import run as run_lib  # noqa: E402
from glm5v_jax.models.build import vlm_spec_from_config  # noqa: E402
from glm5v_jax.train import vlm_pretrain as trainer  # noqa: E402
from glm5v_jax.train.writers import read_jsonl  # noqa: E402

MODES = ("image_token", "visual_embed", "mask")
COLORS = {"image_token": "tab:blue", "visual_embed": "tab:red", "mask": "tab:green"}
DEFAULT_OUT = ROOT / "experiments" / "results" / "mmtp_ablation"


# ----------------------------------------------------------------------------- metrics (pure helpers)
def smoothness(losses, skip_fraction: float = 0.1) -> float:
    """Variance of the step-to-step changes of a loss curve, after the first `skip_fraction` of steps."""
    x = np.asarray(losses, np.float64)
    x = x[int(len(x) * skip_fraction):]
    d = np.diff(x)
    return float(np.var(d)) if d.size else float("nan")


def grad_spikes(grad_norms, k: float = 2.0, window: int = 20, min_history: int = 5) -> list[int]:
    """Indices t with grad_norm[t] > k x median of the previous `window` values (>= min_history of them)."""
    g = np.asarray(grad_norms, np.float64)
    out = []
    for t in range(min_history, len(g)):
        if g[t] > k * np.median(g[max(0, t - window):t]):
            out.append(t)
    return out


def tail_mean(values, fraction: float) -> float:
    x = np.asarray(values, np.float64)
    return float(x[-max(1, int(round(len(x) * fraction))):].mean())


def warm_median(seconds, skip_fraction: float = 0.1, min_skip: int = 2) -> float:
    x = np.asarray(seconds, np.float64)
    skip = min(max(min_skip, int(len(x) * skip_fraction)), max(len(x) - 1, 0))
    return float(np.median(x[skip:]))


def vision_stream_positions(tokens, segment_ids, image_id: int, num_depths: int) -> int:
    """#(depth k, position i) with i in the depth-k MTP stream (token i+k in the same document)
    and token i+k an image position: the stream inputs that are vision features in visual_embed."""
    tokens, seg = np.asarray(tokens), np.asarray(segment_ids)
    total = 0
    for k in range(1, num_depths + 1):
        same_doc = (seg[:, :-k] != 0) & (seg[:, k:] == seg[:, :-k])
        total += int((same_doc & (tokens[:, k:] == image_id)).sum())
    return total


def mtp_vision_bytes(mode: str, positions: float, embed_dim: int, itemsize: int) -> float:
    return float(positions * embed_dim * itemsize) if mode == "visual_embed" else 0.0


# ----------------------------------------------------------------------------- runs
def make_config(args, mode: str, seed: int):
    cfg = vlm_pretrain.get_config(f"{args.preset},mmtp={mode},seed={seed}")
    cfg.total_steps = args.steps
    cfg.log_every = 1  # per-step curves: smoothness, spikes and step time need them
    cfg.eval_every = args.eval_every
    cfg.checkpoint_every = args.steps  # only the final checkpoint
    cfg.measure_pipeline_batches = 0
    cfg.log_batch_hash = args.batch_hash
    cfg.data.data_dir = str(args.data_dir)
    cfg.data.eval_batches = args.eval_batches
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    if args.seq_len:
        cfg.data.seq_len = args.seq_len
    for item in args.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    return cfg


def run_one(args, mode: str, seed: int) -> dict:
    cfg = make_config(args, mode, seed)
    workdir = Path(args.workdir) / f"{mode}_seed{seed}"
    shutil.rmtree(workdir, ignore_errors=True)  # never resume an older run
    t0 = time.time()
    run_lib.train_and_evaluate(cfg, str(workdir))
    seconds = time.time() - t0
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["step"] >= 1]
    train = [r for r in rows if "loss" in r]
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in train[-1] if k.startswith("train/loss/mtp_"))
    curve = lambda key, rs=train: [float(r[key]) for r in rs]  # noqa: E731
    evals = [r for r in rows if "eval/loss/main" in r]
    return dict(
        mode=mode, seed=seed, seconds=seconds,
        steps=[r["step"] for r in train],
        loss_total=curve("loss"), loss_main=curve("train/loss/main"),
        mtp={str(d): curve(f"train/loss/mtp_{d}") for d in depths},
        grad_norm=curve("train/grad_norm"),
        step_seconds=[1.0 / r["perf/steps_per_s"] for r in train],
        batch_hash=[int(r["data/batch_hash"]) for r in rows if "data/batch_hash" in r],
        eval_steps=[r["step"] for r in evals], eval_main=curve("eval/loss/main", evals),
        eval_mtp={str(d): curve(f"eval/loss/mtp_{d}", evals) for d in depths
                  if evals and f"eval/loss/mtp_{d}" in evals[0]},
        speculation=speculation_tau(args, workdir, seed) if args.tau_k else {},
    )


def speculation_tau(args, workdir: Path, seed: int) -> dict:
    """MTP speculative decoding with the run's final model: greedy, `args.tau_k` drafts per round (depth 1
    reused), `args.tau_tokens` new tokens for `args.tau_prompts` image prompts (a shapes-world validation
    image and the caption request, in the chat template the runs train on) and as many text prompts (the
    first 12 tokens of a shapes-world text document). tau = tokens per verify round (1 = no draft accepted,
    k + 1 = all); acceptance_j = P(draft j accepted | draft j-1 accepted)."""
    from glm5v_jax.data import shapes_world
    from glm5v_jax.data.templates import CAPTION_PROMPT_EN
    from glm5v_jax.generate.engine import Engine
    from glm5v_jax.generate.requests import Request
    from glm5v_jax.generate.chat import chat_prompt, image_inputs
    from glm5v_jax.generate.run_loader import load_run

    model, tokenizer, _ = load_run(str(workdir))
    image_requests, text_requests = [], []
    for i in range(args.tau_prompts):
        example = shapes_world.generate_image_example(seed, "validation", i)
        arrays, n = image_inputs(example["image"], model.spec)
        ids = chat_prompt(tokenizer, CAPTION_PROMPT_EN, image_tokens=n)
        image_requests.append(Request(ids, arrays, max_new_tokens=args.tau_tokens))
        text = shapes_world.generate_text_example(seed, "validation", i)["text"]
        text_requests.append(Request(tokenizer.encode(text)[:12], max_new_tokens=args.tau_tokens))
    out = {}
    for kind, requests in (("image", image_requests), ("text", text_requests)):
        longest = max(len(r.tokens) for r in requests) + args.tau_tokens
        engine = Engine(model, max_slots=len(requests), max_seq_len=longest, page_size=16, steps=4,
                        max_chunk=longest, speculate=args.tau_k)
        for r in requests:
            engine.submit(r)
        engine.run()
        m = engine.metrics()
        out[f"tau_{kind}"] = float(m["spec_tau"])
        for j in range(1, args.tau_k + 1):
            out[f"accept_{kind}_{j}"] = float(m[f"spec_acceptance_{j}"])
    return out


def vision_positions(args, seed: int) -> dict:
    """Replays the first `args.vision_batches` training batches of `seed` (the trainer's pipeline and
    seed) and counts the vision positions that feed the MTP stream; also returns their hashes."""
    cfg = make_config(args, "visual_embed", seed)
    workdir = Path(args.workdir) / f"replay_seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    sources, weights, tokenizer = trainer.prepare_data(cfg.data, workdir)
    cfg = trainer.resolve_model_config(cfg, tokenizer)
    spec = vlm_spec_from_config(cfg.model)
    it = trainer.make_iterator(cfg.data, sources["train"], weights, tokenizer, spec, seed=cfg.seed, train=True)
    counts, hashes = [], []
    for _ in range(min(args.vision_batches, args.steps)):
        batch = next(it)
        counts.append(vision_stream_positions(batch["tokens"], batch["segment_ids"], tokenizer.image_id,
                                              cfg.model.mtp.num_depths))
        hashes.append(trainer.batch_hash(batch))
    return dict(positions_per_step=float(np.mean(counts)), hashes=hashes, embed_dim=int(cfg.model.backbone.embed_dim),
                itemsize=int(np.dtype(cfg.model.dtype).itemsize), num_depths=int(cfg.model.mtp.num_depths),
                rows=int(cfg.data.batch_size), seq_len=int(cfg.data.seq_len))


def summarize(run: dict, vis: dict, args) -> dict:
    spikes = grad_spikes(run["grad_norm"], args.spike_k, args.spike_window)
    out = dict(mode=run["mode"], seed=run["seed"],
               main_end=run["loss_main"][-1], main_tail=tail_mean(run["loss_main"], args.tail),
               smoothness=smoothness(run["loss_main"]), grad_spikes=len(spikes),
               spike_steps=[run["steps"][t] for t in spikes],
               s_per_step=warm_median(run["step_seconds"]), wall_s=run["seconds"],
               vision_bytes_per_step=mtp_vision_bytes(run["mode"], vis["positions_per_step"], vis["embed_dim"],
                                                      vis["itemsize"]))
    for d, c in run["mtp"].items():
        out[f"mtp_{d}_end"], out[f"mtp_{d}_tail"] = c[-1], tail_mean(c, args.tail)
    out.update(run.get("speculation", {}))
    if run["eval_main"]:
        out["eval_main_end"] = run["eval_main"][-1]
        for d, c in run["eval_mtp"].items():
            out[f"eval_mtp_{d}_end"] = c[-1]
    return out


def aggregate(rows: list[dict], modes) -> list[dict]:
    """One row per mode: mean and std over seeds of every numeric column."""
    table = []
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        agg = dict(mode=mode, seeds=len(rs))
        for key in rs[0]:
            if key in ("mode", "seed", "spike_steps"):
                continue
            vals = np.asarray([r[key] for r in rs], np.float64)
            agg[key], agg[f"{key}_std"] = float(vals.mean()), float(vals.std())
        table.append(agg)
    return table


def paired_differences(rows: list[dict], mode_a: str, mode_b: str, key: str) -> np.ndarray:
    """Per seed, row[key] of mode_a minus mode_b: the runs of one seed share initialisation and data,
    so the paired difference removes the seed-to-seed spread that dominates `key` itself."""
    by = {(r["mode"], r["seed"]): r[key] for r in rows}
    seeds = sorted({r["seed"] for r in rows if (mode_a, r["seed"]) in by and (mode_b, r["seed"]) in by})
    return np.asarray([by[(mode_a, s)] - by[(mode_b, s)] for s in seeds], np.float64)


def verdict(rows: list[dict], table: list[dict], tail: float) -> list[str]:
    """Plain statements on the report's claim: image_token at or below visual_embed in loss, with
    smoother curves. Paired (same-seed) differences, with the seed spread of the loss beside them."""
    modes = {r["mode"] for r in rows}
    if not {"image_token", "visual_embed"} <= modes:
        return ["Verdict: needs both image_token and visual_embed runs."]
    spread = {r["mode"]: r.get("main_tail_std", 0.0) for r in table}
    loss = paired_differences(rows, "image_token", "visual_embed", "main_tail")
    smooth = paired_differences(rows, "image_token", "visual_embed", "smoothness")
    n = len(loss)
    lower = int((loss <= 0).sum())
    smoother = int((smooth <= 0).sum())
    std = f" ± {loss.std():.4f}" if n > 1 else ""
    lines = [
        f"Verdict (paired by seed, {n} seed{'s' if n != 1 else ''}): image_token − visual_embed main loss over "
        f"the last {tail:.0%} = {loss.mean():+.4f}{std} (image_token lower or equal in {lower}/{n} seeds); "
        f"seed spread of that loss itself: {spread['image_token']:.4f} (image_token), "
        f"{spread['visual_embed']:.4f} (visual_embed).",
        f"Smoothness (var Δmain), image_token − visual_embed = {smooth.mean():+.3g} "
        f"(image_token smoother or equal in {smoother}/{n} seeds).",
    ]
    holds = lower == n and smoother == n and n > 0
    resolved = n > 1 and abs(loss.mean()) > 2 * loss.std(ddof=1) / np.sqrt(n)  # twice the standard error
    lines.append("The report's ordering (image_token at or below visual_embed, smoother) "
                 + ("holds in every seed" if holds else "does not hold in every seed")
                 + ("; the mean loss difference is larger than twice its standard error." if resolved else
                    "; the mean loss difference is within twice its standard error (not resolved at this "
                    "scale)." if n > 1 else "; one seed cannot resolve it."))
    return lines


# ----------------------------------------------------------------------------- outputs
def _fmt(row, key, digits=4):
    return f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}" if row["seeds"] > 1 else f"{row[key]:.{digits}f}"


def machine_description() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
            f"backend {jax.default_backend()}, devices {jax.device_count()} x {jax.devices()[0].device_kind}")


def write_markdown(table, runs_rows, identical, vis, args, argv, out: Path, machine: str,
                   mtp: dict | None = None) -> str:
    depth_keys = sorted({k[:-4] for r in table for k in r if k.startswith("mtp_") and k.endswith("_end")
                         and not k.endswith("_std")})
    head = ["mode", "main end", f"main last {args.tail:.0%}"]
    for d in depth_keys:
        head += [f"{d} end", f"{d} last {args.tail:.0%}"]
    head += ["eval main end", "smoothness (var Δmain)", "grad spikes", "s/step", "vision B/step"]
    spec = all("tau_image" in r for r in table)
    if spec:
        head += ["τ image", "τ text"]
    lines = ["# MMTP ablation: image_token vs visual_embed vs mask", "",
             f"Command: `python experiments/mmtp_ablation.py {shlex.join(argv)}`", "",
             f"Preset `{args.preset}`, {args.steps} steps, seeds {args.seeds}, "
             f"{vis['rows']} packed rows x {vis['seq_len']} tokens per step, MTP depths {vis['num_depths']}, "
             f"embed width {vis['embed_dim']}, compute dtype bytes {vis['itemsize']}. "
             f"Values are mean ± std over seeds.", "",
             ("MTP: " + ", ".join(f"{k} {v}" for k, v in mtp.items()) + " (the same in every run)." if mtp else
              "MTP settings were not recorded with this run."), "",
             f"Machine: {machine}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["mode"], _fmt(r, "main_end"), _fmt(r, "main_tail")]
        for d in depth_keys:
            cells += [_fmt(r, f"{d}_end"), _fmt(r, f"{d}_tail")]
        cells += [_fmt(r, "eval_main_end") if "eval_main_end" in r else "-", f"{r['smoothness']:.3g}",
                  _fmt(r, "grad_spikes", 1), _fmt(r, "s_per_step", 3), f"{r['vision_bytes_per_step']:,.0f}"]
        if spec:
            cells += [_fmt(r, "tau_image", 2), _fmt(r, "tau_text", 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per run:", "", "| mode | seed | main end | smoothness | grad spikes (steps) | s/step | wall s |",
              "|---|---|---|---|---|---|---|"]
    for r in runs_rows:
        lines.append(f"| {r['mode']} | {r['seed']} | {r['main_end']:.4f} | {r['smoothness']:.3g} | "
                     f"{r['grad_spikes']} {r['spike_steps'] if r['spike_steps'] else ''} | "
                     f"{r['s_per_step']:.3f} | {r['wall_s']:.0f} |")
    lines += [""] + verdict(runs_rows, table, args.tail)
    lines += ["", "Byte-identical batches across modes (per-step sha256 prefix, `data/batch_hash`): "
              + ", ".join(f"seed {s}: {'yes' if ok else 'NO'}" for s, ok in identical.items()), "",
              f"Definitions: smoothness = var(main[t] - main[t-1]) over the steps after the first 10%; grad spike = "
              f"grad_norm[t] > {args.spike_k:g} x median of the previous {args.spike_window} steps (from the 6th "
              f"step); s/step = median per-step wall time (1/perf/steps_per_s, log_every=1) after the first 10% "
              f"of steps; vision B/step = sum over MTP depths of the stream positions whose input is an image "
              f"position x embed width x dtype bytes (visual_embed only; image_token and mask take no vision "
              f"features), counted on the first {args.vision_batches} batches of each seed; τ = tokens per "
              f"verify round of greedy MTP speculative decoding with the final model, "
              f"{args.tau_k} drafts per round (depth 1 reused), {args.tau_tokens} new tokens for "
              f"{args.tau_prompts} image prompts (a validation image and the caption request) and "
              f"{args.tau_prompts} text prompts (`speculation_tau`; 1 = nothing accepted, "
              f"{args.tau_k + 1} = every draft). See the module docstring.", "", "![curves](curves.png)", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def plot(runs: list[dict], modes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(runs[0]["mtp"])
    panels = [("loss_main", "train main LM loss")] + [(f"mtp:{d}", f"train MTP loss, depth {d}") for d in depths]
    panels.append(("grad_norm", "gradient norm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    window = max(1, len(runs[0]["steps"]) // 50)

    def smooth(y):
        return np.convolve(y, np.ones(window) / window, mode="valid") if window > 1 else np.asarray(y)

    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        for mode in modes:
            rs = [r for r in runs if r["mode"] == mode]
            ys = np.stack([smooth(r["mtp"][key[4:]] if key.startswith("mtp:") else r[key]) for r in rs])
            xs = np.asarray(rs[0]["steps"])[window - 1:]
            ax.plot(xs, ys.mean(0), color=COLORS.get(mode), label=f"{mode} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=COLORS.get(mode), alpha=0.2)
        ax.set_title(title + (f" ({window}-step mean)" if window > 1 else ""))
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MMTP modes: mean over seeds, band = min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "0p5b"), default="tiny")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated MMTP modes")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each sets model init and data order")
    p.add_argument("--steps", type=int, default=None,
                   help="default: 70 (tiny: 3 modes x 3 seeds in about 25 min on 2 CPU cores), 20000 (0p5b)")
    p.add_argument("--eval_every", type=int, default=None, help="default: 35 (tiny), 1000 (0p5b); 0: no eval")
    p.add_argument("--eval_batches", type=int, default=None, help="default: 2 (tiny), 50 (0p5b)")
    p.add_argument("--batch_size", type=int, default=0, help="packed rows per step; 0: the preset's")
    p.add_argument("--seq_len", type=int, default=0, help="0: the preset's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. data.sources.image.train_size=48 (repeatable)")
    p.add_argument("--tail", type=float, default=0.2, help="fraction of the last steps averaged")
    p.add_argument("--spike_k", type=float, default=2.0)
    p.add_argument("--spike_window", type=int, default=20)
    p.add_argument("--vision_batches", type=int, default=20, help="batches replayed to count vision positions")
    p.add_argument("--tau_k", type=int, default=3, help="drafts per round for the speculative tau; 0: skip")
    p.add_argument("--tau_prompts", type=int, default=8, help="image prompts and text prompts for tau")
    p.add_argument("--tau_tokens", type=int, default=32, help="new tokens per tau prompt")
    p.add_argument("--batch_hash", action=argparse.BooleanOptionalAction, default=True,
                   help="log a per-step batch hash and check the modes saw identical batches")
    p.add_argument("--data_dir", type=Path, default=Path("/tmp/mmtp_ablation/data"), help="shared, built once")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mmtp_ablation"))
    p.add_argument("--out_dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--render_only", action="store_true",
                   help="no training: rewrite results.md and curves.png from --out_dir/results.json")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    if args.steps is None:
        args.steps = 70 if tiny else 20_000
    if args.eval_every is None:
        args.eval_every = 35 if tiny else 1000
    if args.eval_batches is None:
        args.eval_batches = 2 if tiny else 50
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render_only:
        rerender(args.out_dir)
        return json.loads((args.out_dir / "results.json").read_text())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; expected {MODES}")
    runs, rows, identical, vis = [], [], {}, {}
    for seed in seeds:
        vis[seed] = vision_positions(args, seed)
        for mode in modes:
            run = run_one(args, mode, seed)
            runs.append(run)
            rows.append(summarize(run, vis[seed], args))
            print(f"{mode} seed {seed}: main {rows[-1]['main_end']:.4f}, {rows[-1]['s_per_step']:.3f} s/step, "
                  f"{run['seconds']:.0f} s", flush=True)
        if args.batch_hash:
            hashes = [r["batch_hash"] for r in runs if r["seed"] == seed]
            n = len(vis[seed]["hashes"])
            identical[seed] = (all(h == hashes[0] for h in hashes) and len(hashes[0]) == args.steps
                               and hashes[0][:n] == vis[seed]["hashes"])
    table = aggregate(rows, modes)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(argv=argv, preset=args.preset, steps=args.steps, modes=modes, seeds=seeds, table=table,
                  runs_summary=rows, identical_batches={str(k): v for k, v in identical.items()},
                  vision={str(k): {kk: vv for kk, vv in v.items() if kk != "hashes"} for k, v in vis.items()},
                  runs=runs, jax=jax.__version__, backend=jax.default_backend(), machine=machine_description(),
                  mtp=mtp_settings(args, modes[0], seeds[0]))
    (args.out_dir / "results.json").write_text(json.dumps(result, indent=1))
    render(result, args)
    return result


def mtp_settings(args, mode: str, seed: int) -> dict:
    """The MTP settings every run shared (besides the mode), for the results header."""
    mtp = make_config(args, mode, seed).model.mtp
    return dict(trunk_gradient=str(mtp.trunk_gradient), h0_norm=str(mtp.get("h0_norm", "pre_norm")),
                loss_weight=float(mtp.loss_weight), num_depths=int(mtp.num_depths))


def render(result: dict, args) -> str:
    """Writes results.md and curves.png in `args.out_dir` from a results.json dict; returns the markdown."""
    identical = result["identical_batches"]
    vis = result["vision"][str(result["seeds"][0])]
    text = write_markdown(result["table"], result["runs_summary"], identical, vis, args, result["argv"],
                          args.out_dir, result["machine"], result.get("mtp"))
    print(text)
    plot(result["runs"], result["modes"], args.out_dir / "curves.png")
    return text


def rerender(out_dir: Path) -> str:
    """Re-renders the table and plot of an earlier run from its results.json (no training)."""
    result = json.loads((out_dir / "results.json").read_text())
    args = parse_args(result["argv"])
    args.out_dir = out_dir
    return render(result, args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
