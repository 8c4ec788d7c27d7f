"""RL policy objectives (GRPO, Dr.GRPO, DAPO, GSPO) as per-token terms plus one loss aggregation.

Inputs are `[B, T]` arrays: `logp` (current policy, differentiated), `old_logp` (the policy that the
advantages were computed for), `advantages` (`[B, T]`, or `[B]` with one sequence per row), `mask`
(1 on trained response tokens) and optionally `seq_ids` (`[B, T]` ints: tokens of one row with the
same id are one sequence, so a packed row holds several; the packer's segment ids, 0 = padding,
work as they are). All math is float32 whatever the input dtype; masked positions are zeroed at the
entry, so padding may hold anything (even NaN) without touching values or gradients.

Per-token terms (d = logp - old_logp, log-ratios clamped to [-20, 20] before exp, as tunix):
    ratio        token: r_t = exp(d_t)
                 sequence (GSPO): r_t = s_i = exp(mean_{t in i} d_t) for every token t of sequence i
                 sequence_token (GSPO-token): r_t = sg(s_i) * exp(logp_t - sg(logp_t)); value s_i,
                     gradient s_i * grad logp_t per token (equal to "sequence" when A is per sequence)
    surrogate    l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); with a dual clip c > 1 and
                 A < 0: l_t = min(l_t, -c A) (verl/tunix `clip_ratio_c` / `epsilon_c`)
    TIS          w_t = sg(min(exp(old_logp - rollout_logp), C)) multiplies l_t (rollout/trainer mismatch)
    KL           u = logp - ref_logp: k1 = u, k2 = u^2 / 2, k3 = low_var_kl = exp(-u) + u - 1,
                 clamped to [-kl_clamp, kl_clamp] (verl low_var_kl: 10)
    total        loss_t = w_t l_t + beta * kl_t

Aggregation returns a global (numerator, denominator) pair, `SumCount`; micro-batches (rows split)
and packing (several sequences per row) leave numerator / denominator unchanged once the pairs are
summed (`combine`) and divided at the end (`finalize`). With S_i = sum_{t in i} loss_t, n_i the token
count of sequence i and N the number of sequences with at least one token:
    token-mean                (sum_i S_i,          sum_i n_i)    DAPO
    seq-mean-token-mean       (sum_i S_i / n_i,    N)            GRPO, GSPO
    seq-mean-token-sum        (sum_i S_i,          N)
    seq-mean-token-sum-norm   (sum_i S_i,          N * norm)     Dr.GRPO, norm = max response length
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence, TypeVar

import jax
import jax.numpy as jnp

from glm5v_jax.errors import ConfigError
from glm5v_jax.rl.advantages import ADVANTAGES, advantage_fn, overlong_penalty

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp (tunix, verl): exp(20) ~ 5e8 stays finite in f32
RATIO_LEVELS = ("token", "sequence", "sequence_token")

T = TypeVar("T")
sg = jax.lax.stop_gradient


class SumCount(NamedTuple):
    """An unreduced metric: value = numerator / denominator, summed across micro-batches first."""
    numerator: jax.Array
    denominator: jax.Array


def combine(parts: Sequence[T]) -> T:
    """Sum a sequence of equally structured pytrees of SumCount (one per micro-batch) leaf by leaf."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *parts)


def finalize(tree):
    """numerator / denominator for every SumCount in `tree` (a SumCount, or a dict of them); 0 where the
    denominator is 0 (an empty micro-batch or metric)."""
    def value(p: SumCount) -> jax.Array:
        return jnp.where(p.denominator > 0, p.numerator / jnp.where(p.denominator > 0, p.denominator, 1.0), 0.0)
    return jax.tree.map(value, tree, is_leaf=lambda x: isinstance(x, SumCount))


def _lookup(registry: Mapping[str, T], registry_name: str, key: str, field: str) -> T:
    if key not in registry:
        raise ConfigError(field, f"{key!r} is not in {registry_name}; known: {sorted(registry)}")
    return registry[key]


# ---------------------------------------------------------------- sequences: rows, or packed segments

def _sequence_keys(shape: tuple[int, int], seq_ids: jax.Array | None, num_segments: int | None):
    """(a sequence key per token [B, T] int32, number of keys): key = row * S + seq_id."""
    b, t = shape
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    if seq_ids is None:
        return rows, b
    s = t + 1 if num_segments is None else int(num_segments)  # a row of T tokens holds <= T sequences
    return rows * s + jnp.asarray(seq_ids).astype(jnp.int32), b * s


