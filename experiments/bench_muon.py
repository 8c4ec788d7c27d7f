"""Muon update time (ours vs optax.contrib.muon) and Newton-Schulz FLOPs vs train-step FLOPs.

    python experiments/bench_muon.py                                   # CPU defaults, ~10 min on 2 cores
    python experiments/bench_muon.py --presets tiny 0p5b --layers 0 --vision-depth 0 --repeats 5  # full 0p5b

Part 1 (timed, per preset): the jitted `tx.update(grads, state, params)` of
  * ours, defaults: `glm5v_jax.optim.muon.muon(lr, route(model))` (polar_express, 5 steps,
    bf16 Newton-Schulz, rms scaling, layout `stack`, which is a no-op without a mesh);
  * ours, `ns_preset="jordan", ns_dtype=float32` (the apples-to-apples row: optax runs NS in f32);
  * `optax.contrib.muon` with the same routing (our table as `muon_weight_dimension_numbers`,
    None -> AdamW), its default Jordan coefficients, 5 steps, `consistent_rms=0.2` (our `rms`
    mode), the same decays and Adam betas;
  on one random parameter/gradient tree of the preset's shapes (float32), side by side in one
  process: compile, warm-up, then the median of `--repeats` calls (block_until_ready). The
  optimizer state is donated and fed back, as in training. Plus Newton-Schulz alone on the
  tree's costliest matrix shape, to separate NS from the rest of the update.

Part 2 (analytic, abstract models only, nothing materialised): Newton-Schulz FLOPs per step,
sum over Muon matrices of T (4 m^2 n + 2 m^3), m = min(fan_in, fan_out), n = max, against
`glm5v_jax.train.flops.train_flops_per_step` at each preset's config batch.

The FLOP helpers (`ns_flops`, `ns_overhead_closed_form`, `muon_matrices`, `ns_flops_of_table`,
`flop_fraction`) import without running anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "configs") not in sys.path:
    sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402
from glm5v_jax.models.build import vlm_spec_from_config  # noqa: E402
from glm5v_jax.models.vlm import GLM5V  # noqa: E402
from glm5v_jax.optim.muon import muon  # noqa: E402
from glm5v_jax.optim.newton_schulz import newton_schulz  # noqa: E402
from glm5v_jax.optim.routing import MatrixSpec, path_key, route  # noqa: E402
from glm5v_jax.train.flops import train_flops_per_step  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "muon_update_cpu.md"
LR = 1e-3
WEIGHT_DECAY = 0.1
Table = Mapping[tuple[str, ...], MatrixSpec | None]


# ---------------------------------------------------------------------------------------------
# Newton-Schulz FLOP counting (importable; no model is built)
# ---------------------------------------------------------------------------------------------

def ns_flops(fan_in: int, fan_out: int, steps: int = 5) -> int:
    """FLOPs of `steps` quintic Newton-Schulz iterations on one fan_in x fan_out matrix.

    Per step, with m = min, n = max: A = X X^T (2 m^2 n), A A (2 m^3), (bA + cA^2) X (2 m^2 n).
    Elementwise work (normalisation, the a X + ... sums) is not counted.
    """
    m, n = min(fan_in, fan_out), max(fan_in, fan_out)
    return steps * (4 * m * m * n + 2 * m ** 3)


def ns_overhead_closed_form(fan_in: int, fan_out: int, tokens: float, steps: int = 5) -> float:
    """NS FLOPs / training FLOPs (6 m n B) of one matrix seeing `tokens` tokens: T m (2n + m) / (3 n B)."""
    m, n = min(fan_in, fan_out), max(fan_in, fan_out)
    return steps * m * (2 * n + m) / (3 * n * tokens)


@dataclasses.dataclass(frozen=True)
class MuonLeaf:
    path: tuple[str, ...]
    count: int  # matrices in the leaf (product of its batch axes: layers x experts)
    fan_in: int
    fan_out: int


def muon_matrices(shapes: Mapping[tuple[str, ...], tuple[int, ...]], table: Table) -> list[MuonLeaf]:
    """Every Muon-routed leaf as (path, number of matrices, fan_in, fan_out)."""
    out = []
    for key, spec in table.items():
        if spec is None:
            continue
        shape = shapes[key]
        fan_in, fan_out = spec.fans(shape)
        out.append(MuonLeaf(key, math.prod(shape[a] for a in spec.batch), fan_in, fan_out))
    return out


def ns_flops_of_table(shapes: Mapping[tuple[str, ...], tuple[int, ...]], table: Table,
                      steps: int = 5) -> tuple[int, int]:
    """(number of Muon matrices, Newton-Schulz FLOPs of one optimizer step)."""
    leaves = muon_matrices(shapes, table)
    return (sum(leaf.count for leaf in leaves),
            sum(leaf.count * ns_flops(leaf.fan_in, leaf.fan_out, steps) for leaf in leaves))


def config_and_spec(config_arg: str, vision_depth: int = 0):
    """(config, VLMSpec) of `configs/vlm_pretrain.py:<config_arg>`; vision_depth > 0 overrides the tower depth."""
    cfg = vlm_pretrain.get_config(config_arg)
    if vision_depth > 0:
        cfg.model.vision.depth = vision_depth
    return cfg, vlm_spec_from_config(cfg.model)


def abstract_model(spec) -> GLM5V:
    """The model with ShapeDtypeStruct parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))


