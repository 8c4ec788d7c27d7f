"""TFLOP/s of our Pallas kernels against the baselines, side by side from one run.

    python experiments/bench_kernels.py --suite all                 # on a GPU or TPU host
    python experiments/bench_kernels.py --suite attention --seq_lens 4096 --head_dims 128 --iters 50
    python experiments/bench_kernels.py --smoke                     # tiny shapes, any host (CPU: ~15 s)

What is timed (bf16 inputs throughout):

* attention: `glm5v_jax.kernels.flash_attention` (Pallas Triton on GPU, Mosaic on TPU) against
  `jax.nn.dot_product_attention(implementation='xla')` everywhere, `implementation='cudnn'` and
  `jax.experimental.pallas.ops.gpu.attention.mha` on GPU, and on TPU
  `jax.experimental.pallas.ops.tpu.splash_attention` (the MQA kernel vmapped over kv heads and
  batch, q pre-scaled) and `jax.experimental.pallas.ops.tpu.flash_attention`. The two jax Pallas
  kernels without GQA get K/V repeated to H heads inside the timed function. Sweep: S in
  {1k, 4k, 16k}, head dim D in {64, 128}, causal and not, H = 2048 / D query heads and GQA 8:1
  (D=128: H=16, KV=2; D=64: H=32, KV=4), batch B = max(1, --tokens // S) (16k tokens a call).
* gmm: `glm5v_jax.kernels.gmm.gmm` against `jax.lax.ragged_dot`, a dense einsum and, on TPU,
  megablox (`jax.experimental.pallas.ops.tpu.megablox`), for [m, k] x [G, k, n] with random
  balanced group sizes (multinomial, summing to m). "dense" computes every token through
  every expert, `einsum('mk,gkn->mgn')`, then keeps each row's own expert (take_along_axis):
  G times the useful FLOPs, the cost of MoE without a grouped matmul.

Passes: `fwd`, and `fwd+bwd` = one jitted call of forward plus `jax.vjp` with a random
cotangent (gradients wrt q, k, v, or lhs and rhs). FLOPs (useful work only, the same count for
every implementation, so a ratio of TFLOP/s is a ratio of times):
  attention fwd = 4 B H S T D, halved when causal; fwd+bwd = 3.5 x fwd (bwd counted 2.5 x fwd,
  the FlashAttention / tokamax convention of shared/reference/pallas.md section 5);
  gmm fwd = 2 m k n; fwd+bwd = 3 x fwd (dlhs and drhs are one gmm each).
Timing: jit, compile, `--warmup` calls, then the median of `--iters` calls, each followed by
`jax.block_until_ready`. A baseline that does not apply or fails (OOM, unsupported shape,
missing module in this jax) is reported as "n/a (reason)" and the run goes on.

Output: a markdown table per suite (shape, pass, ours TFLOP/s, then each baseline's TFLOP/s
and ours/baseline) printed and written with a json of every number to
`<out_dir>/bench_kernels_<device kind>.md|.json` (`_smoke` appended with --smoke).

On CPU only `--smoke` runs: Pallas has no CPU lowering, so our kernels run in interpret mode
(the TPU kernel under the HLO interpreter), which at real sizes would take hours.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.kernels import flash_attention
from glm5v_jax.kernels.gmm import gmm
from glm5v_jax.train.writers import json_default

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

ATTN_WIDTH, GQA = 2048, 8  # H * D query width and H / KV in the default sweep
GMM_SHAPES = ((8192, 4096, 8, 14336), (16384, 1024, 64, 512))  # (m, k, G, n)
SMOKE = dict(seq_lens=(256,), head_dims=(64,), tokens=256, gmm_shapes=((256, 128, 4, 256),))
PASSES = ("fwd", "fwd+bwd")

# Baselines per platform, in table order (the column set of each suite).
ATTN_BASELINES = {"gpu": ("xla", "cudnn", "jax pallas mha"),
                  "tpu": ("xla", "splash", "jax pallas flash"),
                  "cpu": ("xla", "cudnn")}
GMM_BASELINES = {"gpu": ("ragged_dot", "dense"), "tpu": ("ragged_dot", "dense", "megablox"),
                 "cpu": ("ragged_dot", "dense")}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def median_seconds(fn: Callable, args: tuple, iters: int, warmup: int) -> float:
    """Median wall time of one call of the compiled `fn(*args)`, block_until_ready included."""
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _reason(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= 120 else text[:117] + "..."


def measure(make: Callable[[], Callable], args: tuple, flops: float, iters: int, warmup: int) -> dict:
    """{"tflops", "ms"} of the function `make()` builds, or {"error": reason} if anything fails."""
    try:
        t = median_seconds(make(), args, iters, warmup)
    except Exception as e:  # noqa: BLE001 - a failing implementation is a table cell, not a crash
        return {"error": _reason(e)}
    return {"tflops": flops / t / 1e12, "ms": t * 1e3}


def with_backward(f: Callable, n_diff: int) -> Callable:
    """`(*args, cotangent) -> grads` of `f` wrt its first `n_diff` args: forward + backward in one call."""
    def fwd_bwd(*args):
        diff, rest, cot = args[:n_diff], args[n_diff:-1], args[-1]
        _, vjp = jax.vjp(lambda *d: f(*d, *rest), *diff)
        return vjp(cot)
    return fwd_bwd


def _platform() -> str:
    p = jax.devices()[0].platform
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttnCase:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"B{self.batch} S{self.seq} H{self.heads}/KV{self.kv_heads} D{self.head_dim} {mask}"

    def flops(self, pass_: str) -> float:
        fwd = 4 * self.batch * self.heads * self.seq * self.seq * self.head_dim * (0.5 if self.causal else 1.0)
        return fwd * (3.5 if pass_ == "fwd+bwd" else 1.0)


def attention_cases(seq_lens, head_dims, tokens: int, smoke: bool) -> list[AttnCase]:
    cases = []
    for s in seq_lens:
        for d in head_dims:
            h = GQA if smoke else max(GQA, ATTN_WIDTH // d)
            for causal in (False, True):
                cases.append(AttnCase(max(1, tokens // s), s, h, h // GQA, d, causal))
    return cases


def _repeat_kv(k, v, heads):
    g = heads // k.shape[2]
    return jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)


def attention_impl(name: str, c: AttnCase, interpret: bool) -> Callable:
    """`(q [B,S,H,D], k, v [B,T,KV,D]) -> [B,S,H,D]` of implementation `name`; raises if it cannot apply."""
    scale = c.head_dim ** -0.5
    if name == "ours":
        return functools.partial(flash_attention, causal=c.causal, scale=scale, interpret=interpret)
    if name in ("xla", "cudnn"):
        return functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=c.causal,
                                 implementation=name)
    if name == "jax pallas mha":
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        def mha(q, k, v):
            k, v = _repeat_kv(k, v, c.heads)
            return gpu_attention.mha(q, k, v, None, sm_scale=scale, causal=c.causal, interpret=interpret)
        return mha
    if name == "jax pallas flash":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
        b = min(512, c.seq)
        blocks = tpu_flash.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1,
                                      block_q_major_dkv=b, block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b,
                                      block_k_major_dq=b, block_k_dq=b, block_q_dq=b)

        def flash(q, k, v):
            k, v = _repeat_kv(k, v, c.heads)
            q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, S, D]
            out = tpu_flash.flash_attention(q, k, v, causal=c.causal, sm_scale=scale, block_sizes=blocks)
            return out.transpose(0, 2, 1, 3)
        return flash
    if name == "splash":
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
        g, b = c.heads // c.kv_heads, min(512, c.seq)
        one = masks.CausalMask((c.seq, c.seq)) if c.causal else masks.FullMask((c.seq, c.seq))
        blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                   block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
        kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([one] * g), block_sizes=blocks,
                                                      interpret=interpret)
        per_kv_head = jax.vmap(jax.vmap(kernel))  # over batch, then kv heads: q [G, S, D], k/v [T, D]

        def splash_gqa(q, k, v):
            bsz, s, h, d = q.shape
            q = (q * scale).reshape(bsz, s, c.kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
            k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, KV, T, D]
            out = per_kv_head(q, k, v)
            return out.transpose(0, 3, 1, 2, 4).reshape(bsz, s, h, d)
        return splash_gqa
    raise ValueError(f"unknown attention implementation {name!r}")


def run_attention(cases, baselines, iters, warmup, interpret, log) -> list[dict]:
    rows = []
    for c in cases:
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (c.batch, c.seq, c.heads, c.head_dim), jnp.bfloat16)
        k, v = (jax.random.normal(kk, (c.batch, c.seq, c.kv_heads, c.head_dim), jnp.bfloat16) for kk in keys[1:3])
        cot = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
        for pass_ in PASSES:
            args = (q, k, v) if pass_ == "fwd" else (q, k, v, cot)

            def make(name, pass_=pass_, c=c):
                f = attention_impl(name, c, interpret)
                return f if pass_ == "fwd" else with_backward(f, 3)
            rows.append(bench_row("attention", c.label, pass_, c.flops(pass_), make, args, baselines,
                                  iters, warmup, log))
        del q, k, v, cot
    return rows


# ---------------------------------------------------------------------------------------------
# Grouped matmul
# ---------------------------------------------------------------------------------------------

def dense_gmm(lhs, rhs, group_sizes):
    """Every token through every expert, then each row keeps its own group's output."""
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(lhs.shape[0]), side="right")
    group = jnp.minimum(group, rhs.shape[0] - 1)  # rows past sum(group_sizes): none in this benchmark
    every = jnp.einsum("mk,gkn->mgn", lhs, rhs)
    return jnp.take_along_axis(every, group[:, None, None], axis=1)[:, 0]


