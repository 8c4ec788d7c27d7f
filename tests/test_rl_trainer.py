"""The RL stage end to end, as a user runs it (`python -m glm5v_jax.main --config=configs/rl.py:tiny
--config.init_from=RUN:=`), on a small random VLM run: a SIGKILL after a checkpoint and a restart lose and
repeat no prompt (the task stream's position and the held groups' tasks come back from the checkpoint;
`rollouts.jsonl` is rolled back with it); the judge server dies during the second run: its components fall
back, flagged, and training goes on to the last step; per-family reward and pass@k reach metrics.jsonl and
TensorBoard, and the curves a PNG."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm5v_jax.rl.tasks import TaskMix
from glm5v_jax.train.rl import LEDGER, family_weights, ledger_accounting
from glm5v_jax.train.writers import read_jsonl
from helpers import build_vlm_run, cli_env

ROOT = Path(__file__).parents[1]
STEPS = 6
FAMILIES = "shapes/count,shapes/colour"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge(port: int, die_after: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_judge.py"), f"--port={port}",
                             f"--die_after={die_after}"], stdout=subprocess.PIPE, text=True)
    assert "serving" in proc.stdout.readline()
    return proc


def _command(workdir: Path, sft: Path, port: int) -> list[str]:
    overrides = dict(total_steps=STEPS, checkpoint_every=2, eval_every=0, log_every=1, init_from=f"{sft}:=",
                     **{"model.backbone.num_layers": 2, "model.backbone.embed_dim": 64, "model.backbone.mlp_dim": 128,
                        "data.batch_size": 4, "data.seq_len": 96, "rl.group_size": 2, "rl.groups_per_batch": 2,
                        "rl.max_new_tokens": 6, "rl.engine_slots": 4, "rl.families": FAMILIES,
                        "rl.filter_equal": False,  # a random policy scores all zeros: keep its groups
                        "rl.judge_url": f"http://127.0.0.1:{port}", "rl.judge_rubric": "caption",
                        "rl.judge_weight": 0.5, "rl.judge_timeout_s": 2.0,
                        "rl.routing_replay": True})  # the engine's routes steer the trainer's MoE layer
    return [sys.executable, "-m", "glm5v_jax.main", "--config=configs/rl.py:tiny", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def test_sigkill_and_restart_lose_no_prompt_and_a_dead_judge_falls_back(tmp_path):
    sft = tmp_path / "sft"
    build_vlm_run(sft)
    workdir, port = tmp_path / "rl", _free_port()
    env = cli_env(tmp_path / "data")

    judge = _judge(port)
    try:
        proc = subprocess.Popen(_command(workdir, sft, port), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 400
        while not (workdir / "checkpoints" / "4").exists():  # killed after its second checkpoint
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.time() < deadline, "no checkpoint at step 4"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        judge.kill()
        judge.wait()

    judge = _judge(port, die_after=3)  # answers 2 requests, dies at the third
    try:
        out = subprocess.run(_command(workdir, sft, port), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
        assert judge.wait(timeout=10) == 1  # it died during the run
    finally:
        judge.kill()

    rows = read_jsonl(workdir / "metrics.jsonl")
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, STEPS + 1))
    # a round's two groups may both be of one family (which groups finish first depends on timing): each
    # family's metrics appear in the steps whose round completed one of its groups
    logged = set().union(*(r.keys() for r in rows))
    for family in FAMILIES.split(","):
        for key in ("reward_mean", "pass@1", "pass@2"):
            assert f"train/rollout/{family}/{key}" in logged, sorted(logged)
    assert "train/rollout/all/reward_mean" in rows[-1], sorted(rows[-1])
    resumed = [r for r in rows if r["step"] > 4 and "train/rollout/all/fallback_rate" in r]
    assert resumed and max(r["train/rollout/all/fallback_rate"] for r in resumed) > 0  # the dead judge
    assert all(r["train/rl/version_lag"] <= 1 for r in rows if "train/rl/version_lag" in r)
    assert (workdir / "rl_curves.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    # every prompt the stream gave out is accounted for once: trained, filtered or dropped stale in one
    # step of rollouts.jsonl, or still held (cached / carried) in the last checkpoint
    ledger = read_jsonl(workdir / LEDGER)
    assert [r["step"] for r in ledger] == list(range(1, STEPS + 1))
    final = json.loads((workdir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())  # orbax's JSON
    acct = ledger_accounting(workdir, final)
    assert acct["duplicates"] == []
    mix = TaskMix(family_weights(FAMILIES), seed=0)
    pending = {mix.task(i).uid for i in acct["pending"]}
    given_out = {mix.task(i).uid for i in range(acct["position"])}
    assert set(acct["outcomes"]) | pending == given_out and not set(acct["outcomes"]) & pending
    assert sum(len(r["accepted"]) for r in ledger) == 2 * STEPS


def test_abstract_program_lowers_with_the_reference_as_log_probabilities_only():
    """The AOT tool's RL step: its arguments are the policy's state (model and optimizer: one copy of the
    parameters) and the batch, whose `ref_logp` carries the reference's only contribution."""
    import jax

    from glm5v_jax.config_args import config_file
    from glm5v_jax.train import rl as rl_stage

    config = config_file(ROOT / "configs" / "rl.py", "tiny")
    config.model.backbone.num_layers, config.data.batch_size, config.data.seq_len = 1, 2, 64
    program = rl_stage.abstract_program(config, jax.devices()[:1], update_rms=False)
    state, batch = program.args
    assert sorted(state.keys()) == ["model", "optimizer"]
    assert batch["ref_logp"].shape == batch["tokens"].shape == (2, 64)
    assert {"rollout_logp", "advantages", "version_lag"} <= set(batch)
    assert program.facts["reference"] == "host" and "RL step" in program.summary
    program.step.lower(*program.args)  # traces the RL loss through the train step


def test_routing_replay_puts_the_engines_experts_in_the_batch_contract():
    """With routing replay the batch carries `expert_ids [B, S, L_moe, top_k]`, sharded like the tokens: the
    RL step lowers on an FSDP mesh of the 8 fake devices."""
    import jax

    from glm5v_jax.config_args import config_file
    from glm5v_jax.errors import ConfigError
    from glm5v_jax.train import rl as rl_stage

    config = config_file(ROOT / "configs" / "rl.py", "tiny")
    config.model.backbone.num_layers, config.data.batch_size, config.data.seq_len = 2, 8, 64
    config.rl.routing_replay = True
    program = rl_stage.abstract_program(config, jax.devices()[:8], update_rms=False)
    _, batch = program.args
    b = config.model.backbone
    assert batch["expert_ids"].shape == (8, 64, b.num_layers - b.first_k_dense, b.experts_per_token)
    rows = tuple(batch["expert_ids"].sharding.spec)[0]
    assert rows == tuple(batch["tokens"].sharding.spec)[0] and rows is not None  # split over the batch axes
    program.step.lower(*program.args)
    config.model.mtp.trunk_gradient = "isolate_vision"
    with pytest.raises(ConfigError, match="config.rl.routing_replay"):
        rl_stage.check_config(config)
