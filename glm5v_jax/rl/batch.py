"""RL training batches: a round's scored groups -> packed rows in the VLM batch contract, plus the
per-token arrays the objective reads, and the round's per-source metrics.

    layout = RowLayout(rows=16, seq_len=512, max_images=2, max_patches=256, patch_dim=588)
    batch, stats = build_batch(groups, objective_spec, layout, max_new_tokens=48)

Every episode is one sequence (a segment of a packed row), placed by first-fit decreasing with both
capacities of a row (`glm5v_jax.data.packing.pack_rows`): `seq_len` tokens and `max_images` image slots
(row b owns slots b*M .. b*M+M-1, in order of appearance, as in the pre-training pipeline). Host arrays,
aligned to the tokens (index t holds token t's value; the step shifts them onto the position that predicts token t):

    tokens, segment_ids, loss_mask (the answer tokens the engine sampled), patches ... image_valid
    rollout_logp [B, S] f32   the engine's log-probability of token t (`Episode.logp_raw`)
    advantages   [B, S] f32   its episode's advantage (the objective's estimator over its group)
    version_lag  [B, S] f32   policy versions between sampling token t and this batch (0: on-policy)
    expert_ids   [B, S, L_moe, top_k] i32   with `RowLayout.routing`: the experts the engine routed token t
                 to in each MoE layer (routing replay); -1 where it has no record (the last token, padding)

An episode that cannot be trained (more images than a row holds, longer than a row, or no answer token)
is skipped and counted (`stats.skipped`); nothing else is dropped. Large Python objects (texts, PNG bytes,
task metadata) never enter the arrays: only ids, numbers and pixels do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from glm5v_jax.data.packing import pack_rows, rank_order
from glm5v_jax.generate.requests import IMAGE_KEYS
from glm5v_jax.rl import metrics
from glm5v_jax.rl.objectives import ObjectiveSpec, objective_advantages
from glm5v_jax.rl.rollout import Episode

RL_KEYS = ("rollout_logp", "advantages", "version_lag")  # per-token f32 arrays beside the VLM contract


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The static shapes of an RL batch: `rows` x `seq_len` tokens, `max_images` slots of `max_patches`
    patches of `patch_dim` values per row."""

    rows: int
    seq_len: int
    max_images: int
    max_patches: int
    patch_dim: int
    routing: tuple[int, int] | None = None  # (MoE layers, top_k): pack the episodes' expert_ids for replay
    # data-parallel ranks sharing the rows (each a contiguous slice of rows / ranks rows): the packed rows are
    # dealt to them balanced in tokens and ViT patches (`data.packing.rank_order`)
    ranks: int = 1


@dataclasses.dataclass
class BatchStats:
    """What the batch holds and what was left out of it."""

    episodes: int = 0  # placed in the batch
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> episodes left out
    tokens: int = 0  # non-padding tokens
    answer_tokens: int = 0
    images: int = 0
    rows_used: int = 0


def group_advantages(spec: ObjectiveSpec, groups: Sequence[Any], max_new_tokens: int) -> list[np.ndarray]:
    """Each group's advantages `[n]` under `spec` (overlong shaping reads each episode's answer length)."""
    rewards = np.array([r for g in groups for r in g.rewards], np.float32)
    ids = np.concatenate([np.full(len(g.episodes), i, np.int32) for i, g in enumerate(groups)])
    lengths = np.array([sum(e.loss_mask) for g in groups for e in g.episodes], np.int32)
    adv = np.asarray(objective_advantages(spec, jnp.asarray(rewards), jnp.asarray(ids), len(groups),
                                          lengths=jnp.asarray(lengths), max_len=max_new_tokens))
    return np.split(adv, np.cumsum([len(g.episodes) for g in groups])[:-1])


def _place(episodes: Sequence[Episode], layout: RowLayout, stats: BatchStats) -> list[list[int]]:
    """Row -> indices of the episodes it holds (`data.packing.pack_rows` over tokens and image slots: first-fit
    decreasing with both capacities); the episodes that cannot be placed are counted by reason."""
    def skip(reason: str, count: int = 1) -> None:
        if count:
            stats.skipped[reason] = stats.skipped.get(reason, 0) + count

    trainable = [i for i, e in enumerate(episodes) if any(e.loss_mask)]
    skip("no_answer_tokens", len(episodes) - len(trainable))
    tokens = [len(episodes[i].tokens) for i in trainable]
    images = [len(episodes[i].image_slots) for i in trainable]
    rows, too_large = pack_rows(tokens, images, seq_len=layout.seq_len, vit_capacity=layout.max_images)
    for j in too_large:
        skip("too_many_images" if images[j] > layout.max_images else "too_long")
    skip("no_room", sum(len(r) for r in rows[layout.rows:]))  # the smallest episodes, in rows past the batch
    return [[trainable[j] for j in r] for r in rows[:layout.rows]]