def gmm_impl(name: str, shape, interpret: bool) -> Callable:
    """`(lhs [m,k], rhs [G,k,n], group_sizes [G]) -> [m,n]` of implementation `name`."""
    m, k, _, n = shape
    if name == "ours":
        return functools.partial(gmm, interpret=interpret)
    if name == "ragged_dot":
        return jax.lax.ragged_dot
    if name == "dense":
        return dense_gmm
    if name == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
        tiling = (min(512, m), min(1024, k), min(1024, n))
        return lambda lhs, rhs, gs: megablox.gmm(lhs, rhs, gs, lhs.dtype, tiling, interpret=interpret)
    raise ValueError(f"unknown gmm implementation {name!r}")


def gmm_label(shape) -> str:
    m, k, g, n = shape
    return f"[{m},{k}] x [{g},{k},{n}]"


def run_gmm(shapes, baselines, iters, warmup, interpret, log) -> list[dict]:
    rows = []
    for shape in shapes:
        m, k, g, n = shape
        keys = jax.random.split(jax.random.key(1), 3)
        lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
        sizes = jnp.asarray(np.random.default_rng(0).multinomial(m, [1 / g] * g), jnp.int32)
        cot = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
        fwd_flops = 2 * m * k * n
        for pass_ in PASSES:
            args = (lhs, rhs, sizes) if pass_ == "fwd" else (lhs, rhs, sizes, cot)

            def make(name, pass_=pass_, shape=shape):
                f = gmm_impl(name, shape, interpret)
                return f if pass_ == "fwd" else with_backward(f, 2)
            flops = fwd_flops * (3 if pass_ == "fwd+bwd" else 1)
            rows.append(bench_row("gmm", gmm_label(shape), pass_, flops, make, args, baselines, iters, warmup, log))
        del lhs, rhs, cot
    return rows


