"""Joint RL against single-family RL and single-task SFT: the report's cross-domain interference claim.

    python experiments/rl_joint_vs_single.py --sft_run=RUN --family=shapes/count --steps=30 --workdir=/tmp/jvs

From one SFT checkpoint (`--sft_run`, e.g. a `configs/vlm_sft.py:tiny` run), the same number of optimizer
steps of each arm, as a user runs them (`python -m glm5v_jax.main`):

  joint RL     configs/rl.py:<preset> over every family of `--families`
  single RL    configs/rl.py:<preset> over `--family` alone
  single SFT   configs/vlm_sft.py:<preset> on conversations of `--family`'s SFT task alone (data.sft.tasks)

then every arm's last checkpoint, and the SFT start, answer `--eval_prompts` held-out prompts of every
family `--n` times (`glm5v_jax.rl.evaluate`). The report (section 2.4) says joint RL gains broadly with
weaker cross-domain interference than SFT: here that reads as the change on the other families (the
mean over them of the reward's change from the start) of single RL against single SFT, and joint RL's
change on every family. Output: `<out_dir>/rl_joint_vs_single.md|.json` with the table and the verdict.
`--extra` passes `--config.*` overrides to every arm (tests use it for a smaller model).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# an RL family -> the SFT conversation task that teaches the same skill (glm5v_jax.data.conversations.TASKS)
SFT_TASK = {"shapes/count": "count", "shapes/colour": "colour", "shapes/position": "position",
            "shapes/grounding": "grounding", "shapes/ocr": "ocr"}
ARMS = ("joint_rl", "single_rl", "single_sft")


def arm_command(arm: str, args, workdir: Path) -> list[str]:
    """The `python -m glm5v_jax.main` command line of one arm."""
    common = [f"--workdir={workdir}", f"--config.init_from={args.sft_run}:=", f"--config.total_steps={args.steps}",
              "--config.eval_every=0", f"--config.checkpoint_every={args.steps}", f"--config.seed={args.seed}",
              *args.extra]
    if arm == "single_sft":
        return [sys.executable, "-m", "glm5v_jax.main", f"--config=configs/vlm_sft.py:{args.preset}", *common,
                f"--config.data.sft.tasks={SFT_TASK[args.family]}", "--config.rl_eval.prompts=0"]
    families = args.family if arm == "single_rl" else args.families
    return [sys.executable, "-m", "glm5v_jax.main", f"--config=configs/rl.py:{args.preset}", *common,
            f"--config.rl.families={families}", "--config.rl_eval.prompts=0"]


def evaluate_run(workdir: Path, families: Sequence[str], prompts: int, n: int, max_new_tokens: int) -> dict:
    """{family: reward mean} (and "all") of a run's newest checkpoint on held-out prompts."""
    from glm5v_jax.generate.requests import Sampling
    from glm5v_jax.generate.run_loader import load_run
    from glm5v_jax.rl.evaluate import evaluate

    model, tokenizer, _ = load_run(str(workdir))
    ev = evaluate(model, tokenizer, families=list(families), prompts=prompts, n=n, max_new_tokens=max_new_tokens,
                  sampling=Sampling(1.0, seed=0))
    return {k[:-len("/reward_mean")]: v for k, v in ev.summary.items() if k.endswith("/reward_mean")}


def compare(scores: Mapping[str, Mapping[str, float]], family: str, families: Sequence[str]) -> dict:
    """Changes from the start ("sft_start") per arm: on `family`, mean over the other families, and on each."""
    start = scores["sft_start"]
    others = [f for f in families if f != family]
    out = {}
    for arm in ARMS:
        if arm not in scores:
            continue
        delta = {f: scores[arm][f] - start[f] for f in families}
        out[arm] = dict(target=delta[family], others=sum(delta[f] for f in others) / max(len(others), 1),
                        improved=sum(d > 0 for d in delta.values()), per_family=delta)
    return out


def noise(answers_per_family: int, families: int) -> float:
    """Two standard errors of a difference between two arms' mean change over `families` families, each mean
    reward (in [0, 1], so a standard deviation of at most 0.5) over `answers_per_family` answers: the
    smallest difference this experiment can tell from sampling noise."""
    return 2 * 0.5 * (2 / (answers_per_family * max(families, 1))) ** 0.5