def sequence_totals(values: jax.Array, mask: jax.Array, seq_ids: jax.Array | None = None,
                    num_segments: int | None = None):
    """(per-sequence sums of masked values [K], token counts [K], key of each token [B, T]).
    seq_ids must lie in [0, num_segments) (default T + 1); None: each row is one sequence."""
    keys, k = _sequence_keys(values.shape, seq_ids, num_segments)
    m = mask.astype(jnp.float32)
    sums = jax.ops.segment_sum((values * m).reshape(-1), keys.reshape(-1), num_segments=k)
    counts = jax.ops.segment_sum(m.reshape(-1), keys.reshape(-1), num_segments=k)
    return sums, counts, keys


def sequence_mean(values: jax.Array, mask: jax.Array, seq_ids: jax.Array | None = None,
                  num_segments: int | None = None) -> jax.Array:
    """Each token's sequence mean of the masked `values`, `[B, T]` (differentiable)."""
    sums, counts, keys = sequence_totals(values, mask, seq_ids, num_segments)
    return (sums / jnp.maximum(counts, 1.0))[keys]


# ---------------------------------------------------------------- aggregation

def _token_mean(x, m, sums, counts, norm) -> SumCount:
    return SumCount(jnp.sum(x), jnp.sum(m))


def _seq_mean_token_mean(x, m, sums, counts, norm) -> SumCount:
    return SumCount(jnp.sum(sums / jnp.maximum(counts, 1.0)), jnp.sum(counts > 0).astype(jnp.float32))


def _seq_mean_token_sum(x, m, sums, counts, norm) -> SumCount:
    return SumCount(jnp.sum(sums), jnp.sum(counts > 0).astype(jnp.float32))


def _seq_mean_token_sum_norm(x, m, sums, counts, norm) -> SumCount:
    if norm is None or norm <= 0:
        raise ConfigError("norm", "seq-mean-token-sum-norm needs a constant norm > 0 (e.g. the max response "
                          f"length; the row width would change under packing); got {norm!r}")
    return SumCount(jnp.sum(x), jnp.sum(counts > 0).astype(jnp.float32) * float(norm))


