"""Per-family evaluation of a VLM: n sampled answers per prompt of every task family, scored by the reward
system, with reward and unbiased pass@k per `data_source`.

    python -m glm5v_jax.rl.evaluate --workdir=RUN [--step=N] [--n=4] [--prompts=16] [--families=a,b]
        [--temperature=1.0] [--max_new_tokens=64] [--judge_url=http://...] [--out=DIR]

writes to `RUN/rl_eval/step_<N>/` (or `--out`): `table.md` (one row per family), `summary.json` (every
metric of `rl.metrics.summary`), `samples.jsonl` (each answer with its reward and flags) and
`pass_at_k.png`. The prompts come from `rl.tasks.FAMILIES` with an evaluation seed of their own
(`--seed`), the episodes from `rl.rollout` on the generation engine (tool families get their tools and
turns), the rewards from `rl.rewards.RewardSystem` with the families' reward specs. The SFT stage
calls `evaluate()` (the library function) at its evaluation cadence when `config.rl_eval.prompts > 0`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Sampling
from glm5v_jax.rl import metrics
from glm5v_jax.rl.rewards import RewardSystem
from glm5v_jax.rl.rollout import RolloutDriver
from glm5v_jax.rl.tasks import FAMILIES, reward_specs
from glm5v_jax.rl.types import Task

EVAL_SEED = 1  # the families' seed for evaluation prompts (RL training draws with its own seeds)


@dataclasses.dataclass
class Evaluation:
    """`summary`: `rl.metrics.summary` of every source ("{source}/reward_mean", "{source}/pass@k", ...);
    `samples`: one dict per answer (uid, data_source, index, response, reward, flags, finish, turns)."""

    summary: dict[str, float]
    samples: list[dict[str, Any]]
    families: list[str]
    n: int
    seconds: float


def family_tasks(families: Sequence[str] | None, prompts: int, seed: int = EVAL_SEED) -> list[Task]:
    """`prompts` tasks of each family (all when None), family-major. ValueError for an unknown name."""
    names = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families: {unknown} are not task families; known: {sorted(FAMILIES)}")
    return [FAMILIES[f].make(seed, i) for f in names for i in range(prompts)]


def evaluate(model: Any, tokenizer: Any, *, families: Sequence[str] | None = None, prompts: int = 16, n: int = 4,
             sampling: Sampling = Sampling(temperature=1.0, seed=0), max_new_tokens: int = 64,
             rewards: RewardSystem | None = None, engine: Engine | None = None, seed: int = EVAL_SEED,
             max_slots: int = 16, max_seq_len: int = 2048) -> Evaluation:
    """Sample n answers to `prompts` prompts of each family, score them, and summarise per source.
    `rewards` defaults to the families' specs with rule verifiers only (a judge needs a RewardSystem
    with a JudgeClient); `engine` defaults to a fresh one over `model`."""
    t0 = time.time()
    tasks = family_tasks(families, prompts, seed)
    engine = engine or Engine(model, max_slots=max_slots, max_seq_len=max_seq_len, tokenizer=tokenizer)
    episodes = RolloutDriver(engine, tokenizer, max_new_tokens=max_new_tokens, sampling=sampling).run(tasks, n=n)
    own = rewards is None
    rewards = rewards or RewardSystem(reward_specs())
    try:
        scored = rewards.score_many_detailed([(e.task, e.response) for e in episodes])
    finally:
        if own:
            rewards.close()
    stats: dict[str, metrics.SourceStats] = {}
    samples = []
    for start in range(0, len(episodes), n):  # one task's n samples
        group, results = episodes[start:start + n], scored[start:start + n]
        source = group[0].task.data_source
        g = metrics.group_stats([r.score for r in results],
                                verifier_latency_s=[t for r in results for t in r.verifier_seconds],
                                judge_latency_s=[t for r in results for t in r.judge_seconds])
        stats = metrics.merge_stats(stats, {source: g})
        for e, r in zip(group, results):
            samples.append(dict(uid=e.task.uid, data_source=source, index=e.index, response=e.response,
                                reward=r.score.value, components=dict(r.score.components), flags=list(r.score.flags),
                                finish=e.finish, turns=len(e.answers), tokens=len(e.tokens)))
    names = list(dict.fromkeys(t.data_source for t in tasks))
    return Evaluation(metrics.summary(stats), samples, names, n, time.time() - t0)


def table(ev: Evaluation) -> str:
    """A markdown table, one row per family: reward mean, pass@k for k = 1, 2, 4, ... n, failure rates."""
    ks = metrics.pass_ks(ev.n)
    head = ["family", "prompts", "reward", *(f"pass@{k}" for k in ks), "format fail", "timeouts", "fallbacks"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for source in [*ev.families, metrics.ALL]:
        get = {key.split("/")[-1]: v for key, v in ev.summary.items() if key.startswith(f"{source}/")}.get
        nan = float("nan")
        cells = [source, f"{get('prompts', nan):.0f}", f"{get('reward_mean', nan):.3f}",
                 *(f"{get(f'pass@{k}', nan):.3f}" for k in ks), f"{get('format_failure_rate', nan):.2f}",
                 f"{get('timeout_rate', nan):.2f}", f"{get('fallback_rate', nan):.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write(ev: Evaluation, out_dir: Any, *, title: str = "") -> None:
    """table.md, summary.json, samples.jsonl and pass_at_k.png under `out_dir` (created)."""
    from glm5v_jax.paths import as_path

    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = f"# {title}\n\n" if title else ""
    (out / "table.md").write_text(head + f"{ev.n} samples per prompt, {ev.seconds:.0f} s\n\n" + table(ev))
    (out / "summary.json").write_text(json.dumps(ev.summary, indent=1, sort_keys=True))
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in ev.samples))
    _plot(ev, out / "pass_at_k.png")


def _plot(ev: Evaluation, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = metrics.pass_ks(ev.n)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab20").colors
    for i, source in enumerate(ev.families):  # 12+ families: colours and markers both vary
        ax.plot(ks, [ev.summary.get(f"{source}/pass@{k}", float("nan")) for k in ks], marker="os^vD"[i % 5],
                color=colours[i % len(colours)], label=source)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program: `generate` defines `workdir` too)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory of a VLM stage (pre-training or SFT).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that reads).")
    flags.DEFINE_integer("n", 4, "Sampled answers per prompt (pass@k for k = 1, 2, 4, ... n).")
    flags.DEFINE_integer("prompts", 16, "Prompts per family.")
    flags.DEFINE_list("families", None, f"Task families (default: all {len(FAMILIES)}).")
    flags.DEFINE_integer("seed", EVAL_SEED, "The families' seed for the prompts.")
    flags.DEFINE_integer("sample_seed", 0, "Sampling seed.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy; then pass@k = pass@1).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus mass.")
    flags.DEFINE_integer("max_new_tokens", 64, "Most tokens per answer turn.")
    flags.DEFINE_integer("max_slots", 16, "Engine decode slots.")
    flags.DEFINE_integer("max_seq_len", 2048, "Most tokens an episode may hold.")
    flags.DEFINE_string("judge_url", "", "An OpenAI-compatible endpoint for judge components (none: rules only).")
    flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/rl_eval/step_<N>).")


def main(argv) -> None:
    del argv
    from absl import flags

    from glm5v_jax.generate.run_loader import load_run
    from glm5v_jax.paths import as_path
    from glm5v_jax.rl.judge import JudgeClient

    f = flags.FLAGS
    model, tokenizer, config = load_run(f.workdir, f.step)
    judge = JudgeClient(f.judge_url) if f.judge_url else None
    with RewardSystem(reward_specs(), judge=judge) as rewards:
        ev = evaluate(model, tokenizer, families=f.families, prompts=f.prompts, n=f.n, seed=f.seed,
                      sampling=Sampling(temperature=f.temperature, top_p=f.top_p, seed=f.sample_seed),
                      max_new_tokens=f.max_new_tokens, rewards=rewards, max_slots=f.max_slots,
                      max_seq_len=f.max_seq_len)
    out = f.out or as_path(f.workdir) / "rl_eval" / f"step_{config.loaded_step}"
    write(ev, out, title=f"{config.trainer} run {f.workdir}, step {config.loaded_step}")
    print(table(ev), end="")
    print(f"written to {out}")


if __name__ == "__main__":
    from glm5v_jax.errors import run_cli

    _define_flags()
    run_cli(main)
