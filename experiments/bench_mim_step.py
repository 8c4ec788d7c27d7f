"""Stage-1 (masked distillation) step time, split between the frozen teachers and the student.

    python experiments/bench_mim_step.py                         # tiny preset, CPU: seconds
    python experiments/bench_mim_step.py --preset base --batch 2 --repeats 1   # CogViT-B + So400m + DINOv3-L

Times, side by side in one process on one random NaFlex batch (compile and one warm-up call
excluded; median of --repeats):
  teachers   the jitted forward of every teacher (bfloat16, no gradients) and the target
             standardisation, alone;
  step       the whole jitted train step of `glm5v_jax.train.cogvit_mim` (mask, teachers,
             student forward and backward, optimizer update);
  student    step - teachers (the student's share, optimizer included).
Teachers are random-init: the time does not depend on the weights. Also reports each part's
analytic forward FLOPs share (2 x parameters x tokens, attention excluded) for comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
RESULTS = ROOT / "experiments" / "results"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "base"))
    p.add_argument("--batch", type=int, default=0, help="images per step; 0: the preset's")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import cogvit_mim as mim_config
    from glm5v_jax.losses.distill import FeatureStandardizer
    from glm5v_jax.models.build import teachers_from_config, vision_spec_from_config
    from glm5v_jax.models.cogvit_mim import MIMStudent
    from glm5v_jax.train import cogvit_mim as trainer
    from glm5v_jax.train.optimizer import transform_from_config
    from glm5v_jax.train.run import TrainState

    config = mim_config.get_config(args.preset)
    spec = vision_spec_from_config(config.model.vision, dtype=config.model.dtype)
    teachers = teachers_from_config(config.teachers)
    student = MIMStudent(spec, {n: t.dim for n, t in teachers.items()}, rngs=nnx.Rngs(0))
    tx, _, _, _ = transform_from_config(student, config.optim, 1000)
    stds = {n: FeatureStandardizer(t.dim, config.mim.standardize) for n, t in teachers.items()}
    state = TrainState(student, nnx.Optimizer(student, tx, wrt=nnx.Param), standardizers=nnx.Dict(stds))
    modules = nnx.Dict({n: t.module for n, t in teachers.items()})

    b, n = args.batch or config.data.batch_size, spec.max_patches
    rng = np.random.default_rng(0)
    side = int(np.sqrt(n))
    rows, cols = np.indices((side, n // side))
    yx = np.stack([rows.ravel(), cols.ravel()], -1)[:n].astype(np.int32)
    batch = {"patches": jnp.asarray(rng.uniform(-1, 1, (b, n, spec.patch_size ** 2 * 3)).astype(np.float32)),
             "patch_yx": jnp.asarray(np.broadcast_to(yx, (b, n, 2))), "valid": jnp.ones((b, n), bool)}

    @nnx.jit
    def teachers_only(state, modules, batch):
        out = {}
        for name, teacher in modules.items():
            feats = teacher(batch["patches"], batch["patch_yx"], batch["valid"])["tokens"]
            state.standardizers[name].update(feats, batch["valid"])
            out[name] = state.standardizers[name](feats)
        return out

    step = trainer.make_train_step(config)

    def timed(fn):
        jax.block_until_ready(fn())  # compile
        jax.block_until_ready(fn())  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    key = jax.random.key(0)
    t_teachers = timed(lambda: teachers_only(state, modules, batch))
    t_step = timed(lambda: step(state, modules, batch, key))

    def params(module):
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    flops = {name: 2 * params(t.module) * b * n for name, t in teachers.items()}
    flops["student (fwd+bwd)"] = 6 * params(student) * b * n
    total = sum(flops.values())
    lines = [f"# Stage-1 step time split ({args.preset})", "",
             f"Command: `python experiments/bench_mim_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"{b} images x {n} patches, backend {jax.default_backend()} ({os.cpu_count()} CPU cores), "
             f"jax {jax.__version__}, median of {args.repeats}.", "",
             "| part | seconds | share of step |", "|---|---|---|",
             f"| teachers (forward + standardisation) | {t_teachers:.4f} | {t_teachers / t_step:.2f} |",
             f"| student (step - teachers) | {t_step - t_teachers:.4f} | {1 - t_teachers / t_step:.2f} |",
             f"| whole step | {t_step:.4f} | 1.00 |", "",
             "Analytic FLOPs share (2 x params x tokens per forward; the student's backward counted as 2x):", "",
             "| part | GFLOPs | share |", "|---|---|---|"]
    lines += [f"| {k} | {v / 1e9:.2f} | {v / total:.2f} |" for k, v in flops.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return {"teachers_s": t_teachers, "step_s": t_step}


if __name__ == "__main__":
    main()