LOSS_AGG: dict[str, Callable[..., SumCount]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(per_token: jax.Array, mask: jax.Array, seq_ids: jax.Array | None = None, mode: str = "token-mean",
              *, num_segments: int | None = None, norm: float | None = None) -> SumCount:
    """(numerator, denominator) of `per_token` [B, T] over the tokens where `mask` [B, T] is set, by the
    LOSS_AGG `mode`. Sequences are rows (seq_ids None) or (row, seq_id) pairs, seq_ids in [0, num_segments)
    (default T + 1); a sequence without masked tokens does not count. `norm`: seq-mean-token-sum-norm's constant."""
    fn = _lookup(LOSS_AGG, "LOSS_AGG", mode, "loss_agg")
    m = jnp.asarray(mask).astype(bool)
    x = jnp.where(m, jnp.asarray(per_token).astype(jnp.float32), 0.0)
    sums, counts, _ = sequence_totals(x, m, seq_ids, num_segments)
    return fn(x, m.astype(jnp.float32), sums, counts, norm)


# ---------------------------------------------------------------- per-token terms

def policy_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, seq_ids: jax.Array | None = None, *,
                 level: str = "token", num_segments: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(importance ratio r [B, T] at `level` (RATIO_LEVELS), token log-ratio d [B, T] (clamped));
    both 0-filled where `mask` is off."""
    if level not in RATIO_LEVELS:
        raise ConfigError("ratio_level", f"{level!r} is not in RATIO_LEVELS; known: {sorted(RATIO_LEVELS)}")
    m = jnp.asarray(mask).astype(bool)
    d = jnp.where(m, jnp.asarray(logp).astype(jnp.float32) - jnp.asarray(old_logp).astype(jnp.float32), 0.0)
    d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level == "token":
        log_r = d
    elif level == "sequence":  # s_i = exp(mean_t d_t): the gradient reaches every token through the mean
        log_r = sequence_mean(d, m, seq_ids, num_segments)
    else:  # GSPO-token: value log s_i, gradient d(logp_t) per token
        log_r = sg(sequence_mean(d, m, seq_ids, num_segments)) + d - sg(d)
    return jnp.where(m, jnp.exp(log_r), 0.0), d


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, eps_low: float, eps_high: float,
                      dual_clip: float | None = None):
    """PPO's clipped surrogate per token, as a loss: (loss, clipped_low, clipped_high, dual_clipped), [B, T].

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); clipped_high: A > 0 and r > 1 + eps_high,
    clipped_low: A < 0 and r < 1 - eps_low (the tokens whose gradient the clip removes). With a dual clip
    c > 1 and A < 0 the loss is bounded by -c A (it kicks in where max(r, clip(r)) > c: dual_clipped).
    """
    a = advantages.astype(jnp.float32)
    loss = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    clipped_high = (a > 0) & (ratio > 1.0 + eps_high)
    clipped_low = (a < 0) & (ratio < 1.0 - eps_low)
    if dual_clip is None:
        return loss, clipped_low, clipped_high, jnp.zeros_like(clipped_low)
    dual = (a < 0) & (loss > -dual_clip * a)
    return jnp.where(dual, -dual_clip * a, loss), clipped_low, clipped_high, dual


def tis_weights(old_logp: jax.Array, rollout_logp: jax.Array, cap: float) -> tuple[jax.Array, jax.Array]:
    """Truncated importance weights (w = sg(min(pi_old / pi_rollout, cap)) [B, T], truncated = ratio > cap)."""
    d = jnp.asarray(old_logp).astype(jnp.float32) - jnp.asarray(rollout_logp).astype(jnp.float32)
    raw = jnp.exp(jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return sg(jnp.minimum(raw, cap)), raw > cap


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {  # of u = logp - ref_logp
    "k1": lambda u: u,
    "k2": lambda u: 0.5 * u * u,
    "k3": lambda u: jnp.exp(-u) + u - 1.0,  # ref/pi - log(ref/pi) - 1 >= 0, Schulman's low-variance form
}
KL_ESTIMATORS["low_var_kl"] = KL_ESTIMATORS["k3"]


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3", clamp: float | None = 10.0) -> jax.Array:
    """Per-token KL(pi || ref) estimate [B, T] by KL_ESTIMATORS[kind], clamped to [-clamp, clamp]."""
    fn = _lookup(KL_ESTIMATORS, "KL_ESTIMATORS", kind, "kl_kind")
    u = jnp.asarray(logp).astype(jnp.float32) - jnp.asarray(ref_logp).astype(jnp.float32)
    kl = fn(jnp.clip(u, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


# ---------------------------------------------------------------- objectives

@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """One RL objective: advantage estimator, surrogate, KL, TIS, aggregation. Hashable (a jit static)."""
    advantage: str = "grpo"  # ADVANTAGES key
    adv_ddof: int = 1  # GRPO std: 1 = sample std (tunix/TRL/verl)
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None  # c > 1: bound -c A for A < 0
    ratio_level: str = "token"  # RATIO_LEVELS
    loss_agg: str = "seq-mean-token-mean"  # LOSS_AGG key
    token_sum_norm: float | None = None  # seq-mean-token-sum-norm's constant (max response length)
    kl_kind: str = "k3"  # KL_ESTIMATORS key
    kl_beta: float = 0.0  # 0: no KL term (ref_logp then only feeds the "kl_ref" metric)
    kl_clamp: float | None = 10.0
    tis_cap: float | None = None  # C of truncated IS; None: off
    overlong: bool = False  # DAPO overlong reward shaping
    overlong_cache_len: int = 4096
    overlong_factor: float = 1.0

    def __post_init__(self):
        _lookup(ADVANTAGES, "ADVANTAGES", self.advantage, "ObjectiveSpec.advantage")
        _lookup(LOSS_AGG, "LOSS_AGG", self.loss_agg, "ObjectiveSpec.loss_agg")
        _lookup(KL_ESTIMATORS, "KL_ESTIMATORS", self.kl_kind, "ObjectiveSpec.kl_kind")
        checks = [
            (self.ratio_level in RATIO_LEVELS, "ratio_level", f"must be one of {RATIO_LEVELS}"),
            (self.eps_low >= 0 and self.eps_high >= 0, "eps_low", "clip ranges must be >= 0"),
            (self.dual_clip is None or self.dual_clip > 1, "dual_clip", "must be None or > 1"),
            (self.kl_beta >= 0, "kl_beta", "must be >= 0"),
            (self.kl_clamp is None or self.kl_clamp > 0, "kl_clamp", "must be None or > 0"),
            (self.tis_cap is None or self.tis_cap > 0, "tis_cap", "must be None or > 0"),
            (self.token_sum_norm is None or self.token_sum_norm > 0, "token_sum_norm", "must be None or > 0"),
            (self.overlong_cache_len > 0, "overlong_cache_len", "must be > 0"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ConfigError(f"ObjectiveSpec.{field}", f"{message}; got {getattr(self, field)!r}")


OBJECTIVES: dict[str, ObjectiveSpec] = {
    # DeepSeekMath: symmetric clip, per-sequence token mean, k3 KL with beta 0.04 (tunix default).
    "grpo": ObjectiveSpec(kl_beta=0.04),
    # Dr.GRPO: no std division, constant normaliser (set token_sum_norm to the max response length), no KL.
    "dr_grpo": ObjectiveSpec(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm"),
    # DAPO: clip-higher 0.2 / 0.28, token-level normalisation, overlong shaping, no KL.
    "dapo": ObjectiveSpec(eps_high=0.28, loss_agg="token-mean", overlong=True),
    # GSPO: sequence ratio (length-normalised), clip 3e-4 / 4e-4 as in the paper, no KL.
    "gspo": ObjectiveSpec(eps_low=3e-4, eps_high=4e-4, ratio_level="sequence"),
}


def objective(name: str, **overrides) -> ObjectiveSpec:
    """The OBJECTIVES preset `name` with `overrides`, e.g. objective("dr_grpo", token_sum_norm=1024)."""
    return dataclasses.replace(_lookup(OBJECTIVES, "OBJECTIVES", name, "objective"), **overrides)


def objective_advantages(spec: ObjectiveSpec, rewards: jax.Array, group_ids: jax.Array,
                         num_groups: int | None = None, *, lengths: jax.Array | None = None,
                         max_len: int | None = None) -> jax.Array:
    """Advantages [N] of `spec`: overlong shaping of the rewards (when on; needs lengths and max_len; the cache
    window is capped at max_len for short tiny-config budgets), then the spec's estimator."""
    rewards = jnp.asarray(rewards).astype(jnp.float32)
    if spec.overlong:
        if lengths is None or max_len is None:
            raise ConfigError("ObjectiveSpec.overlong", "overlong shaping needs the response lengths and max_len")
        rewards = rewards + overlong_penalty(lengths, max_len, min(spec.overlong_cache_len, max_len),
                                             spec.overlong_factor)
    kwargs = {"ddof": spec.adv_ddof} if spec.advantage == "grpo" else {}
    return advantage_fn(spec.advantage)(rewards, group_ids, num_groups, **kwargs)


