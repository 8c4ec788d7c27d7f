"""What checkpoint checksums cost: one save of a preset's whole training state (model + optimizer),
its sha256 record, and the verification a restore does, side by side in one process.

    python experiments/bench_checkpoint.py --preset 0p5b --out experiments/results/checkpoint_checksums_cpu.md

The state is created (random init) on one device with the trainer's own `place_state`; the
Checkpointer is the trainer's (async orbax save, then sha256 of every file in a background thread).
Reported: bytes on disk, save seconds (start to finalized), hashing seconds and throughput, the
verification at restore, and the restore itself.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402
from flax import nnx  # noqa: E402

from glm5v_jax.models.build import vlm_spec_from_config  # noqa: E402
from glm5v_jax.models.vlm import GLM5V  # noqa: E402
from glm5v_jax.train.checkpoint import Checkpointer, verify_checksums  # noqa: E402
from glm5v_jax.train.parallel import plan_from_config  # noqa: E402
from glm5v_jax.train.run import place_state  # noqa: E402


def measure(preset: str, directory: Path) -> dict:
    config = vlm_pretrain.get_config(preset)
    config.mesh.num_devices = 1
    config.data.batch_size = 1
    plan = plan_from_config(config.mesh, jax.devices()[:1])
    spec = vlm_spec_from_config(config.model)
    placed = place_state(config, plan, lambda: GLM5V(spec, rngs=nnx.Rngs(config.seed)))
    state = placed.state
    jax.block_until_ready(state)
    ck = Checkpointer(directory, max_to_keep=2)
    t0 = time.perf_counter()
    ck.save(1, state, {}, {}, force=True)
    ck.wait()  # the save, then the sha256 of every file
    total = time.perf_counter() - t0
    record = ck.saved[-1]
    ck.close()
    t0 = time.perf_counter()
    problem = verify_checksums(directory / "1")
    verify = time.perf_counter() - t0
    assert problem is None, problem
    ck = Checkpointer(directory, max_to_keep=2)
    t0 = time.perf_counter()
    restored = ck.restore_latest(state)
    jax.block_until_ready(restored.state)
    restore = time.perf_counter() - t0  # includes the verification
    ck.close()
    return dict(preset=preset, params=placed.params, state_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
                bytes=record["bytes"], save_s=record["seconds"],
                hash_s=record["hash_seconds"], save_and_hash_s=total, verify_s=verify, restore_s=restore)


def report(r: dict) -> str:
    gib = r["bytes"] / 2**30
    return "\n".join([
        f"# Checkpoint checksums: cost per save, preset `{r['preset']}`",
        "",
        f"Machine: {jax.devices()[0].device_kind} ({jax.default_backend()}), one device; "
        f"`python experiments/bench_checkpoint.py --preset {r['preset']}`.",
        "",
        f"Training state: {r['params'] / 1e6:.0f}M parameters with the default optimizer (Muon + AdamW groups), "
        f"{r['state_bytes'] / 2**30:.2f} GiB in memory.",
        "",
        "| | value |",
        "|---|---|",
        f"| bytes on disk (hashed) | {r['bytes']:,} ({gib:.2f} GiB) |",
        f"| async save, start to finalized | {r['save_s']:.2f} s |",
        f"| sha256 of every file (background thread, after the save) | {r['hash_s']:.2f} s "
        f"({gib / max(r['hash_s'], 1e-9):.2f} GiB/s) |",
        f"| hashing / save | {r['hash_s'] / max(r['save_s'], 1e-9):.2f} |",
        f"| verification at restore | {r['verify_s']:.2f} s |",
        f"| restore (verification included) | {r['restore_s']:.2f} s |",
        "| checksums.json | one line per file: path, bytes, sha256 |",
        "",
        "The hashing runs in a background thread after the save finalizes, so training steps overlap it;",
        "the main thread only waits for it at the end of the run. The verification reads every file once",
        "more before the restore reads it. The state is freshly initialised: its optimizer moments are zeros,",
        "which orbax stores compressed, so a trained state's checkpoint is larger (up to the in-memory size);",
        "hashing time scales with the bytes at the throughput above.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0p5b")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        text = report(measure(args.preset, directory / "checkpoints"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
