"""Stage: joint multimodal RL over every task family (report section 2.4), on the run layer.

Reads top to bottom; the run layer (`glm5v_jax.train.run`) does the loop, checkpoints, resume, `init_from`
(the SFT run's whole model: `--config.init_from=SFT_RUN:=`) and writers:
  policy    the VLM and its optimizer on the mesh (`vlm_pretrain.place_model` with the RL objective)
  reference the starting policy (the `init_from` checkpoint) kept in host memory
            (`rl.reference.HostReference`): on device only for its forward, released right after
  engine    `generate.Engine` on the trainer's mesh over the policy's own arrays: after every step the
            new policy is handed to it by reference, versioned (no copy; the run layer's `observe_state`)
  a step  = one controller round (`rl.controller`: each finished episode's reward starts at once,
            over-sampling with the equal-reward filter, early abort by count or time, aborted groups
            cached and served first, staleness bound) with the newest policy
            -> the reference parameters start their host-to-device copy while the host packs the batch
               (`rl.batch`: rows, advantages; texts and images' bytes stay on the host)
            -> reference log-probabilities, then one optimizer update of the objective (`rl.loss`);
               with `rl.routing_replay` the policy's forward routes each token to the experts the engine
               recorded when it sampled it (`expert_ids` in the batch; MTP and reference route alone)
  checkpoints hold the model, the optimizer and the task stream: its position and the tasks of the
     groups held between rounds (cached, carried), which a restart starts again: no prompt is lost or
     trained twice (`rollouts.jsonl` lists every step's prompts by outcome, rolled back on resume)
  metrics   `train/rollout/<family>/reward_mean` and `pass@k` over every completed group of the round,
            `train/rl/...` (objective terms), `train/rollout/...` (controller counters), and at the
            evaluation cadence `eval/rl/<family>/...` on held-out prompts (`rl.evaluate`);
            `rl_curves.png` at the end.
One host only (the engine serves from one process).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Sampling
from glm5v_jax.init_from import apply_init_from
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.rl.batch import RL_KEYS, RowLayout, build_batch, round_metrics
from glm5v_jax.rl.controller import RewardWorker, RolloutController
from glm5v_jax.rl.judge import JudgeClient
from glm5v_jax.rl.loss import next_token_logprobs, rl_loss
from glm5v_jax.rl.objectives import ObjectiveSpec, objective
from glm5v_jax.rl.reference import HostReference
from glm5v_jax.rl.rewards import RewardSystem
from glm5v_jax.rl.rollout import RolloutDriver
from glm5v_jax.rl.tasks import TaskMix, TaskStream, reward_specs
from glm5v_jax.train import flops as flops_lib
from glm5v_jax.train import run as run_lib
from glm5v_jax.train import vlm_pretrain, vlm_sft
from glm5v_jax.train.parallel import MeshPlan, TrainProgram, global_batch, local_row_shards
from glm5v_jax.train.writers import read_jsonl, rollback_jsonl

log = logging.getLogger(__name__)
LEDGER = "rollouts.jsonl"  # per step: the prompts (task uids) accepted, filtered and dropped stale


# ----------------------------------------------------------------------------- settings
def objective_from_config(config: ml_collections.ConfigDict) -> ObjectiveSpec:
    """config.rl.objective: an OBJECTIVES preset with overrides (-1 / "" keep the preset's value)."""
    o = config.rl.objective
    overrides: dict[str, Any] = {f: float(o[f]) for f in ("kl_beta", "eps_low", "eps_high") if float(o[f]) >= 0}
    if o.loss_agg:
        overrides["loss_agg"] = str(o.loss_agg)
    overrides["tis_cap"] = float(o.tis_cap) if float(o.tis_cap) > 0 else None
    spec = objective(str(o.name), **overrides)
    if spec.loss_agg == "seq-mean-token-sum-norm" and spec.token_sum_norm is None:  # Dr.GRPO's constant
        spec = dataclasses.replace(spec, token_sum_norm=float(config.rl.max_new_tokens))
    return spec


def family_weights(text: str) -> dict[str, float] | None:
    """"name[:weight],..." -> {name: weight}; "" -> None (every family at its default weight)."""
    if not text.strip():
        return None
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, weight = item.partition(":")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError("config.rl.families", f"{item!r}: expected name[:weight]") from None
    return out


def check_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the field for settings that cannot work, before anything is built."""
    rl = config.rl
    if jax.process_count() > 1:
        raise ConfigError("trainer", f"the RL stage runs on one host (the rollout engine is one process); "
                                     f"{jax.process_count()} processes")
    for field, low in (("group_size", 2), ("groups_per_batch", 1), ("max_new_tokens", 1), ("engine_slots", 1),
                       ("max_off_policy_steps", 0)):
        if int(rl[field]) < low:
            raise ConfigError(f"config.rl.{field}", f"must be >= {low}, got {rl[field]}")
    if rl.reference not in ("host", "none"):
        raise ConfigError("config.rl.reference", f"expected 'host' or 'none', got {rl.reference!r}")
    spec = objective_from_config(config)
    if spec.kl_beta > 0 and rl.reference == "none":
        raise ConfigError("config.rl.reference", f"the objective's KL term (kl_beta={spec.kl_beta}) needs the "
                                                 "reference policy: set reference=host or objective.kl_beta=0")
    if rl.routing_replay and config.model.mtp.get("trunk_gradient", "full") == "isolate_vision":
        raise ConfigError("config.rl.routing_replay", "routing replay runs the trunk once with the engine's routes; "
                                                      "model.mtp.trunk_gradient='isolate_vision' runs it apart")
    if rl.routing_replay and int(config.model.backbone.num_layers) <= int(config.model.backbone.first_k_dense):
        raise ConfigError("config.rl.routing_replay", "the backbone has no MoE layer to replay")
    if rl.max_new_tokens >= config.data.seq_len:
        raise ConfigError("config.rl.max_new_tokens", f"{rl.max_new_tokens} leaves no room for a prompt in "
                                                      f"data.seq_len={config.data.seq_len} tokens")


def rl_loss_fn(config: ml_collections.ConfigDict, obj: ObjectiveSpec):
    """`loss_fn(outputs, batch)` of the RL step (`rl.loss.rl_loss` with the config's weights)."""
    return functools.partial(rl_loss, objective=obj, mtp_loss_weight=float(config.rl.mtp_loss_weight),
                             balance_loss_weight=float(config.model.backbone.balance_loss_weight),
                             num_segments=int(config.data.seq_len) + 1)


def layout_from_config(config: ml_collections.ConfigDict, spec) -> RowLayout:
    d, v = config.data, spec.vision
    return RowLayout(rows=int(d.batch_size), seq_len=int(d.seq_len), max_images=int(d.max_images_per_row),
                     max_patches=int(v.max_patches), patch_dim=int(v.patch_size) ** 2 * 3,
                     routing=replay_shape(config, spec))


def replay_shape(config: ml_collections.ConfigDict, spec) -> tuple[int, int] | None:
    """(MoE layers, top_k) of the batch's `expert_ids` with `rl.routing_replay`, else None."""
    b = spec.backbone
    return (int(b.num_moe_layers), int(b.experts_per_token)) if config.rl.routing_replay else None


def rl_contract(spec, config: ml_collections.ConfigDict, *, reference: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of an RL batch: the VLM contract, the token-aligned RL arrays and, with a reference,
    `ref_logp` (on the predicting positions)."""
    contract = vlm_pretrain.batch_contract(spec, config.data)
    b, s = config.data.batch_size, config.data.seq_len
    extra = list(RL_KEYS) + (["ref_logp"] if reference else [])
    contract.update({k: jax.ShapeDtypeStruct((b, s), jnp.float32) for k in extra})
    replay = replay_shape(config, spec)
    if replay is not None:  # routing replay: the engine's experts per token and MoE layer
        contract["expert_ids"] = jax.ShapeDtypeStruct((b, s, *replay), jnp.int32)
    return contract


# ----------------------------------------------------------------------------- rounds -> batches
class RolloutBatches:
    """The stage's batch iterator (`run.BatchIterator`): each `next` runs one controller round with the
    newest policy (`observe`) and packs it. Its state is the task stream's position and the tasks held
    between rounds; `rollouts.jsonl` records every round's prompts by outcome."""

    def __init__(self, *, controller: RolloutController, stream: TaskStream, engine: Engine, layout: RowLayout,
                 objective: ObjectiveSpec, max_new_tokens: int, workdir: epath.Path,
                 reference: HostReference | None):
        self.controller, self.stream, self.engine, self.layout = controller, stream, engine, layout
        self.objective, self.max_new_tokens = objective, max_new_tokens
        self.workdir, self.reference = workdir, reference
        self.version = 0  # the policy version the engine serves (= the optimizer steps behind it)
        self._ledger_checked = False
        self._closed = False
        atexit.register(self.close)
        self._counts = dict(prompts_started=0, groups_accepted=0, groups_filtered=0, groups_stale=0, episodes=0,
                            episodes_skipped=0)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def observe(self, state: Any, step: int) -> None:
        """The policy after `step` optimizer updates: the engine serves it from the next round on."""
        self.engine.update_weights(state["model"], step)
        self.version = step

    def __next__(self) -> dict[str, Any]:
        if not self._ledger_checked:  # a fresh start: rows of an earlier attempt without a checkpoint go
            rollback_jsonl(self.workdir / LEDGER, -1)
            self._ledger_checked = True
        t0 = time.monotonic()
        rnd = self.controller.next_batch(self.version)
        t_round = time.monotonic()
        if self.reference is not None:
            self.reference.prefetch()  # the host-to-device copy runs while the batch is packed
        batch, stats = build_batch(rnd.groups, self.objective, self.layout, max_new_tokens=self.max_new_tokens,
                                   version=self.version)
        t_batch = time.monotonic()
        if stats.skipped:
            log.warning("step %d: episodes left out of the batch: %s", self.version + 1, stats.skipped)
        uids = lambda groups: [g.task.uid for g in groups]  # noqa: E731
        row = dict(step=self.version + 1, accepted=uids(rnd.groups), filtered=uids(rnd.filtered_groups),
                   stale=uids(rnd.stale_groups), aborted=rnd.aborted, resumed=rnd.resumed)
        with (self.workdir / LEDGER).open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._counts["prompts_started"] = self.controller.started
        for key, n in (("groups_accepted", len(rnd.groups)), ("groups_filtered", rnd.filtered),
                       ("groups_stale", rnd.stale), ("episodes", stats.episodes),
                       ("episodes_skipped", sum(stats.skipped.values()))):
            self._counts[key] += n
        metrics = round_metrics(rnd, stats)
        metrics.update({"perf/round_s": t_round - t0, "perf/batch_build_s": t_batch - t_round,
                        "rollout/engine_version": float(self.version)})
        batch["round_metrics"] = metrics
        return batch

    def get_state(self) -> dict:
        return dict(position=self.stream.position, step=self.version,
                    pending=[self.stream.index_of(t) for t in self.controller.pending_tasks()],
                    counts=self.stats)

    def set_state(self, state: dict) -> None:
        """Resume: the stream's position, and the held groups' tasks started again first (from scratch:
        their partial answers were generated by a policy that is gone)."""
        self.stream.position = int(state["position"])
        self.controller.cached, self.controller.carried = [], []
        self.controller.requeue([self.stream.task(i) for i in state.get("pending", [])])
        self._counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        self.controller.started = self._counts.get("prompts_started", 0)
        dropped = rollback_jsonl(self.workdir / LEDGER, int(state.get("step", 0)))
        if dropped:
            log.info("%s: dropped %d rows logged after step %s", LEDGER, dropped, state.get("step"))
        self._ledger_checked = True

    def close(self) -> None:
        """Stop the reward worker (its loop, the judge session, the rule verifiers' processes); once."""
        if not self._closed:
            self._closed = True
            self.controller.worker.close()


def ledger_accounting(workdir: epath.Path, final_state: dict) -> dict[str, Any]:
    """Every prompt started, by outcome, from `rollouts.jsonl` and the last checkpoint's iterator state:
    `duplicates` (uids in two outcomes or steps) must be empty and `outcomes` + `pending` must cover the
    stream's first `position` tasks."""
    seen: dict[str, int] = {}
    for row in read_jsonl(workdir / LEDGER):
        for key in ("accepted", "filtered", "stale"):
            for uid in row[key]:
                seen[uid] = seen.get(uid, 0) + 1
    return dict(outcomes=seen, duplicates=sorted(u for u, n in seen.items() if n > 1),
                pending=list(final_state.get("pending", [])), position=int(final_state.get("position", 0)))


# ----------------------------------------------------------------------------- the stage
def reference_state(config: ml_collections.ConfigDict, placed: run_lib.PlacedState) -> Any:
    """The reference policy's model state: the `init_from` checkpoint's model (this run's fresh model when
    there is none), read into the policy's shardings. Read in setup, so a resumed run has it too."""
    state = placed.state
    if config.get("init_from", ""):
        state = apply_init_from(config.init_from, state, placed.shardings)
    return state["model"]


def setup(config: ml_collections.ConfigDict, workdir: epath.Path, plan: MeshPlan) -> run_lib.Job:
    check_config(config)
    rl = config.rl
    tokenizer = vlm_sft.sft_tokenizer(config, workdir)
    if tokenizer is None:
        raise ConfigError("config.init_from", "RL starts from a trained VLM run (its tokenizer.model and weights): "
                                              "set --config.init_from=SFT_RUN:= (or config.data.tokenizer)")
    config = vlm_pretrain.resolve_model_config(config, tokenizer)
    vlm_pretrain.save_tokenizer(tokenizer, workdir)
    spec = vlm_spec_from_config(config.model)
    obj = objective_from_config(config)
    use_reference = rl.reference == "host"
    layout = layout_from_config(config, spec)
    contract = rl_contract(spec, config, reference=use_reference)
    placed, batch_sh, jitted = vlm_pretrain.place_model(config, spec, plan, loss_fn=rl_loss_fn(config, obj),
                                                        contract=contract)
    # the rows are dealt to the batch shards balanced in tokens and ViT patches
    layout = dataclasses.replace(layout, ranks=local_row_shards(batch_sh["tokens"], *contract["tokens"].shape))

    # the reference policy: host memory, with a jitted forward on the policy's model shardings
    model_graphdef = nnx.graphdef(nnx.merge(placed.graphdef, placed.state).model)
    reference, ref_forward = None, None
    if use_reference:
        reference = HostReference(reference_state(config, placed), placed.shardings["model"])
        log.info("reference policy: %.1f MB in %s memory", reference.nbytes / 2**20, reference.memory_kind)
        ref_forward = jax.jit(
            lambda ms, batch: next_token_logprobs(nnx.merge(model_graphdef, ms)(batch), batch),
            in_shardings=(placed.shardings["model"], {k: batch_sh[k] for k in vlm_pretrain.BATCH_KEYS}),
            out_shardings=batch_sh["tokens"])

    # the rollout side: engine over the policy's arrays, driver, rewards, controller
    engine = Engine(nnx.merge(placed.graphdef, placed.state).model, max_slots=int(rl.engine_slots),
                    max_seq_len=int(config.data.seq_len), page_size=int(rl.engine_page_size), mesh=plan.mesh,
                    tokenizer=tokenizer, admit_lookahead=int(rl.admit_lookahead),
                    admit_partial=bool(rl.admit_partial), record_routing=bool(rl.routing_replay))
    driver = RolloutDriver(engine, tokenizer, max_new_tokens=int(rl.max_new_tokens),
                           sampling=Sampling(float(rl.temperature), seed=int(config.seed)))
    judge, judged = None, bool(rl.judge_url) and float(rl.judge_weight) > 0
    if judged:
        judge = JudgeClient(str(rl.judge_url), timeout_s=float(rl.judge_timeout_s))
    specs = reward_specs(str(rl.judge_rubric), float(rl.judge_weight)) if judged else reward_specs()
    worker = RewardWorker(RewardSystem(specs, judge=judge))
    stream = TaskStream(TaskMix(family_weights(str(rl.families)), seed=int(config.seed)))
    controller = RolloutController(driver, worker, stream, group_size=int(rl.group_size),
                                   groups_per_batch=int(rl.groups_per_batch), over_sample=float(rl.over_sample),
                                   abort_on_count=bool(rl.abort_on_count),
                                   abort_after_s=float(rl.abort_after_s) or None,
                                   filter_equal=bool(rl.filter_equal),
                                   max_off_policy_steps=int(rl.max_off_policy_steps))
    batches = RolloutBatches(controller=controller, stream=stream, engine=engine, layout=layout, objective=obj,
                             max_new_tokens=int(rl.max_new_tokens), workdir=workdir, reference=reference)
    device_keys = tuple(k for k in contract if k != "ref_logp")

    def train_step(state, batch, step):
        del step
        device_batch = global_batch({k: batch[k] for k in device_keys}, batch_sh)
        if reference is not None:  # prefetched while the batch was packed; released right after its forward
            with reference.on_device() as ref_params:
                device_batch["ref_logp"] = jax.block_until_ready(
                    ref_forward(ref_params, {k: device_batch[k] for k in vlm_pretrain.BATCH_KEYS}))
        state, metrics = jitted(state, device_batch)
        return state, {**metrics, **batch["round_metrics"]}

    def work(batch):
        images = int(np.asarray(batch["image_valid"]).sum())
        rows, seq = batch["tokens"].shape
        return dict(tokens=int((np.asarray(batch["segment_ids"]) != 0).sum()),
                    flops=flops_lib.train_flops_per_step(spec, rows=rows, seq_len=seq, images=images,
                                                         patches_per_image=spec.vision.max_patches))

    eval_settings = vlm_sft.rl_eval_settings(config)

    def evaluate(state) -> dict:
        return vlm_sft.rl_eval_metrics(nnx.merge(placed.graphdef, state).model, tokenizer, eval_settings)

    def finish(workdir_: epath.Path, step: int) -> None:
        del step
        plot_reward_curves(workdir_ / "metrics.jsonl", workdir_ / "rl_curves.png")
        batches.close()

    return run_lib.Job(config=config, plan=plan, state=placed.state, shardings=placed.shardings,
                       train_iter=batches, train_step=train_step, schedules=placed.schedules,
                       evaluate=evaluate if (config.eval_every and eval_settings) else None, work=work,
                       batch_keys=tuple(contract), routing=placed.routing, replicated=placed.replicated,
                       hparams=dict(preset=config.get("preset", ""), objective=str(rl.objective.name),
                                    params=placed.params),
                       finish=finish, observe_state=batches.observe,
                       fingerprints={"data.tokenizer": tokenizer.sha256})


def plot_reward_curves(metrics_path: epath.Path, out_png: epath.Path) -> None:
    """PNG: each family's training reward (every completed group of a round, 5-step running mean) and, when
    the run evaluated, its held-out evaluation reward (markers) against the step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    prefix, eval_prefix = "train/rollout/", "eval/rl/"
    families = sorted({k[len(prefix):-len("/reward_mean")] for r in rows for k in r
                       if k.startswith(prefix) and k.endswith("/reward_mean")} - {"all"})
    panels = [("training rounds (running mean of 5 steps)", lambda f: f"{prefix}{f}/reward_mean", 5)]
    if any(k.startswith(eval_prefix) and k.endswith("/reward_mean") for r in rows for k in r):
        panels.append(("held-out prompts", lambda f: f"{eval_prefix}{f}/reward_mean", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1.5, 4.5), sharey=True, squeeze=False)
    for ax, (title, key_of, smooth) in zip(axes[0], panels):
        for family in families + ["all"]:
            pts = [(r["step"], r[key_of(family)]) for r in rows if isinstance(r.get(key_of(family)), (int, float))]
            if not pts:
                continue
            xs, ys = np.array(pts).T
            if smooth > 1:
                ys = np.array([ys[max(0, i - smooth + 1):i + 1].mean() for i in range(len(ys))])
            ax.plot(xs, ys, label=family, marker="o" if smooth == 1 else None, markersize=3,
                    linewidth=2.5 if family == "all" else 1.0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    epath.Path(out_png).write_bytes(buffer.getvalue())


def abstract_program(config: ml_collections.ConfigDict, devices: Sequence[Any], *, update_rms: bool = True
                     ) -> TrainProgram:
    """The RL train step with abstract model, optimizer and RL batch (`glm5v_jax.tools.aot`): its arguments
    are the policy's state and the batch (`ref_logp` included), never the reference's parameters, which
    live in host memory."""
    reference = config.rl.reference == "host"
    return vlm_pretrain.abstract_program(
        config, devices, update_rms=update_rms, loss_fn=rl_loss_fn(config, objective_from_config(config)),
        contract=lambda spec, c: rl_contract(spec, c, reference=reference),
        facts=dict(objective=str(config.rl.objective.name), reference=str(config.rl.reference)),
        note=f"RL step (objective {config.rl.objective.name}, reference {config.rl.reference}: its log-probabilities "
             "are a batch input); ")