# ---------------------------------------------------------------------------------------------
# Rows, table, files
# ---------------------------------------------------------------------------------------------

def bench_row(suite, shape, pass_, flops, make, args, baselines, iters, warmup, log) -> dict:
    """Ours and every baseline on one shape and pass; ratio = ours TFLOP/s / baseline TFLOP/s."""
    ours = measure(lambda: make("ours"), args, flops, iters, warmup)
    base = {name: measure(lambda name=name: make(name), args, flops, iters, warmup) for name in baselines}
    ratios = {name: (ours["tflops"] / r["tflops"] if "tflops" in ours and "tflops" in r else None)
              for name, r in base.items()}
    row = {"suite": suite, "shape": shape, "pass": pass_, "flops": flops, "ours": ours, "baselines": base,
           "ratios": ratios}
    log(f"  {suite:9s} {shape:40s} {pass_:7s} ours {_cell(ours)} | " +
        " | ".join(f"{n} {_cell(r)}" for n, r in base.items()))
    return row


def _cell(r: dict) -> str:
    if "tflops" not in r:
        return f"n/a ({r['error']})"
    return f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.3g}"


def markdown_table(rows: list[dict], baselines) -> list[str]:
    head = ["shape", "pass", "ours TFLOP/s"]
    for b in baselines:
        head += [f"{b} TFLOP/s", f"ours/{b}"]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["shape"], r["pass"], _cell(r["ours"])]
        for b in baselines:
            ratio = r["ratios"][b]
            cells += [_cell(r["baselines"][b]), "–" if ratio is None else f"{ratio:.2f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def ours_backend(plat: str, interpret: bool) -> str:
    if interpret:
        return "TPU Mosaic kernels under the Pallas interpreter (CPU)"
    return {"gpu": "Pallas Triton kernels", "tpu": "Pallas Mosaic kernels"}.get(plat, "platform default")


def report(result: dict) -> str:
    m = result["meta"]
    out = [f"# Pallas kernels vs baselines on {m['device_kind']}{' (smoke)' if m['smoke'] else ''}", "",
           f"{m['date']}, jax {m['jax']} (jaxlib {m['jaxlib']}), Python {m['python']}, "
           f"{m['device_kind']} ({m['platform']}; device 0 of {m['device_count']}). "
           f"Command: `python experiments/bench_kernels.py {' '.join(m['argv'])}`; "
           f"median of {m['iters']} calls after {m['warmup']} warm-up. Ours: {m['ours']}.", "",
           "TFLOP/s = useful FLOPs / median time. Attention fwd = 4 B H S T D (halved when causal), "
           "fwd+bwd = 3.5 x fwd; gmm fwd = 2 m k n, fwd+bwd = 3 x fwd. ours/X > 1 means ours is faster. "
           "bf16 inputs; see the module docstring for each baseline.", ""]
    for suite, title in (("attention", "Attention (GQA 8:1)"), ("gmm", "Grouped matmul")):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        if rows:
            out += [f"## {title}", "", *markdown_table(rows, result["baselines"][suite]), ""]
    return "\n".join(out)


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _gmm_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    shapes = tuple(tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s)
    if any(len(s) != 4 for s in shapes):
        raise argparse.ArgumentTypeError(f"--gmm_shapes wants MxKxGxN[,MxKxGxN...]; got {text!r}")
    return shapes


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("attention", "gmm", "all"), default="all")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per cell (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls after compile (default 3; smoke 1)")
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (S=256, D=64, gmm [256,128]x[4,128,256]); interpret mode on CPU")
    ap.add_argument("--seq_lens", type=_csv_ints, default=None, help="attention S values, e.g. 1024,4096")
    ap.add_argument("--head_dims", type=_csv_ints, default=None, help="attention D values, e.g. 64,128")
    ap.add_argument("--tokens", type=int, default=None, help="attention tokens per call: B = tokens // S")
    ap.add_argument("--gmm_shapes", type=_gmm_shapes, default=None, help="MxKxGxN[,...], e.g. 8192x4096x8x14336")
    args = ap.parse_args(argv)
    default = SMOKE if args.smoke else dict(seq_lens=(1024, 4096, 16384), head_dims=(64, 128), tokens=16384,
                                            gmm_shapes=GMM_SHAPES)
    for key, value in default.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.iters = args.iters or (2 if args.smoke else 20)
    args.warmup = (1 if args.smoke else 3) if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plat = _platform()
    if plat == "cpu" and not args.smoke:
        raise SystemExit("bench_kernels: no GPU or TPU found. Pallas kernels have no CPU lowering and run here only "
                         "in interpret mode, which at benchmark sizes takes hours. Run on a GPU/TPU host, or pass "
                         "--smoke for the tiny CPU check.")
    interpret = plat == "cpu"
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", plat) or plat
    meta = dict(device_kind=kind, platform=plat, device_count=jax.device_count(), jax=jax.__version__,
                jaxlib=_jaxlib_version(), python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), argv=argv,
                flags={k: v for k, v in vars(args).items()}, smoke=args.smoke, iters=args.iters,
                warmup=args.warmup, interpret=interpret, ours=ours_backend(plat, interpret))
    baselines = {"attention": ATTN_BASELINES.get(plat, ("xla",)), "gmm": GMM_BASELINES.get(plat, ("ragged_dot",))}
    log(f"bench_kernels on {kind} ({plat}, device 0 of {meta['device_count']}), jax {jax.__version__}; "
        f"ours: {meta['ours']}")
    t0 = time.perf_counter()
    rows = []
    if args.suite in ("attention", "all"):
        cases = attention_cases(args.seq_lens, args.head_dims, args.tokens, args.smoke)
        rows += run_attention(cases, baselines["attention"], args.iters, args.warmup, interpret, log)
    if args.suite in ("gmm", "all"):
        rows += run_gmm(args.gmm_shapes, baselines["gmm"], args.iters, args.warmup, interpret, log)
    meta["wall_s"] = time.perf_counter() - t0
    result = dict(meta=meta, baselines={k: list(v) for k, v in baselines.items()}, rows=rows)
    text = report(result)
    log(text)
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"bench_kernels_{slug(kind)}{'_smoke' if args.smoke else ''}"
        result["files"] = [str(stem.with_suffix(".md")), str(stem.with_suffix(".json"))]
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=json_default) + "\n")
        log(f"wrote {result['files'][0]} and .json ({meta['wall_s']:.1f} s)")
    return result


def _jaxlib_version() -> str | None:
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None




if __name__ == "__main__":
    main()
