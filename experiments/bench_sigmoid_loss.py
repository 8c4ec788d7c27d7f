"""Ring vs all-gather sigmoid (SigLIP) loss: per-device compiled memory and step time, side by side.

    python experiments/bench_sigmoid_loss.py                         # 8 fake CPU devices, ~2 min on 2 cores
    python experiments/bench_sigmoid_loss.py --topology v5p:2x2x2    # + TPU memory (AOT compile, needs libtpu)

For each per-device batch b (global B = b x devices) it compiles `value_and_grad` of
`glm5v_jax.losses.sharded_sigmoid_contrastive_loss` (image and text embeddings [B, D], t', b)
with `impl="ring"` and `impl="all_gather"`, and reports the compiler's per-device memory
analysis (temporaries, the part that scales with the batch: b x B logits for all-gather, b x b
for the ring) and, on the host devices, the median wall time of `--repeats` calls. With
`--topology` the same programs are also compiled for that TPU topology (memory only; nothing
runs). Ratios are ring / all-gather from the same run. Fake CPU devices share the host's cores,
so the CPU times say how the two schedules compare in work, not what an interconnect does.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "sigmoid_loss_cpu8.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (set before jax starts)")
    p.add_argument("--per_device", default="64,256,1024,2048", help="per-device batch sizes b")
    p.add_argument("--dim", type=int, default=768, help="embedding width D")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--topology", default="", help="also compile for this TPU topology, e.g. v5p:2x2x2")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no file written (tests)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from glm5v_jax.losses.contrastive import sharded_sigmoid_contrastive_loss

    sizes = [int(s) for s in args.per_device.split(",")]
    if args.smoke:
        sizes, args.dim, args.repeats = [8, 32], 16, 1
    host_mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",), axis_types=(AxisType.Auto,))
    meshes = {"cpu": host_mesh}
    if args.topology:
        from glm5v_jax.tools.aot import topology_devices

        devs = topology_devices(args.topology)
        meshes["tpu"] = Mesh(np.array(devs), ("data",), axis_types=(AxisType.Auto,))

    def program(mesh, impl, per_device):
        n = per_device * mesh.size
        emb = jax.ShapeDtypeStruct((n, args.dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

        def loss(i, t, tp, bb):
            return sharded_sigmoid_contrastive_loss(i, t, tp, bb, mesh=mesh, batch_axes="data", impl=impl)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        return fn, fn.lower(emb, emb, scalar, scalar).compile()

    rows = []
    for per_device in sizes:
        row = {"b": per_device, "B": per_device * args.devices}
        for impl in ("ring", "all_gather"):
            fn, compiled = program(host_mesh, impl, per_device)
            row[f"cpu_temp_{impl}"] = compiled.memory_analysis().temp_size_in_bytes
            rng = np.random.default_rng(0)
            sh = NamedSharding(host_mesh, P("data"))
            img = jax.device_put(rng.normal(size=(row["B"], args.dim)).astype(np.float32), sh)
            txt = jax.device_put(rng.normal(size=(row["B"], args.dim)).astype(np.float32), sh)
            tp, bb = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
            jax.block_until_ready(compiled(img, txt, tp, bb))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(img, txt, tp, bb))
                times.append(time.perf_counter() - t0)
            row[f"cpu_s_{impl}"] = statistics.median(times)
            if "tpu" in meshes:
                _, tpu = program(meshes["tpu"], impl, per_device)
                row[f"tpu_temp_{impl}"] = tpu.memory_analysis().temp_size_in_bytes
        rows.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    text = render(rows, args, jax, "tpu" in meshes)
    print(text)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return rows


def _mib(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def render(rows, args, jax, with_tpu: bool) -> str:
    head = ["b per device", "global B", "CPU temp MiB ring", "CPU temp MiB all-gather", "ratio",
            "CPU s ring", "CPU s all-gather", "ratio"]
    if with_tpu:
        head += [f"{args.topology} temp MiB ring", "all-gather", "ratio"]
    lines = ["# Sigmoid loss: ring vs all-gather (value and gradients)", "",
             f"Command: `python experiments/bench_sigmoid_loss.py {' '.join(sys.argv[1:])}`", "",
             f"Embedding width D = {args.dim}, {args.devices} devices on one `data` axis, float32. Temp = the "
             f"compiler's per-device temporaries (memory_analysis); s = median of {args.repeats} calls. "
             f"Ratios are ring / all-gather from this run.", "",
             f"Host: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
             f"{args.devices} fake CPU devices sharing those cores.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["b"]), str(r["B"]), _mib(r["cpu_temp_ring"]), _mib(r["cpu_temp_all_gather"]),
                 f"{r['cpu_temp_ring'] / r['cpu_temp_all_gather']:.3f}", f"{r['cpu_s_ring']:.4f}",
                 f"{r['cpu_s_all_gather']:.4f}", f"{r['cpu_s_ring'] / r['cpu_s_all_gather']:.2f}"]
        if with_tpu:
            cells += [_mib(r["tpu_temp_ring"]), _mib(r["tpu_temp_all_gather"]),
                      f"{r['tpu_temp_ring'] / r['tpu_temp_all_gather']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