def param_shapes(model: GLM5V) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(str(p) for p in path): tuple(v.shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expert_paths(model: GLM5V) -> set[tuple[str, ...]]:
    """Parameters with an `exp` (routed experts) logical axis."""
    return {tuple(str(p) for p in path) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if "exp" in tuple(v.get_metadata().get("out_sharding") or ())}


def flop_fraction(config_arg: str, steps: int = 5, images_per_row: int | None = None) -> dict:
    """NS FLOPs vs train-step FLOPs at the config's batch (abstract model only).

    Batch: config.data.batch_size rows x config.data.seq_len tokens; images per row
    `images_per_row` (default config.data.max_images_per_row // 2), each of
    spec.vision.max_patches patches (the trainer's convention, an upper bound).
    """
    cfg, spec = config_and_spec(config_arg)
    model = abstract_model(spec)
    table = route(model)
    shapes = param_shapes(model)
    n_mats, flops = ns_flops_of_table(shapes, table, steps)
    rows, seq_len = cfg.data.batch_size, cfg.data.seq_len
    per_row = cfg.data.max_images_per_row // 2 if images_per_row is None else images_per_row
    images = rows * per_row
    train = train_flops_per_step(spec, rows=rows, seq_len=seq_len, images=images,
                                 patches_per_image=spec.vision.max_patches)
    train_text = train_flops_per_step(spec, rows=rows, seq_len=seq_len, images=0,
                                      patches_per_image=spec.vision.max_patches)
    leaves = muon_matrices(shapes, table)
    experts = expert_paths(model)
    expert_flops = sum(leaf.count * ns_flops(leaf.fan_in, leaf.fan_out, steps) for leaf in leaves
                       if leaf.path in experts)
    return dict(config=config_arg, muon_leaves=len(leaves), muon_matrices=n_mats, ns_flops=flops,
                expert_ns_flops=expert_flops, train_flops=train, train_flops_text_only=train_text,
                fraction=flops / train, rows=rows, seq_len=seq_len, tokens=rows * seq_len, images=images,
                patches_per_image=spec.vision.max_patches, steps=steps,
                num_experts=spec.backbone.num_experts, experts_per_token=spec.backbone.experts_per_token,
                params=sum(math.prod(s) for s in shapes.values()),
                muon_params=sum(math.prod(shapes[k]) for k, v in table.items() if v is not None))


# ---------------------------------------------------------------------------------------------
# Update timing
# ---------------------------------------------------------------------------------------------

def optax_dimension_numbers(params: Any, table: Table) -> Any:
    """Our routing as optax's `muon_weight_dimension_numbers` (None -> AdamW)."""
    def convert(path, _):
        spec = table[path_key(path)]
        if spec is None:
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=spec.reduction, output_axis=spec.output)
    return jax.tree_util.tree_map_with_path(convert, params)


def optimizers(table: Table, params: Any) -> dict[str, optax.GradientTransformation]:
    """The compared update rules, same LR, decays, betas and routing."""
    return {
        "ours (polar_express, bf16 NS)": muon(LR, table, weight_decay=WEIGHT_DECAY),
        "ours (jordan, f32 NS)": muon(LR, table, weight_decay=WEIGHT_DECAY, ns_preset="jordan",
                                      ns_dtype=jnp.float32),
        "optax.contrib.muon (jordan, f32 NS)": optax.contrib.muon(
            LR, ns_steps=5, beta=0.95, weight_decay=WEIGHT_DECAY, adam_b1=0.9, adam_b2=0.95,
            adam_weight_decay=WEIGHT_DECAY, consistent_rms=0.2,
            muon_weight_dimension_numbers=optax_dimension_numbers(params, table)),
    }


