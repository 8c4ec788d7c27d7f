"""Ahead-of-time compile of the training step for a TPU topology, on a host without a TPU.

    python -m glm5v_jax.tools.aot --config=configs/vlm_pretrain.py:0p5b --topology=v5p:2x2x1 \
        [--config.data.batch_size=8 --config.mesh.shape='(1,-1,1,1)'] [--hbm_gib=95] [--json=out.json]

Why: whether a model, mesh and batch fit a TPU slice, and which collectives the sharding
turns into, is only known once the TPU compiler has run. With libtpu installed
(`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes the devices of any
slice (`v5p:4x4x4`, `v5e:16x16`, ...), and `jit(...).lower(...).compile()` runs the real
TPU compiler for them on a CPU host, without allocating anything.

What is compiled is the step of the stage `config.trainer` names (its module's
`abstract_program`, through the stage registry `glm5v_jax.train.stages`: the VLM's forward,
backward, optimizer and router-bias update; CogViT stage 1's teachers, student and optimizer;
stage 2's two towers and sigmoid loss; SFT's step) with the mesh of `config.mesh` over the topology's devices and the
checks of `preflight` run first. The VLM keeps the preset's vocabulary size (the trainer
replaces it with the tokenizer's padded size; there is no tokenizer here).

    python -m glm5v_jax.tools.aot --config=configs/cogvit_mim.py:base --topology=v5p:2x2x2

Prints the per-device memory from the compiler (arguments, outputs, aliased, temporaries,
generated code; estimated peak = arguments + outputs - aliased + temporaries) against the
chip's HBM, a static count of the collectives in the compiled HLO (an op inside the layer
scan counts once), the cost model's FLOPs and the compile time. Nothing is compiled when
the state and batch shards alone exceed HBM; a step whose temporaries alone exceed the
chip's HBM is refused by the TPU compiler (RESOURCE_EXHAUSTED): both count as not fitting.
`--noupdate_rms` leaves out the trainer's per-group update-RMS metrics.

Exit codes: 0 fits, 1 does not fit, 2 configuration error (the message names the field or
flag), 3 libtpu missing, 4 any other failure (traceback printed).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

import jax
from etils import epath

from glm5v_jax.errors import ConfigError, run_cli
from glm5v_jax.train.stages import stage_module

GiB = 1024**3
# HBM per chip in GiB, by generation (the first part of --topology).
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_CONFIG, EXIT_NO_LIBTPU, EXIT_ERROR = 0, 1, 2, 3, 4



class LibtpuMissing(RuntimeError):
    """libtpu is not installed: TPU topologies cannot be described or compiled for."""


def libtpu_available() -> bool:
    """Whether libtpu can be imported (it describes and compiles for TPU topologies)."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def chip_generation(topology: str) -> str:
    """`v5p` from `v5p:4x4x4`; an unknown generation is a ConfigError naming --topology."""
    gen = topology.split(":", 1)[0].strip().lower()
    gen = _ALIASES.get(gen, gen)
    if ":" not in topology or gen not in HBM_GIB_PER_CHIP:
        raise ConfigError("--topology", f"{topology!r}: expected <generation>:<chips>, e.g. v5p:2x2x1, with a "
                                        f"generation in {sorted(HBM_GIB_PER_CHIP)}")
    return gen


def topology_devices(topology: str) -> list:
    """The TPU devices of `topology`, described by libtpu (no TPU needed)."""
    gen = chip_generation(topology)
    if not libtpu_available():
        raise LibtpuMissing("libtpu is not installed; install the TPU extra: pip install -e '.[tpu]'")
    # Compile only: let several processes load libtpu at once (it otherwise takes a host-wide
    # lock, /tmp/libtpu_lockfile). libtpu warns about the TPU_* variables off a TPU VM.
    shape = topology.split(":", 1)[1]
    chips = 1
    for n in shape.split("x"):
        chips *= int(n) if n.isdigit() else 1
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}.get(
        gen, f"{gen}-{2 * chips}"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=f"{gen}:{shape}", platform="tpu").devices)
    except Exception as e:  # noqa: BLE001
        if "lockfile" in str(e):  # another libtpu user, not a bad name
            raise
        raise ConfigError("--topology", f"{topology!r}: libtpu refused it: {e}") from None