def verdict(changes: Mapping[str, Mapping], family: str, answers_per_family: int) -> str:
    """One paragraph on the report's claim from `compare`'s changes; differences within `noise` are
    reported as such, not as a verdict."""
    rl, sft, joint = changes.get("single_rl"), changes.get("single_sft"), changes.get("joint_rl")
    parts = []
    if joint:
        parts.append(f"Joint RL changed the mean reward of {joint['improved']} of {len(joint['per_family'])} "
                     f"families upwards ({family}: {joint['target']:+.3f}; others on average {joint['others']:+.3f}).")
    if rl and sft:  # interference: what training on one family cost the others (0 when they gained)
        harm_rl, harm_sft = max(0.0, -rl["others"]), max(0.0, -sft["others"])
        margin = noise(answers_per_family, len(rl["per_family"]) - 1)
        if abs(rl["others"] - sft["others"]) < margin:
            said = (f"the two differ by less than the sampling noise of this run ({margin:.3f}, two standard "
                    "errors): no verdict at this scale.")
        elif harm_rl < harm_sft:
            said = "RL interfered less than SFT, as the report says."
        elif harm_rl == harm_sft == 0:
            said = "neither lowered the other families, so there is no interference to compare."
        else:
            said = "RL did not interfere less than SFT here, against the report."
        parts.append(f"Trained on {family} alone, RL moved the other families by {rl['others']:+.3f} on average and "
                     f"SFT by {sft['others']:+.3f} (target: RL {rl['target']:+.3f}, SFT {sft['target']:+.3f}): "
                     + said)
    return " ".join(parts)


def report(result: dict) -> str:
    fams, s = result["families"], result["settings"]
    arms = ["sft_start", *[a for a in ARMS if a in result["scores"]]]
    head = ["family", *arms]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(arms) + "|"]
    for f in [*fams, "all"]:
        lines.append(f"| {f} | " + " | ".join(f"{result['scores'][a].get(f, float('nan')):.3f}" for a in arms) + " |")
    ch = result["changes"]
    lines += ["", "| arm | change on " + s["family"] + " | mean change on the others | families improved |",
              "|---|---:|---:|---:|"]
    lines += [f"| {a} | {c['target']:+.3f} | {c['others']:+.3f} | {c['improved']} / {len(fams)} |"
              for a, c in ch.items()]
    return "\n".join([
        "# Joint RL vs single-family RL vs single-task SFT", "",
        f"From `{s['sft_run']}`; {s['steps']} optimizer steps per arm ({s['preset']} preset); mean reward on "
        f"{s['eval_prompts']} held-out prompts per family x {s['n']} samples at temperature 1 "
        f"(`glm5v_jax.rl.evaluate`). Command: `python experiments/rl_joint_vs_single.py {' '.join(s['argv'])}` "
        f"({result['wall_s']:.0f} s wall).", "", *lines, "", "**Verdict.** " + result["verdict"], ""])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft_run", required=True)
    ap.add_argument("--family", default="shapes/count", choices=sorted(SFT_TASK))
    ap.add_argument("--families", default="", help="joint RL's families ('' = the preset's)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--workdir", required=True, help="where the arms' run directories go")
    ap.add_argument("--extra", action="append", default=[], help="a --config.* override for every arm")
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    args = ap.parse_args(argv)
    if not args.families:
        from glm5v_jax.config_args import config_file

        preset_families = str(config_file(ROOT / "configs" / "rl.py", args.preset).rl.families)
        args.families = preset_families or ",".join(sorted(SFT_TASK))
    if args.family not in args.families.split(","):
        ap.error(f"--family {args.family} is not among --families {args.families}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    families = [f for f in args.families.split(",") if f]
    work = Path(args.workdir)
    scores = {"sft_start": evaluate_run(Path(args.sft_run), families, args.eval_prompts, args.n, args.max_new_tokens)}
    for arm in ARMS:
        run_dir = work / arm
        cmd = arm_command(arm, args, run_dir)
        log(f"{arm}: {' '.join(cmd[2:])}")
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{arm} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        scores[arm] = evaluate_run(run_dir, families, args.eval_prompts, args.n, args.max_new_tokens)
        log(f"{arm}: all {scores[arm]['all']:.3f} (start {scores['sft_start']['all']:.3f})")
    changes = compare(scores, args.family, families)
    result = dict(scores=scores, changes=changes, families=families,
                  verdict=verdict(changes, args.family, args.eval_prompts * args.n),
                  settings=vars(args), wall_s=time.perf_counter() - t0)
    text = report(result)
    log(text)
    if args.out_dir:
        from glm5v_jax.train.writers import write_result_files

        write_result_files(args.out_dir, "rl_joint_vs_single", text, result)
    return result


if __name__ == "__main__":
    main()