def build_batch(groups: Sequence[Any], spec: ObjectiveSpec, layout: RowLayout, *, max_new_tokens: int,
                version: int = 0) -> tuple[dict[str, np.ndarray], BatchStats]:
    """(host batch, stats) of the groups' episodes (each group: `.episodes` and `.rewards`, as
    `rl.controller.Group`); `version`: the policy version the batch trains (for `version_lag`)."""
    stats = BatchStats()
    episodes = [e for g in groups for e in g.episodes]
    advantages = [a for adv in group_advantages(spec, groups, max_new_tokens) for a in adv] if groups else []
    b, s, m = layout.rows, layout.seq_len, layout.max_images
    out = dict(tokens=np.zeros((b, s), np.int32), segment_ids=np.zeros((b, s), np.int32),
               loss_mask=np.zeros((b, s), bool), **{k: np.zeros((b, s), np.float32) for k in RL_KEYS},
               patches=np.zeros((b * m, layout.max_patches, layout.patch_dim), np.float32),
               patch_yx=np.zeros((b * m, layout.max_patches, 2), np.int32),
               patch_valid=np.zeros((b * m, layout.max_patches), bool), image_grid=np.zeros((b * m, 2), np.int32),
               image_valid=np.zeros((b * m,), bool))
    if layout.routing is not None:
        out["expert_ids"] = np.full((b, s, *layout.routing), -1, np.int32)
    rows = _place(episodes, layout, stats)
    if layout.ranks > 1 and rows:
        loads = np.zeros((b, 2))
        for r, members in enumerate(rows):
            loads[r] = (sum(len(episodes[i].tokens) for i in members),
                        sum(int(im["patch_valid"].sum()) for i in members for im in episodes[i].image_slots))
        rows = [rows[i] if i < len(rows) else [] for i in rank_order(loads, layout.ranks)]
    for r, members in enumerate(rows):
        t = slot = 0
        for seg, i in enumerate(sorted(members), start=1):  # episodes in batch order within a row
            e, n = episodes[i], len(episodes[i].tokens)
            out["tokens"][r, t:t + n] = e.tokens
            out["segment_ids"][r, t:t + n] = seg
            out["loss_mask"][r, t:t + n] = e.loss_mask
            out["rollout_logp"][r, t:t + n] = e.logp_raw
            out["advantages"][r, t:t + n] = advantages[i]
            versions = np.asarray(e.versions, np.float32)
            out["version_lag"][r, t:t + n] = np.where(versions >= 0, version - versions, 0.0)
            if layout.routing is not None and e.expert_ids:
                fed = min(len(e.expert_ids), n)
                out["expert_ids"][r, t:t + fed] = np.stack(e.expert_ids[:fed])
            for image in e.image_slots:
                for k in IMAGE_KEYS:
                    out[k][r * m + slot] = image[k][0]
                slot += 1
            t += n
            stats.episodes += 1
            stats.answer_tokens += int(sum(e.loss_mask))
            stats.images += len(e.image_slots)
        stats.tokens += t
    stats.rows_used = sum(1 for r in rows if r)
    return out, stats


def round_metrics(rnd: Any, stats: BatchStats) -> dict[str, float]:
    """Scalars of a round (`rl.controller.Round`) and its batch: per-source reward and pass@k over every
    completed group (`rollout/<source>/...`: accepted and filtered ones, so the equal-reward filter does
    not bias them), the controller's counters (`rollout/...`) and the batch's (`batch/...`)."""
    stats_by_source: dict[str, metrics.SourceStats] = {}
    for g in [*rnd.groups, *rnd.filtered_groups]:
        scored = [s for s in g.scores if s is not None]
        g_stats = metrics.group_stats([s.score for s in scored],
                                      verifier_latency_s=[t for s in scored for t in s.verifier_seconds],
                                      judge_latency_s=[t for s in scored for t in s.judge_seconds])
        stats_by_source = metrics.merge_stats(stats_by_source, {g.task.data_source: g_stats})
    out = {f"rollout/{k}": v for k, v in metrics.summary(stats_by_source).items()
           if k.endswith(("/reward_mean", "/fallback_rate", "/format_failure_rate")) or "/pass@" in k}
    out.update({f"rollout/{k}": float(getattr(rnd, k)) for k in ("filtered", "aborted", "resumed", "stale",
                                                                  "cancelled_rewards", "seconds")})
    out["rollout/accepted"] = float(len(rnd.groups))
    out["rollout/abort_time"] = float(rnd.abort_reason == "time")
    out["rollout/abort_count"] = float(rnd.abort_reason == "count")
    out.update({"batch/episodes": float(stats.episodes), "batch/tokens": float(stats.tokens),
                "batch/answer_tokens": float(stats.answer_tokens), "batch/rows_used": float(stats.rows_used),
                "batch/skipped": float(sum(stats.skipped.values()))})
    return out