def count_chips(devices: Sequence[Any]) -> int:
    """Distinct chips (coordinates per slice); v4 shows two devices (cores) per chip."""
    return len({(tuple(getattr(d, "coords", (d.id,))), getattr(d, "slice_index", 0)) for d in devices})


def count_collectives(hlo_text: str) -> dict[str, int]:
    """{kind: number of ops} in compiled HLO text (async `-start` ops count once). The TPU
    compiler writes a reduce-scatter as an all-reduce + dynamic-slice fusion whose computation
    is named `all-reduce-scatter...`: its all-reduce counts as a reduce-scatter."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in hlo_text.splitlines():
        if line[:1] not in ("", " ", "\t"):  # a computation header (or its closing brace)
            computation = line
        for m in _COLLECTIVE_RE.finditer(line):
            kind = m.group(1)
            if kind == "all-reduce" and computation.lstrip("%").startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            counts[kind] += 1
    return counts


def argument_bytes_per_device(tree: Any) -> int:
    """Bytes of the largest shards of a tree of sharded ShapeDtypeStructs on one device: a lower
    bound of the step's memory, known without compiling."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def analyse(compiled: Any, hbm_bytes_per_device: float, num_devices: int) -> dict[str, Any]:
    """Memory, collectives and FLOPs of a compiled step; `fits` compares the peak with HBM."""
    mem = compiled.memory_analysis()
    out: dict[str, Any] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["fits"] = out["peak"] <= hbm_bytes_per_device
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops_per_device"] = float((cost or {}).get("flops", float("nan")))
    out["flops_per_step"] = out["flops_per_device"] * num_devices
    out["collectives"] = count_collectives(compiled.as_text())
    return out


def run(config: Any, topology: str, hbm_gib: float | None = None, update_rms: bool = True) -> dict[str, Any]:
    """Compile `config`'s train step for `topology`; returns the report as a dict.

    Not compiled when the arguments alone (state + batch shards) exceed HBM. The TPU
    compiler itself refuses a step that does not fit its chip (RESOURCE_EXHAUSTED):
    that is reported as not fitting, with the compiler's message."""

    gen = chip_generation(topology)
    devices = topology_devices(topology)
    chips = count_chips(devices)
    hbm = (HBM_GIB_PER_CHIP[gen] if hbm_gib is None else hbm_gib) * GiB * chips / len(devices)
    program = stage_module(config).abstract_program(config, devices, update_rms=update_rms)
    r: dict[str, Any] = dict(
        topology=topology, generation=gen, device_kind=devices[0].device_kind, chips=chips, devices=len(devices),
        trainer=str(config.get("trainer", "vlm_pretrain")),
        mesh={a: int(n) for a, n in program.plan.mesh.shape.items()}, batch_axes=list(program.plan.batch_axes),
        **program.facts, summary=program.summary,
        replicated_fraction=program.replicated_fraction, hbm=int(hbm),
        argument_lower_bound=argument_bytes_per_device(program.args),
        analytic_flops_per_step=program.analytic_flops_per_step, compiled=False, error=None)
    if r["argument_lower_bound"] > hbm:
        return dict(r, fits=False, error="not compiled: the state and batch shards alone exceed HBM")
    t0 = time.perf_counter()
    lowered = program.step.lower(*program.args)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"temporaries \(([\d.]+)([KMGT])\)", str(e))  # "... temporaries (320.46G) exceeds"
        return dict(r, fits=False, lower_seconds=t1 - t0, compile_seconds=time.perf_counter() - t1,
                    temp=int(float(need[1]) * 1024 ** "KMGT".index(need[2]) * 1024) if need else None,
                    error=f"the TPU compiler ran out of memory: {str(e).strip()[:2000]}")
    r.update(compiled=True, lower_seconds=t1 - t0, compile_seconds=time.perf_counter() - t1)
    return dict(r, **analyse(compiled, hbm, len(devices)))


