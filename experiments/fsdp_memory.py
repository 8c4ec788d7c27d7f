"""Per-device parameter + optimizer bytes under FSDP over N = 1, 2, 4, 8 devices.

    python experiments/fsdp_memory.py --config "tiny" [--devices 8]

Builds the config's model and its optimizer (the trainer's, Muon by default) already
sharded on a (data=1, fsdp=N, tensor=1, expert=1) mesh with the default logical rules,
and reads each device's bytes from the arrays' shards. On a CPU host the N devices are
fake (`--devices` sets how many; `--devices 0` uses the real accelerators).
Writes `experiments/results/fsdp_memory_cpu.md`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--devices", type=int, default=8, help="> 0: that many fake CPU devices; 0: the real ones")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "fsdp_memory_cpu.md")
    args = parser.parse_args()
    if args.devices > 0:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.devices > 0:
        jax.config.update("jax_num_cpu_devices", args.devices)
    from flax import nnx

    import vlm_pretrain
    from glm5v_jax.models.build import vlm_spec_from_config
    from glm5v_jax.models.vlm import GLM5V
    from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
    from glm5v_jax.sharding.partition import bytes_per_device, create_sharded
    from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules, parameter_shardings
    from glm5v_jax.train.vlm_pretrain import build_optimizer

    cfg = vlm_pretrain.get_config(args.config)
    spec = vlm_spec_from_config(cfg.model)
    rows = ["| FSDP devices N | bytes per device (max) | x of N=1 | ideal 1/N |", "|---:|---:|---:|---:|"]
    base = None
    n = 1
    while n <= len(jax.devices()):
        mesh = make_mesh(MeshSpec(shape=(1, n, 1, 1)), jax.devices()[:n])
        rules = check_rules(DEFAULT_RULES, mesh.axis_names)
        abstract = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))
        shardings = parameter_shardings(abstract, mesh, rules)

        def make():
            model = GLM5V(spec, rngs=nnx.Rngs(0))
            return model, build_optimizer(model, cfg.optim, cfg.total_steps)[0]

        _, state, _ = create_sharded(make, mesh, shardings)
        per_device = max(bytes_per_device(state).values())
        base = base or per_device
        rows.append(f"| {n} | {per_device:,} | {per_device / base:.3f} | {1 / n:.3f} |")
        print(rows[-1], flush=True)
        n *= 2
    text = "\n".join([
        f"# Per-device parameter + optimizer bytes under FSDP (`{args.config}`, CPU)", "",
        f"Command: `python experiments/fsdp_memory.py --config \"{args.config}\" --devices {args.devices}` "
        f"(jax {jax.__version__}, fake CPU devices). Model and optimizer ({cfg.optim.name}) created sharded on "
        "a (data=1, fsdp=N, tensor=1, expert=1) mesh with the default rules; bytes read from the arrays' "
        "shards (parameters, optimizer moments, step counters, router biases).", "", *rows, "",
        "What stays replicated (norm scales, biases, the router correction bias, counters) is the gap "
        "between the measured and the ideal column.", ""])
    args.out.write_text(text)


if __name__ == "__main__":
    main()
