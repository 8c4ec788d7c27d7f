"""Does the glm45_air train step fit a v5p slice? AOT-compile it over growing topologies.

    python experiments/aot_sweep.py [--runs 2x2x4:1,-1,1,8 2x4x4:1,-1,1,1:expert_parallel ...]
                                    [--timeout 1800] [--workdir /tmp/aot_sweep] [--table_only]

Each run is `python -m glm5v_jax.tools.aot --config=configs/vlm_pretrain.py:glm45_air,remat=True,
moe_impl=<impl> --topology=v5p:<shape> --config.mesh.shape=(<mesh>) --config.data.batch_size=<chips>`
(one 4096-token row per chip, the smallest batch a mesh with every axis on the batch allows) in its
own process with a timeout; its JSON goes to <workdir>/<name>.json. The markdown table of every
JSON in the workdir is written to experiments/results/aot_glm45_air_v5p.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "aot_glm45_air_v5p.md"
DEFAULT_RUNS = ("2x2x1:1,-1,1,1", "2x2x2:1,-1,1,8", "2x2x4:1,-1,1,8", "2x2x4:1,-1,1,1", "2x4x4:1,-1,1,8",
                "2x4x4:1,-1,1,1")
GiB = 1024**3


def parse_run(text: str) -> tuple[str, str, str]:
    """'2x2x4:1,-1,1,8[:moe_impl]' -> (shape, mesh, moe_impl)."""
    parts = text.split(":")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else "ragged_dot"


def run_one(shape: str, mesh: str, impl: str, workdir: Path, timeout: float, extra: list[str]) -> None:
    chips = math.prod(int(n) for n in shape.split("x"))
    name = f"{shape}_{mesh.replace(',', '_').replace('-', 'm')}_{impl}"
    cmd = [sys.executable, "-m", "glm5v_jax.tools.aot",
           f"--config=configs/vlm_pretrain.py:glm45_air,remat=True,moe_impl={impl}", f"--topology=v5p:{shape}",
           f"--config.mesh.shape=({mesh})", f"--config.data.batch_size={chips}",
           f"--json={workdir / (name + '.json')}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        print(p.stdout, p.stderr[-3000:] if p.returncode not in (0, 1) else "", f"rc={p.returncode}", flush=True)
        if p.returncode not in (0, 1):
            (workdir / (name + ".json")).write_text(json.dumps(dict(
                topology=f"v5p:{shape}", chips=chips, mesh_arg=mesh, moe_impl=impl, global_batch=chips,
                error=(p.stderr.strip().splitlines() or ["?"])[-1], rc=p.returncode)))
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s", flush=True)
        (workdir / (name + ".json")).write_text(json.dumps(dict(
            topology=f"v5p:{shape}", chips=chips, mesh_arg=mesh, moe_impl=impl, global_batch=chips,
            error=f"compile did not finish within {timeout:.0f} s", rc=None)))
    print(f"[{time.time() - t0:.0f} s wall]", flush=True)


def table(workdir: Path) -> list[str]:
    g = lambda n: "-" if n is None else f"{n / GiB:.1f}"  # noqa: E731
    rows = ["| topology | chips | mesh (data,fsdp,tensor,expert) | optimizer | moe_impl | batch (rows) | "
            "state+batch GiB | args GiB | temps GiB | peak GiB | fits 95 GiB | compile s | "
            "collectives AR/AG/RS/A2A/CP | note |",
            "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    reports = [json.loads(p.read_text()) for p in workdir.glob("*.json")]
    for r in sorted(reports, key=lambda r: (r.get("chips", 0), str(r.get("mesh", r.get("mesh_arg"))),
                                            r.get("optimizer", ""), r.get("moe_impl", ""))):
        mesh = ",".join(str(v) for v in r["mesh"].values()) if "mesh" in r else r.get("mesh_arg", "?")
        c = r.get("collectives")
        coll = "/".join(str(c[k]) for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                             "collective-permute")) if c else "-"
        fits = {True: "**yes**", False: "no"}.get(r.get("fits"), "?")
        note = (r.get("error") or "").replace("|", "/").replace("\n", " ")
        if note.startswith("the TPU compiler ran out of memory"):
            note = "compiler: temporaries alone exceed HBM (RESOURCE_EXHAUSTED; compile s = time to fail)"
        elif note.startswith("not compiled"):
            note = "not compiled: state + batch shards exceed HBM"
        elif r.get("compiled") and not r.get("fits"):
            note = "compiled; args + temps exceed HBM"
        comp = f"{r['compile_seconds']:.0f}" if r.get("compile_seconds") is not None else "-"
        rows.append(f"| {r['topology']} | {r['chips']} | ({mesh}) | {r.get('optimizer', '?')} | "
                    f"{r.get('moe_impl', '?')} | {r['global_batch']} | {g(r.get('argument_lower_bound'))} | "
                    f"{g(r.get('argument'))} | {g(r.get('temp'))} | {g(r.get('peak'))} | {fits} | {comp} | {coll} | "
                    f"{note} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="shape:mesh[:moe_impl] items")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/aot_sweep"))
    ap.add_argument("--table_only", action="store_true", help="only rewrite the markdown from the JSON files")
    ap.add_argument("--header", type=Path, default=None, help="markdown put above the table (default: keep "
                    "the existing file's text above the table)")
    args, extra = ap.parse_known_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for item in args.runs:
            run_one(*parse_run(item), args.workdir, args.timeout, extra)
    marker = "<!-- table -->"
    head = args.header.read_text() if args.header else (
        OUT.read_text().split(marker)[0] if OUT.exists() else "# glm45_air train step on v5p (AOT)\n\n")
    tail = OUT.read_text().split(marker)[2] if OUT.exists() and OUT.read_text().count(marker) >= 2 else "\n"
    OUT.write_text(head + marker + "\n" + "\n".join(table(args.workdir)) + "\n" + marker + tail)
    print("\n".join(table(args.workdir)))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