def format_report(r: dict[str, Any]) -> str:
    """The human-readable summary printed by the tool."""
    g = lambda n: f"{n / GiB:9.2f} GiB"  # noqa: E731
    mesh = ", ".join(f"{a}={n}" for a, n in r["mesh"].items())
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    lines = [
        f"topology        {r['topology']} ({r['device_kind']}): {r['chips']} chips, {r['devices']} devices",
        f"mesh            ({mesh}); batch over {tuple(r['batch_axes'])}",
        f"trainer         {r['trainer']}",
        f"batch           {r['summary']}",
        f"replicated      {100 * r['replicated_fraction']:.2f}% of parameter bytes over a non-data axis",
        f"state + batch   {g(r['argument_lower_bound'])} per device (from the shardings)",
    ]
    if r["compiled"]:
        coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items())
        lines += [
            "memory per device (compiler's memory_analysis):",
            f"  arguments     {g(r['argument'])}", f"  outputs       {g(r['output'])}",
            f"  aliased       {g(r['alias'])}", f"  temporaries   {g(r['temp'])}",
            f"  generated code{g(r['generated_code'])}",
            f"  peak (est.)   {g(r['peak'])}  = arguments + outputs - aliased + temporaries",
            f"  HBM           {g(r['hbm'])}  -> {verdict} ({100 * r['peak'] / max(r['hbm'], 1):.1f}% of HBM)",
            f"collectives     {coll} (static count in the compiled HLO; an op in a scan body counts once)",
            f"FLOPs           cost model {r['flops_per_device']:.4g} per device, {r['flops_per_step']:.4g} per step "
            f"(scan bodies counted once); analytic {r['analytic_flops_per_step']:.4g} per step",
        ]
    else:
        lines.append(f"HBM             {g(r['hbm'])}  -> {verdict}: {r['error']}")
    if "compile_seconds" in r:
        lines.append(f"compile         {r['compile_seconds']:.1f} s (lowering {r['lower_seconds']:.1f} s)")
    return "\n".join(lines)


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program, like tools.summary)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vlm_pretrain.py:0p5b.",
                                               lock_config=True),
        topology=flags.DEFINE_string("topology", None, "TPU topology: v5p:2x2x1, v5p:4x4x4, v5e:16x16, v6e:16x16."),
        hbm_gib=flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: the generation's)."),
        json=flags.DEFINE_string("json", None, "Write the numbers to this JSON file."),
        update_rms=flags.DEFINE_bool("update_rms", True, "Include the trainer's per-group update-RMS metrics."),
    )


def main(argv: Sequence[str], f: dict[str, Any]) -> None:
    del argv
    if f["topology"].value is None:
        sys.exit("error: --topology is required (e.g. --topology=v5p:2x2x1)")
    try:
        report = run(f["config"].value, f["topology"].value, f["hbm_gib"].value, f["update_rms"].value)
    except LibtpuMissing as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NO_LIBTPU)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except Exception:  # noqa: BLE001 - not to be mistaken for "does not fit" (1)
        traceback.print_exc()
        sys.exit(EXIT_ERROR)
    print(format_report(report), flush=True)
    if f["json"].value:
        with epath.Path(f["json"].value).open("w") as fh:  # local or gs://
            json.dump(report, fh, indent=1)
    sys.exit(EXIT_FITS if report["fits"] else EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    _FLAGS = define_flags()
    flags.mark_flag_as_required("config")
    jax.config.update("jax_platforms", "cpu")  # nothing runs locally; never take a real TPU
    run_cli(lambda argv: main(argv, _FLAGS))
