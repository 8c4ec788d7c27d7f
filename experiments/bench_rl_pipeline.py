"""RL rollout pipeline: rounds through the controller against a synchronous barrier, on a simulated engine
or on the real one.

    python experiments/bench_rl_pipeline.py                 # 50 rounds each way (about a minute on CPU)
    python experiments/bench_rl_pipeline.py --rounds=200 --slots=64 --groups=16 --group_size=8
    python experiments/bench_rl_pipeline.py --engine=real --workdir=SFT_RUN --rounds=10   # wall-clock seconds

The engine is `glm5v_jax.rl.simulated.SimEngine`: answer lengths drawn lognormal (the long tail), one token
per live sample per step, a virtual clock of `step_s` per step. Each round needs `groups` groups of
`group_size` samples with unequal rewards (a reward is 1 for an even-length answer, else 0):

  barrier     the synchronous loop: start `groups` groups, wait for every answer, score, keep the groups
              whose rewards differ (the rest are lost to the round), next round
  controller  `RolloutController`: over-sampling (x`over_sample`), rewards started as episodes end, the
              equal-reward filter, early abort by count, aborted groups cached and resumed first
              (`--lookahead`: the engine's admit_lookahead); run four ways: without the early abort
              (every started group waits to finish; the surplus opens the next batch), with it, with
              the engine's admission lookahead, and with lookahead and partial group admission
              (`admit_partial`: a group's samples take free slots before the whole group fits)

Reported per mode: virtual seconds per round, slot occupancy (busy slot-steps / slot-steps), accepted
groups per round, and the controller's aborted / resumed / filtered counts. Rewards are scored for real
(an event loop in a thread) but take no virtual time, so the barrier's reward wait is not in its seconds:
its figures are a lower bound. Output: a table, printed and written with a json to
`<out_dir>/rl_pipeline_sim.md|.json`.

`--engine=real`: the generation engine over a trained run's model (`--workdir`, e.g. a tiny SFT run), prompts
of the RL task families (`--families`), the families' rule rewards; seconds are wall-clock (rewards
included: the barrier waits for them, the controller overlaps them) and occupancy is the engine's useful
slot fraction. Written to `<out_dir>/rl_pipeline_real.md|.json`.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from glm5v_jax.data import shapes_world
from glm5v_jax.data.tokenizer import train_tokenizer
from glm5v_jax.rl.controller import RewardWorker, RolloutController
from glm5v_jax.rl.rollout import RolloutDriver
from glm5v_jax.rl.simulated import ParityRewards, SimEngine
from glm5v_jax.rl.types import Task
from glm5v_jax.train.writers import write_result_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _tasks(args):
    if args.engine == "real":
        from glm5v_jax.rl.tasks import TaskMix, TaskStream

        return TaskStream(TaskMix({f: 1.0 for f in args.families.split(",")} if args.families else None,
                                  seed=args.seed))
    return (Task(f"t{i}", "sim", f"Question {i}?") for i in itertools.count())


def _engine(args, tokenizer, lookahead: int, partial: bool = False):
    if args.engine == "real":
        from glm5v_jax.generate.engine import Engine

        return Engine(args.model, max_slots=args.slots, max_seq_len=args.max_seq_len, tokenizer=tokenizer,
                      admit_lookahead=lookahead, admit_partial=partial)
    return SimEngine(filler=tokenizer.encode("a")[-1], stop=tokenizer.eos_id, max_slots=args.slots,
                     max_seq_len=args.max_seq_len, step_s=args.step_s, mean_tokens=args.mean_tokens,
                     sigma=args.sigma, seed=args.seed, admit_lookahead=lookahead, admit_partial=partial)


def _rewards(args):
    if args.engine == "real":
        from glm5v_jax.rl.rewards import RewardSystem
        from glm5v_jax.rl.tasks import reward_specs

        return RewardSystem(reward_specs())
    return ParityRewards()


def _clock(args, engine) -> Callable[[], float]:
    return time.monotonic if args.engine == "real" else (lambda: engine.clock)


def _occupancy(args, engine) -> float:
    m = engine.metrics()
    return m["useful_slot_fraction"] if args.engine == "real" else m["busy_slot_steps"] / m["slot_steps"]


def _driver(args, engine, tokenizer) -> RolloutDriver:
    from glm5v_jax.generate.requests import Sampling

    return RolloutDriver(engine, tokenizer, max_new_tokens=args.max_new_tokens,
                         sampling=Sampling(1.0, seed=args.seed))


def run_barrier(args, tokenizer) -> dict:
    engine = _engine(args, tokenizer, 0)
    driver = _driver(args, engine, tokenizer)
    worker = RewardWorker(_rewards(args))
    tasks, accepted, clock = _tasks(args), 0, _clock(args, engine)
    t0 = clock()
    try:
        for _ in range(args.rounds):
            episodes = driver.run([next(tasks) for _ in range(args.groups)], n=args.group_size)
            scores = [f.result() for f in [worker.submit(e.task, e.response) for e in episodes]]
            for g in range(args.groups):
                rewards = {s.score.value for s in scores[g * args.group_size:(g + 1) * args.group_size]}
                accepted += len(rewards) > 1
        seconds = clock() - t0
    finally:
        worker.close()
    return dict(mode="barrier", seconds_per_round=seconds / args.rounds, occupancy=_occupancy(args, engine),
                groups_per_round=accepted / args.rounds, aborted=0, resumed=0,
                filtered=args.rounds * args.groups - accepted)


def run_controller(args, tokenizer, lookahead: int, partial: bool = False, abort: bool = True) -> dict:
    engine = _engine(args, tokenizer, lookahead, partial)
    driver = _driver(args, engine, tokenizer)
    worker = RewardWorker(_rewards(args))
    clock = _clock(args, engine)
    c = RolloutController(driver, worker, _tasks(args), group_size=args.group_size, groups_per_batch=args.groups,
                          over_sample=args.over_sample, abort_on_count=abort, clock=clock)
    totals = dict(groups=0, aborted=0, resumed=0, filtered=0, stale=0)
    t0 = clock()
    try:
        for version in range(args.rounds):
            engine.update_weights(engine.state if args.engine == "real" else None, version)
            r = c.next_batch(version)
            totals["groups"] += len(r.groups)
            for k in ("aborted", "resumed", "filtered", "stale"):
                totals[k] += getattr(r, k)
        seconds = clock() - t0
    finally:
        worker.close()
    mode = f"controller ({'early abort' if abort else 'no early abort'}, lookahead {lookahead}" + (
        ", partial admission)" if partial else ")")
    return dict(mode=mode, seconds_per_round=seconds / args.rounds,
                occupancy=_occupancy(args, engine), groups_per_round=totals["groups"] / args.rounds,
                aborted=totals["aborted"], resumed=totals["resumed"], filtered=totals["filtered"],
                stale=totals["stale"])


def run_bench(args, log: Callable[[str], None] = print) -> dict:
    if args.engine == "real":
        from glm5v_jax.generate.run_loader import load_run

        args.model, tokenizer, _ = load_run(args.workdir)
        if args.warmup:  # compile the engine's shapes first, so that neither mode pays for them
            _engine(args, tokenizer, 0).warmup(max_images=1)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_tokenizer(shapes_world.iter_split_texts(0, "train", 24), Path(tmp) / "tok.model",
                                        vocab_size=400)
    rows = [run_barrier(args, tokenizer)]
    log(f"barrier: {rows[-1]['seconds_per_round']:.2f} s/round")
    for lookahead, partial, abort in ((0, False, False), (0, False, True), (args.lookahead, False, True),
                                      (args.lookahead, True, True)):
        rows.append(run_controller(args, tokenizer, lookahead, partial, abort))
        log(f"{rows[-1]['mode']}: {rows[-1]['seconds_per_round']:.2f} s/round")
    base = rows[0]["seconds_per_round"] / max(rows[0]["groups_per_round"], 1e-9)
    for r in rows:  # virtual seconds per accepted group, relative to the barrier's
        r["speedup_per_group"] = base / (r["seconds_per_round"] / max(r["groups_per_round"], 1e-9))
    return dict(rows=rows, settings={k: v for k, v in vars(args).items() if k != "model"})


def report(result: dict) -> str:
    s = result["settings"]
    real = s["engine"] == "real"
    unit = "s / round" if real else "virtual s / round"
    head = ["mode", unit, "accepted groups / round", "speedup per accepted group",
            "slot occupancy", "aborted", "resumed", "dropped stale", "filtered"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['seconds_per_round']:.2f} | {r['groups_per_round']:.2f} | "
                     f"{r['speedup_per_group']:.2f}x | {r['occupancy']:.3f} | {r['aborted']} | {r['resumed']} | "
                     f"{r.get('stale', 0)} | {r['filtered']} |")
    command = f"`python experiments/bench_rl_pipeline.py {' '.join(s['argv'])}` ({result['wall_s']:.0f} s wall)"
    if real:
        return "\n".join([
            "# RL rollout pipeline on the real engine", "",
            f"{s['rounds']} rounds of {s['groups']} groups x {s['group_size']} samples; {s['slots']} slots; the "
            f"model of `{s['workdir']}`; prompts of {s['families'] or 'every family'}; answers of at most "
            f"{s['max_new_tokens']} tokens sampled at temperature 1; rule rewards. Command: {command}.", "",
            *lines, "",
            "Wall-clock seconds on this host, rewards included (the barrier waits for its rewards after the last "
            "answer; the controller scores each episode as it ends). Slot occupancy is the engine's useful slot "
            "fraction (slot-steps that produced a kept token). The barrier keeps a round's groups whose rewards "
            "differ; the controller over-samples and fills its batch to the count.", ""])
    return "\n".join([
        "# RL rollout pipeline on a simulated engine", "",
        f"{s['rounds']} rounds of {s['groups']} groups x {s['group_size']} samples; {s['slots']} slots; answer "
        f"lengths lognormal (mean {s['mean_tokens']} tokens, sigma {s['sigma']}), at most {s['max_new_tokens']}; "
        f"{s['step_s']} virtual s per decode step; controller over-sampling x{s['over_sample']}. Command: "
        f"{command}.", "",
        *lines, "",
        "Virtual seconds count decode steps only (rewards take no virtual time, so the barrier's wait for its "
        "rewards is not counted: its figures are a lower bound). The barrier keeps a round's groups whose "
        "rewards differ; the controller fills its batch to the count, aborting the rest (cached, resumed "
        "first next round; a group aborted twice counts twice). A cached group more than one weight version "
        "old is dropped (`max_off_policy_steps=1`): that is the work the controller throws away.", ""])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("sim", "real"), default="sim")
    ap.add_argument("--workdir", default="", help="--engine=real: the run whose model generates")
    ap.add_argument("--families", default="", help="--engine=real: comma-separated task families ('' = all)")
    ap.add_argument("--warmup", type=int, default=1, help="--engine=real: compile the engine's shapes first")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8, help="groups per batch")
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--over_sample", type=float, default=1.5)
    ap.add_argument("--lookahead", type=int, default=16, help="the engine's admit_lookahead for the second run")
    ap.add_argument("--mean_tokens", type=float, default=24.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--step_s", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    args = ap.parse_args(argv)
    if args.engine == "real" and not args.workdir:
        ap.error("--engine=real needs --workdir (a trained VLM run)")
    args.argv = argv
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run_bench(args, log)
    result["wall_s"] = time.perf_counter() - t0
    text = report(result)
    log(text)
    if args.out_dir:
        result["files"] = write_result_files(args.out_dir, f"rl_pipeline_{args.engine}", text, result)
    return result


if __name__ == "__main__":
    main()