def policy_loss(spec: ObjectiveSpec, logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                mask: jax.Array, seq_ids: jax.Array | None = None, *, ref_logp: jax.Array | None = None,
                rollout_logp: jax.Array | None = None, num_segments: int | None = None):
    """(loss_sum, loss_count, metrics) of `spec` for one (micro-)batch; loss = sum / count after `combine`.

    metrics: SumCount pairs (`finalize` turns them into values): "pg_loss" (aggregated like the loss, without
    KL), and token means over masked tokens: "clip_frac_low", "clip_frac_high", "dual_clip_frac",
    "ratio_mean", "approx_kl" (k3 of pi_old vs pi: r - 1 - log r); with ref_logp "kl_ref"; with rollout_logp
    "rollout_logp_abs_diff" (|old - rollout|) and, when TIS is on, "tis_weight_mean", "tis_trunc_frac".
    """
    if spec.kl_beta > 0 and ref_logp is None:
        raise ConfigError("ObjectiveSpec.kl_beta", f"kl_beta={spec.kl_beta} needs ref_logp (or set kl_beta=0)")
    if spec.tis_cap is not None and rollout_logp is None:
        raise ConfigError("ObjectiveSpec.tis_cap", f"tis_cap={spec.tis_cap} needs rollout_logp (or set None)")
    m = jnp.asarray(mask).astype(bool)
    fm = m.astype(jnp.float32)

    def clean(x):  # f32, zero at masked positions: no NaN/inf reaches values or gradients
        return jnp.where(m, jnp.asarray(x).astype(jnp.float32), 0.0)

    adv = jnp.asarray(advantages).astype(jnp.float32)
    adv = clean(adv[:, None] if adv.ndim == 1 else adv)
    logp, old_logp = clean(logp), clean(old_logp)
    ratio, d = policy_ratio(logp, old_logp, m, seq_ids, level=spec.ratio_level, num_segments=num_segments)
    pg, low, high, dual = clipped_surrogate(ratio, adv, spec.eps_low, spec.eps_high, spec.dual_clip)

    def token_mean(x) -> SumCount:
        return SumCount(jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0)), jnp.sum(fm))

    metrics = {"clip_frac_low": token_mean(low), "clip_frac_high": token_mean(high),
               "dual_clip_frac": token_mean(dual), "ratio_mean": token_mean(ratio),
               "approx_kl": token_mean(jnp.exp(d) - 1.0 - d)}
    if rollout_logp is not None:
        rollout_logp = clean(rollout_logp)
        metrics["rollout_logp_abs_diff"] = token_mean(jnp.abs(old_logp - rollout_logp))
        if spec.tis_cap is not None:
            w, truncated = tis_weights(old_logp, rollout_logp, spec.tis_cap)
            pg = pg * w
            metrics["tis_weight_mean"], metrics["tis_trunc_frac"] = token_mean(w), token_mean(truncated)
    agg = dict(mode=spec.loss_agg, num_segments=num_segments, norm=spec.token_sum_norm)
    metrics["pg_loss"] = aggregate(pg, m, seq_ids, **agg)
    total = pg
    if ref_logp is not None:
        kl = kl_penalty(logp, clean(ref_logp), spec.kl_kind, spec.kl_clamp)
        metrics["kl_ref"] = token_mean(kl)
        if spec.kl_beta > 0:
            total = pg + spec.kl_beta * kl
    loss = aggregate(total, m, seq_ids, **agg)
    return loss.numerator, loss.denominator, metrics