def random_tree(shapes: Any, seed: int, scale: float) -> Any:
    """float32 N(0, scale^2) arrays shaped like a tree of ShapeDtypeStructs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * scale), shapes)


def time_interleaved(fns: Mapping[str, Any], args: Mapping[str, tuple], repeats: int, warmup: int,
                     carry_index: int | None = None) -> dict[str, dict]:
    """Compile each `fns[name]` (jit) on `args[name]`, warm each up, then time `repeats` rounds
    that call every variant once (round-robin, so load from other jobs on a shared host hits
    all variants alike). With `carry_index`, output element 1 replaces that argument (the
    optimizer state, donated), as in training."""
    donate = () if carry_index is None else (carry_index,)
    compiled, compile_s, live = {}, {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn, donate_argnums=donate).lower(*args[name]).compile()
        compile_s[name] = time.perf_counter() - t0
        live[name] = list(args[name])
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name, record):
        t = time.perf_counter()
        out = compiled[name](*live[name])
        jax.block_until_ready(out)
        if record:
            times[name].append(time.perf_counter() - t)
        if carry_index is not None:
            live[name][carry_index] = out[1]

    for name in fns:
        for _ in range(warmup):
            call(name, False)
    for _ in range(repeats):
        for name in fns:
            call(name, True)
    return {name: dict(name=name, compile_s=compile_s[name], median_s=statistics.median(times[name]),
                       min_s=min(times[name]), times=times[name]) for name in fns}


def time_updates(config_arg: str, repeats: int, warmup: int, vision_depth: int = 0) -> dict:
    _, spec = config_and_spec(config_arg, vision_depth)
    model = abstract_model(spec)
    table = route(model)
    abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = random_tree(abstract, 0, 0.02)
    grads = random_tree(abstract, 1, 1e-3)
    shapes = param_shapes(model)
    n_mats, flops = ns_flops_of_table(shapes, table)
    txs = optimizers(table, params)
    res = time_interleaved({name: tx.update for name, tx in txs.items()},
                           {name: (grads, tx.init(params), params) for name, tx in txs.items()},
                           repeats, warmup, carry_index=1)
    rows = list(res.values())
    for r in rows:
        print(f"  {config_arg}: {r['name']}: compile {r['compile_s']:.1f}s, update median {r['median_s']:.3f}s "
              f"({', '.join(f'{t:.3f}' for t in r['times'])})", flush=True)
    # Newton-Schulz alone on one matrix of the costliest shape.
    big = max(muon_matrices(shapes, table), key=lambda leaf: ns_flops(leaf.fan_in, leaf.fan_out))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, big.fan_in, big.fan_out), dtype=np.float32))
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    jordan = jnp.asarray(optax.contrib._muon._DEFAULT_NS_COEFFS)  # what optax.contrib.muon stores in its state
    ns_variants = {
        "ours polar_express bf16": lambda a: newton_schulz(a, "polar_express", 5, dtype=jnp.bfloat16),
        "ours jordan f32": lambda a: newton_schulz(a, "jordan", 5, dtype=jnp.float32),
        "optax jordan f32": lambda a: optax.contrib._muon.orthogonalize_via_newton_schulz(
            a, jordan, 5, dimension_numbers=dims),
        # The same Jordan row given as a 5-row table: optax then loops with lax.scan instead of
        # its unrolled fori_loop (same math, different XLA program).
        "optax jordan f32, 5-row table (scan)": lambda a: optax.contrib._muon.orthogonalize_via_newton_schulz(
            a, jnp.tile(jordan[None], (5, 1)), 5, dimension_numbers=dims),
    }
    res = time_interleaved(ns_variants, {name: (x,) for name in ns_variants}, max(repeats, 3), 1)
    ns_rows = list(res.values())
    for r in ns_rows:
        print(f"  NS alone [{big.fan_in}x{big.fan_out}] {r['name']}: {r['median_s'] * 1e3:.1f} ms", flush=True)
    return dict(config=config_arg, vision_depth=spec.vision.depth, backbone_layers=spec.backbone.num_layers,
                params=sum(math.prod(s) for s in shapes.values()), muon_matrices=n_mats, ns_flops=flops,
                rows=rows, ns_shape=(big.fan_in, big.fan_out), ns_flops_one=ns_flops(big.fan_in, big.fan_out),
                ns_rows=ns_rows, repeats=repeats, warmup=warmup)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _machine() -> str:
    dev = jax.devices()[0]
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = f"{platform.machine()} CPU ({cpu}), {cores} cores" if dev.platform == "cpu" else \
        f"{getattr(dev, 'device_kind', dev.platform)} ({platform.machine()} host, {cores} cores)"
    return f"{where}; jax {jax.__version__}, flax {__import__('flax').__version__}, optax {optax.__version__}"


def report(timings: list[dict], fractions: list[dict], args, wall_s: float) -> str:
    out = ["# Muon update time (ours vs optax.contrib.muon) and Newton-Schulz FLOP share", "",
           f"Machine: {_machine()}. Command: `{' '.join(['python experiments/bench_muon.py', *args.argv])}`"
           f" ({wall_s / 60:.1f} min wall). Settings: presets {args.presets}, layers {args.layers}, "
           f"vision depth {args.vision_depth} (non-tiny; 0 = the preset's), repeats {args.repeats} "
           f"(tiny {args.tiny_repeats}), warm-up {args.warmup}.", ""]
    if timings:
        out += ["## 1. Update time", "",
                "Jitted `tx.update(grads, state, params)` on random float32 trees of the preset's shapes "
                "(state donated and fed back), after compile and "
                f"{timings[0]['warmup']} warm-up call(s) each; then rounds that call every variant once "
                "(round-robin, so load from other jobs hits all alike); median over rounds. "
                "Routing: `route(model)` for ours; the same table as optax `MuonDimensionNumbers` "
                "(None -> AdamW) for optax. All: 5 NS steps, beta 0.95 Nesterov, rms scaling 0.2 "
                "(optax `consistent_rms=0.2`), decay 0.1 on both branches, Adam b2 0.95. "
                "Ours with defaults runs Polar Express coefficients in bf16; the `jordan, f32` row "
                "matches optax's default coefficients (3.4445, -4.7750, 2.0315) and f32 NS. "
                "Without a mesh, layout `stack` runs NS per leaf on the one device.", ""]
        for t in timings:
            base = next(r for r in t["rows"] if r["name"].startswith("optax"))["median_s"]
            out += [f"### `{t['config']}` (backbone layers {t['backbone_layers']}, vision depth "
                    f"{t['vision_depth']}): {t['params'] / 1e6:.1f}M parameters, {t['muon_matrices']} Muon "
                    f"matrices, {t['ns_flops'] / 1e9:.1f} GFLOP of NS per update; median of {t['repeats']} rounds", "",
                    "| optimizer | compile (s) | update median (s) | min (s) | vs optax "
                    "| NS FLOPs / update time (GFLOP/s) |",
                    "|---|---:|---:|---:|---:|---:|"]
            for r in t["rows"]:
                out.append(f"| {r['name']} | {r['compile_s']:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                           f"{r['median_s'] / base:.2f}x | {t['ns_flops'] / r['median_s'] / 1e9:.1f} |")
            m, n = t["ns_shape"]
            out += ["", f"Newton-Schulz alone, one {m}x{n} matrix ({t['ns_flops_one'] / 1e9:.2f} GFLOP):", "",
                    "| NS | median (ms) | GFLOP/s |", "|---|---:|---:|"]
            for r in t["ns_rows"]:
                out.append(f"| {r['name']} | {r['median_s'] * 1e3:.1f} | "
                           f"{t['ns_flops_one'] / r['median_s'] / 1e9:.1f} |")
            out.append("")
    if fractions:
        out += ["## 2. Newton-Schulz FLOPs vs train-step FLOPs", "",
                "NS FLOPs per step = sum over Muon matrices of T (4 m^2 n + 2 m^3), m = min(fan_in, fan_out), "
                "n = max, T = 5, from `route()` of the abstract model (`nnx.eval_shape`; nothing materialised). "
                "Train FLOPs: `glm5v_jax.train.flops.train_flops_per_step` at the config batch "
                "(`config.data.batch_size` rows x `config.data.seq_len`), images per row = "
                "`max_images_per_row // 2`, `vision.max_patches` patches each (the trainer's convention; an "
                "upper bound on vision tokens).", "",
                "| preset | params | Muon leaves | Muon matrices | batch (tokens, images x patches) | NS FLOPs | "
                "of which experts | train FLOPs | NS / train | NS / text-only train |",
                "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for f in fractions:
            out.append(
                f"| `{f['config']}` | {f['params'] / 1e9:.3g}B | {f['muon_leaves']} | {f['muon_matrices']} | "
                f"{f['rows']} x {f['seq_len']} = {f['tokens']:,}, {f['images']} x {f['patches_per_image']} | "
                f"{f['ns_flops']:.3g} | {f['expert_ns_flops'] / f['ns_flops']:.0%} | {f['train_flops']:.3g} | "
                f"{f['fraction']:.3%} | {f['ns_flops'] / f['train_flops_text_only']:.3%} |")
        out += ["", *closed_form_lines(fractions), "",
                "Why MoE experts cost more: Newton-Schulz cost depends only on a matrix's shape, and every "
                "expert matrix is orthogonalised every step, but an expert only sees B k / E of the B tokens "
                "(k of E experts per token), so its training FLOPs are 6 m n B k / E instead of 6 m n B. Its "
                "NS/train ratio is therefore E / k times that of a dense matrix of the same shape "
                "(T m (2n + m) / (3 n B) x E / k). With E/k = 16 (glm45_air: 128 experts, top-8) expert "
                "matrices dominate the NS FLOPs (column 'of which experts') although they are a small "
                "share of the active training FLOPs. Shared experts see every token and count as dense.",
                "",
                "NS / train is a FLOP ratio per step; wall-clock overhead is larger if NS runs replicated "
                "(each of N devices repeating the same matrices) and smaller with the `stack` layout, "
                "which gives each device whole matrices.", ""]
    return "\n".join(out)


def closed_form_lines(fractions: list[dict]) -> list[str]:
    lines = ["Closed-form check (reference section 5), one matrix, T m (2n + m) / (3 n B) with B tokens seen:", ""]
    for f in fractions:
        _, spec = config_and_spec(f["config"])
        bb = spec.backbone
        fi, fo, what = bb.embed_dim, bb.mlp_dim, "dense MLP gate"
        direct = ns_flops(fi, fo) / (6 * fi * fo * f["tokens"])
        closed = ns_overhead_closed_form(fi, fo, f["tokens"])
        lines.append(f"- `{f['config']}` {what} {fi}x{fo}, B = {f['tokens']:,}: closed form {closed:.4%}, "
                     f"T(4m^2n+2m^3)/(6mnB) {direct:.4%}, bound T m / B {5 * min(fi, fo) / f['tokens']:.4%}")
        if bb.num_experts:
            fi, fo = bb.embed_dim, bb.moe_mlp_dim
            tok = f["tokens"] * bb.experts_per_token / bb.num_experts
            lines.append(f"  - expert gate {fi}x{fo} sees B k / E = {tok:,.0f} tokens (E={bb.num_experts}, "
                         f"k={bb.experts_per_token}): {ns_overhead_closed_form(fi, fo, tok):.4%} = "
                         f"{bb.num_experts / bb.experts_per_token:g} x "
                         f"{ns_overhead_closed_form(fi, fo, f['tokens']):.4%}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["tiny", "0p5b"], help="presets to time")
    ap.add_argument("--layers", type=int, default=1,
                    help="backbone layers for the non-tiny timed presets (0: the preset's)")
    ap.add_argument("--vision-depth", type=int, default=2,
                    help="vision depth for the non-tiny timed presets (0: the preset's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (non-tiny presets)")
    ap.add_argument("--tiny-repeats", type=int, default=5, help="timed calls per variant for tiny")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--fraction-presets", nargs="*", default=["tiny", "0p5b", "glm45_air"])
    ap.add_argument("--out", default=str(RESULTS), help="markdown results file ('' to skip)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    t0 = time.perf_counter()
    print(_machine(), flush=True)
    fractions = []
    for p in args.fraction_presets:
        fractions.append(flop_fraction(p))
        f = fractions[-1]
        print(f"{p}: {f['muon_matrices']} Muon matrices, NS {f['ns_flops']:.3g} FLOPs, "
              f"train {f['train_flops']:.3g} FLOPs, NS/train {f['fraction']:.3%}", flush=True)
    timings = []
    for p in args.presets:
        tiny = p.split(",")[0] == "tiny"
        arg = p if tiny or args.layers <= 0 else f"{p},layers={args.layers}"
        timings.append(time_updates(arg, args.tiny_repeats if tiny else args.repeats, args.warmup,
                                    0 if tiny else args.vision_depth))
    text = report(timings, fractions, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
