"""RL objectives: advantages, overlong shaping, every per-token term, every loss aggregation and each preset's
policy loss equal loops over groups / sequences in NumPy; gradients equal jax.grad of the same loop in jnp;
splitting the batch into micro-batches (pairs summed) and packing several sequences per row leave the loss
and metrics unchanged; bf16 inputs are computed in f32; padding (NaN here) never reaches values or gradients."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5v_jax.errors import ConfigError
from glm5v_jax.rl.advantages import ADVANTAGES, compute_advantages, overlong_penalty
from glm5v_jax.rl.objectives import (KL_ESTIMATORS, LOSS_AGG, OBJECTIVES, ObjectiveSpec, SumCount, aggregate,
                                     clipped_surrogate, combine, finalize, kl_penalty, objective,
                                     objective_advantages, policy_loss, policy_ratio, tis_weights)

B, T = 8, 10
SPECS = {
    "grpo": OBJECTIVES["grpo"],
    "dr_grpo": objective("dr_grpo", token_sum_norm=T),
    "dapo": OBJECTIVES["dapo"],
    "gspo": OBJECTIVES["gspo"],
    "grpo_dual_tis_k1": objective("grpo", dual_clip=1.5, tis_cap=2.0, kl_kind="k1", kl_beta=0.1),
    "dapo_gspo_token_k2": objective("dapo", ratio_level="sequence_token", eps_low=0.05, eps_high=0.08,
                                    kl_kind="k2", kl_beta=0.2, loss_agg="seq-mean-token-sum"),
    "gspo_token": objective("gspo", ratio_level="sequence_token", eps_low=0.02, eps_high=0.03),
}


# ---------------------------------------------------------------- fixtures: a padded batch, its packing

def _batch(seed: int = 0, b: int = B, t: int = T) -> dict:
    """Rows = [prompt (mask 0) | response (mask 1) | padding (mask 0, NaN values)]; row 5 has no response."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 3, b)
    resp = rng.integers(1, t - 2, b)
    resp[5 % b] = 0
    length = prompt + resp
    cols = np.arange(t)[None]
    mask = (cols >= prompt[:, None]) & (cols < length[:, None])
    scale = np.array([0.6, 0.05, 1e-4, 1.2, 0.3, 0.5, 2e-3, 0.9])[np.arange(b) % 8][:, None]
    logp = rng.normal(-1.5, 0.7, (b, t))
    old = logp + scale * rng.normal(size=(b, t))
    ref = logp + 0.4 * rng.normal(size=(b, t))
    roll = old + 0.5 * rng.normal(size=(b, t))
    adv = rng.normal(size=b)
    adv[1] = 0.0
    out = {"mask": mask, "adv": adv.astype(np.float32), "length": length}
    for k, v in (("logp", logp), ("old", old), ("ref", ref), ("roll", roll)):
        out[k] = np.where(cols < length[:, None], v, np.nan).astype(np.float32)  # padding is NaN
    return out


def _rows(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _pack(batch: dict, width: int) -> dict:
    """Rows' [0, length) spans packed greedily into rows of `width`, seq ids 1.. per row, 0 = padding."""
    packed_rows, cur = [], []
    for r in range(len(batch["length"])):
        if cur and sum(batch["length"][i] for i in cur) + batch["length"][r] > width:
            packed_rows.append(cur)
            cur = []
        cur.append(r)
    packed_rows.append(cur)
    n = len(packed_rows)
    out = {k: np.full((n, width), np.nan, np.float32) for k in ("logp", "old", "ref", "roll", "adv")}
    out["mask"] = np.zeros((n, width), bool)
    out["seq_ids"] = np.zeros((n, width), np.int32)
    for p, members in enumerate(packed_rows):
        pos = 0
        for sid, r in enumerate(members, start=1):
            ln = batch["length"][r]
            for k in ("logp", "old", "ref", "roll", "mask"):
                out[k][p, pos:pos + ln] = batch[k][r, :ln]
            out["adv"][p, pos:pos + ln] = batch["adv"][r]
            out["seq_ids"][p, pos:pos + ln] = sid
            pos += ln
    assert n < len(batch["length"]) and (out["seq_ids"].max(axis=1) > 1).any()  # really packed
    return out


def _loss(spec, batch, logp=None, **kw):
    return policy_loss(spec, batch["logp"] if logp is None else logp, batch["old"], batch["adv"], batch["mask"],
                       batch.get("seq_ids"), ref_logp=batch["ref"], rollout_logp=batch["roll"], **kw)


# ---------------------------------------------------------------- references: loops in NumPy (or jnp)

def _sequences(batch: dict) -> list:
    """Index arrays (rows, cols) of each sequence's masked tokens, one sequence per row."""
    return [np.nonzero(batch["mask"][r])[0] for r in range(len(batch["mask"]))]


def _ref_token_terms(spec, batch, xp, logp):
    """Per sequence: (surrogate-with-TIS + beta * KL) per token, in float64 (np) or float32 (jnp)."""
    sgr = (lambda x: x) if xp is np else jax.lax.stop_gradient
    dt = np.float64 if xp is np else np.float32
    out = []
    for r, cols in enumerate(_sequences(batch)):
        if len(cols) == 0:
            out.append(None)
            continue
        lp = logp[r, cols]
        old, ref, roll = (batch[k][r, cols].astype(dt) for k in ("old", "ref", "roll"))
        a = (batch["adv"][r, cols] if batch["adv"].ndim == 2 else np.full(len(cols), batch["adv"][r])).astype(dt)
        d = xp.clip(lp - old, -20, 20)
        if spec.ratio_level == "token":
            ratio = xp.exp(d)
        elif spec.ratio_level == "sequence":
            ratio = xp.exp(xp.mean(d)) * xp.ones_like(d)
        else:
            ratio = xp.exp(sgr(xp.mean(d)) + d - sgr(d))
        loss = xp.maximum(-a * ratio, -a * xp.clip(ratio, 1 - spec.eps_low, 1 + spec.eps_high))
        if spec.dual_clip is not None:
            loss = xp.where(a < 0, xp.minimum(loss, -spec.dual_clip * a), loss)
        if spec.tis_cap is not None:
            loss = loss * np.minimum(np.exp(old - roll), spec.tis_cap)
        u = xp.clip(lp - ref, -20, 20)
        kl = {"k1": u, "k2": 0.5 * u ** 2, "k3": xp.exp(-u) + u - 1}[spec.kl_kind]
        kl = kl if spec.kl_clamp is None else xp.clip(kl, -spec.kl_clamp, spec.kl_clamp)
        out.append(loss + spec.kl_beta * kl)
    return out


def _grad(spec, batch) -> np.ndarray:
    """d loss / d logp of policy_loss, loss = sum / count."""
    return np.asarray(jax.grad(lambda lp: jnp.divide(*_loss(spec, batch, lp)[:2]))(jnp.asarray(batch["logp"])))


def _ref_grad(spec, batch) -> np.ndarray:
    """jax.grad of the reference loop written in jnp (float32)."""
    return np.asarray(jax.grad(lambda lp: _ref_loss(spec, batch, jnp, lp))(jnp.asarray(np.nan_to_num(batch["logp"]))))


def _ref_aggregate(per_seq: list, mode: str, norm=None, xp=np):
    """The LOSS_AGG modes by their definitions over a list of per-token arrays (None: empty sequence)."""
    live = [x for x in per_seq if x is not None and len(x)]
    sums = [xp.sum(x) for x in live]
    if mode == "token-mean":
        return sum(sums) / sum(len(x) for x in live)
    if mode == "seq-mean-token-mean":
        return sum(xp.mean(x) for x in live) / len(live)
    if mode == "seq-mean-token-sum":
        return sum(sums) / len(live)
    assert mode == "seq-mean-token-sum-norm"
    return sum(sums) / (len(live) * norm)


def _ref_loss(spec, batch, xp=np, logp=None):
    logp = batch["logp"].astype(np.float64) if logp is None else logp
    return _ref_aggregate(_ref_token_terms(spec, batch, xp, logp), spec.loss_agg, spec.token_sum_norm, xp)


# ---------------------------------------------------------------- advantages and shaping

def _ref_advantages(name, rewards, groups, ddof=1, eps=1e-6):
    out = np.zeros(len(rewards))
    for i, (r, g) in enumerate(zip(rewards, groups)):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == g]
        n, mean = len(members), sum(members) / len(members)
        if n == 1:
            continue
        if name == "grpo":
            std = (sum((x - mean) ** 2 for x in members) / max(n - ddof, 1)) ** 0.5
            out[i] = (r - mean) / (std + eps)
        elif name == "dr_grpo":
            out[i] = r - mean
        else:
            out[i] = r - (sum(members) - r) / (n - 1)
    return out


def test_advantages_equal_loops_over_groups():
    rng = np.random.default_rng(1)
    groups = np.array([3, 0, 3, 1, 0, 3, 4, 2, 2, 3, 0, 2, 2])  # sizes 3, 1, 4, 4, 1; interleaved
    rewards = rng.normal(size=len(groups)).astype(np.float32)
    rewards[groups == 2] = 0.5  # a group whose rewards are all equal
    for name in ADVANTAGES:
        for kw in ([{"ddof": 1}, {"ddof": 0}] if name == "grpo" else [{}]):
            got = np.asarray(compute_advantages(name, rewards, groups, 6, **kw))
            want = _ref_advantages(name, rewards.astype(np.float64), groups, **kw)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {kw}")
            assert got.dtype == np.float32 and (got[groups == 1] == 0).all() and (got[groups == 2] == 0).all()
    assert not np.allclose(compute_advantages("grpo", rewards, groups, 6, ddof=0),
                           compute_advantages("grpo", rewards, groups, 6, ddof=1))
    jitted = jax.jit(compute_advantages, static_argnums=(0, 3))("rloo", jnp.asarray(rewards, jnp.bfloat16), groups, 6)
    np.testing.assert_allclose(jitted, _ref_advantages("rloo", rewards.astype(jnp.bfloat16).astype(np.float64),
                                                       groups), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"ADVANTAGES; known: \['dr_grpo', 'grpo', 'rloo'\]"):
        compute_advantages("ppo", rewards, groups)


def test_overlong_penalty_and_dapo_shaping():
    lengths = np.array([0, 100, 600, 601, 700, 999, 1000, 1001, 5000])
    max_len, cache = 1000, 400
    want = [0.0 if n <= max_len - cache else -1.0 if n > max_len else ((max_len - cache) - n) / cache
            for n in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, cache), want, atol=1e-7)
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, cache, 0.5), 0.5 * np.array(want), atol=1e-7)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 100, 400)
    rewards, groups = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0, 0, 0, 0])
    lengths = np.array([10, 7000, 20, 3000])
    shaped = rewards + np.array(overlong_penalty(lengths, 8192, 4096))
    assert shaped[1] < 1.0 and shaped[3] == 1.0
    np.testing.assert_allclose(objective_advantages(OBJECTIVES["dapo"], rewards, groups, 1, lengths=lengths,
                                                    max_len=8192), _ref_advantages("grpo", shaped, groups), rtol=1e-5)
    np.testing.assert_allclose(objective_advantages(OBJECTIVES["grpo"], rewards, groups, 1),
                               _ref_advantages("grpo", rewards, groups), rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        objective_advantages(OBJECTIVES["dapo"], rewards, groups)


# ---------------------------------------------------------------- per-token terms

def test_ratio_surrogate_tis_and_kl_terms_equal_numpy():
    bt = _batch(2)
    m, lp, old = bt["mask"], bt["logp"].astype(np.float64), bt["old"].astype(np.float64)
    a = np.broadcast_to(bt["adv"][:, None], m.shape)
    ratio, d = policy_ratio(bt["logp"], bt["old"], m)
    np.testing.assert_allclose(np.asarray(ratio)[m], np.exp(lp - old)[m], rtol=1e-6)
    assert np.isfinite(ratio).all() and (np.asarray(ratio)[~m] == 0).all()
    seq_ratio, _ = policy_ratio(bt["logp"], bt["old"], m, level="sequence")
    for r in range(B):
        if m[r].any():
            np.testing.assert_allclose(np.asarray(seq_ratio)[r, m[r]], np.exp(np.mean((lp - old)[r, m[r]])), rtol=1e-6)
    tok_seq_ratio, _ = policy_ratio(bt["logp"], bt["old"], m, level="sequence_token")
    np.testing.assert_allclose(tok_seq_ratio, seq_ratio, rtol=1e-6)

    ratio_np = np.where(m, np.exp(lp - old), 0.0)
    loss, low, high, dual = clipped_surrogate(jnp.asarray(ratio_np, jnp.float32), jnp.asarray(a), 0.2, 0.28, 1.5)
    n_low = n_high = n_dual = 0
    for r in range(B):
        for t in range(T):
            x, adv = ratio_np[r, t], a[r, t]
            want = max(-adv * x, -adv * min(max(x, 0.8), 1.28))
            if adv < 0 and want > -1.5 * adv:
                want, n_dual = -1.5 * adv, n_dual + m[r, t]
            n_low += m[r, t] and adv < 0 and x < 0.8
            n_high += m[r, t] and adv > 0 and x > 1.28
            assert abs(float(loss[r, t]) - want) <= 1e-5 * (1 + abs(want)), (r, t)
    assert (np.sum(np.asarray(low) & m), np.sum(np.asarray(high) & m), np.sum(np.asarray(dual) & m)) == \
        (n_low, n_high, n_dual)
    assert n_low > 0 and n_high > 0 and n_dual > 0  # the batch exercises every branch

    roll = bt["roll"].astype(np.float64)
    w, trunc = tis_weights(np.where(m, bt["old"], 0), np.where(m, bt["roll"], 0), 2.0)
    np.testing.assert_allclose(np.asarray(w)[m], np.minimum(np.exp(old - roll), 2.0)[m], rtol=1e-6)
    assert (np.asarray(trunc)[m] == (np.exp(old - roll) > 2.0)[m]).all() and np.asarray(trunc)[m].any()
    u = lp - bt["ref"].astype(np.float64)
    want_kl = {"k1": u, "k2": 0.5 * u * u, "k3": np.exp(-u) + u - 1, "low_var_kl": np.exp(-u) + u - 1}
    for kind in KL_ESTIMATORS:
        np.testing.assert_allclose(np.asarray(kl_penalty(bt["logp"], bt["ref"], kind, None))[m], want_kl[kind][m],
                                   rtol=1e-5, atol=1e-6, err_msg=kind)
    np.testing.assert_allclose(kl_penalty(np.zeros(3), np.array([0.0, 30.0, -30.0]), "k3", 10.0),
                               [0.0, 10.0, 10.0])  # clamped at +-10 (verl low_var_kl)
    np.testing.assert_allclose(kl_penalty(np.zeros(2), np.array([-4.0, 4.0]), "k1", 1.5), [1.5, -1.5])


# ---------------------------------------------------------------- aggregation

def test_every_aggregation_mode_equals_its_definition_unpacked_and_packed():
    bt = _batch(3)
    x = np.where(bt["mask"], bt["logp"] * bt["ref"], np.nan).astype(np.float32)  # any per-token values
    per_seq = [x[r, cols].astype(np.float64) for r, cols in enumerate(_sequences(bt))]
    values = {}
    for mode in LOSS_AGG:
        num, den = aggregate(x, bt["mask"], None, mode, norm=12.0)
        values[mode] = float(num / den)
        np.testing.assert_allclose(values[mode], _ref_aggregate(per_seq, mode, 12.0), rtol=1e-6, err_msg=mode)
        seq_ids = np.where(bt["mask"], 7, 0)  # any id per row: a row is still one sequence
        np.testing.assert_allclose(np.asarray(aggregate(x, bt["mask"], seq_ids, mode, norm=12.0)), (num, den),
                                   rtol=1e-6)
    assert len(set(np.round(list(values.values()), 6))) == len(LOSS_AGG)  # the modes really differ
    packed = _pack(dict(bt, ref=np.where(bt["mask"], bt["logp"] * bt["ref"], np.nan)), 2 * T)
    for mode in LOSS_AGG:
        num, den = aggregate(packed["ref"], packed["mask"], packed["seq_ids"], mode, norm=12.0)
        np.testing.assert_allclose(float(num / den), values[mode], rtol=1e-6, err_msg=mode)
        if mode != "token-mean":  # ignoring the seq ids mixes the packed sequences
            num, den = aggregate(packed["ref"], packed["mask"], None, mode, norm=12.0)
            assert abs(float(num / den) - values[mode]) > 1e-3, mode
    with pytest.raises(ValueError, match=r"LOSS_AGG; known: \['seq-mean-token-mean', "):
        aggregate(x, bt["mask"], None, "sequence-mean")
    with pytest.raises(ValueError, match="norm"):
        aggregate(x, bt["mask"], None, "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- policy_loss per preset

@pytest.mark.parametrize("name", sorted(SPECS))
def test_policy_loss_value_gradient_and_metrics_equal_reference(name):
    spec, bt = SPECS[name], _batch(4)
    num, den, metrics = _loss(spec, bt)
    assert num.dtype == jnp.float32
    np.testing.assert_allclose(float(num / den), _ref_loss(spec, bt), rtol=2e-6, atol=1e-6)

    grad = _grad(spec, bt)
    assert np.isfinite(grad).all() and (grad[~bt["mask"]] == 0).all()
    np.testing.assert_allclose(grad, _ref_grad(spec, bt), rtol=1e-4, atol=1e-7)
    assert np.abs(grad).max() > 1e-4  # not everything clipped

    m, a = bt["mask"], np.broadcast_to(bt["adv"][:, None], bt["mask"].shape)
    ratio = np.exp(bt["logp"].astype(np.float64) - bt["old"])
    if spec.ratio_level != "token":
        ratio = np.stack([np.full(T, np.exp(np.mean(np.log(ratio[r, m[r]]))) if m[r].any() else 0) for r in range(B)])
    low = sum(1 for r, t in zip(*np.nonzero(m)) if a[r, t] < 0 and ratio[r, t] < 1 - spec.eps_low)
    high = sum(1 for r, t in zip(*np.nonzero(m)) if a[r, t] > 0 and ratio[r, t] > 1 + spec.eps_high)
    dual = 0 if spec.dual_clip is None else sum(
        1 for r, t in zip(*np.nonzero(m)) if a[r, t] < 0 and max(ratio[r, t], 1 - spec.eps_low) > spec.dual_clip)
    n_tok = m.sum()
    for key, count in (("clip_frac_low", low), ("clip_frac_high", high), ("dual_clip_frac", dual)):
        assert tuple(np.asarray(metrics[key])) == (count, n_tok), key
    values = finalize(metrics)
    np.testing.assert_allclose(values["ratio_mean"], ratio[m].mean(), rtol=1e-5)
    d = (bt["logp"].astype(np.float64) - bt["old"])[m]
    np.testing.assert_allclose(values["approx_kl"], np.mean(np.exp(d) - 1 - d), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(values["rollout_logp_abs_diff"], np.abs(bt["old"] - bt["roll"])[m].mean(), rtol=1e-5)
    pg_only = dataclasses.replace(spec, kl_beta=0.0)
    np.testing.assert_allclose(values["pg_loss"], _ref_loss(pg_only, bt), rtol=2e-6, atol=1e-6)
    if spec.tis_cap is not None:
        w = np.exp(bt["old"].astype(np.float64) - bt["roll"])[m]
        np.testing.assert_allclose(values["tis_weight_mean"], np.minimum(w, spec.tis_cap).mean(), rtol=1e-5)
        np.testing.assert_allclose(values["tis_trunc_frac"], np.mean(w > spec.tis_cap), rtol=1e-6)
        assert dual > 0 and 0 < values["tis_trunc_frac"] < 1
    else:
        assert "tis_weight_mean" not in metrics


@pytest.mark.parametrize("name", sorted(SPECS))
def test_micro_batches_and_packing_leave_loss_and_metrics_unchanged(name):
    spec, bt = SPECS[name], _batch(5)
    num, den, metrics = _loss(spec, bt)
    whole = float(num / den)
    for k in (2, 4):
        parts = [_loss(spec, _rows(bt, rows)) for rows in np.array_split(np.arange(B), [3] if k == 2 else k)]
        n, c = combine([p[:2] for p in parts])
        np.testing.assert_allclose(float(n / c), whole, rtol=1e-6, atol=1e-6, err_msg=f"{k} micro-batches")
        for key, value in finalize(combine([p[2] for p in parts])).items():
            np.testing.assert_allclose(value, finalize(metrics[key]), rtol=1e-6, atol=1e-6, err_msg=key)
        if k == 2 and spec.loss_agg != "token-mean":  # averaging per-micro-batch losses would not do
            assert abs(np.mean([float(p[0] / p[1]) for p in parts]) - whole) > 1e-4
    packed = _pack(bt, 2 * T)
    pn, pc, pm = _loss(spec, packed)
    np.testing.assert_allclose(float(pn / pc), whole, rtol=1e-6, atol=1e-6, err_msg="packed")
    for key, value in finalize(pm).items():
        np.testing.assert_allclose(value, finalize(metrics[key]), rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(_grad(spec, packed)[packed["mask"]], _grad(spec, bt)[bt["mask"]], rtol=1e-5, atol=1e-8)


def test_gspo_token_equals_gspo_for_sequence_advantages_and_differs_for_token_advantages():
    bt = _batch(8)
    gspo_tok = SPECS["gspo_token"]
    gspo_seq = dataclasses.replace(gspo_tok, ratio_level="sequence")
    np.testing.assert_allclose(_grad(gspo_tok, bt), _grad(gspo_seq, bt), rtol=1e-5, atol=1e-8)
    token_adv = dict(bt, adv=np.random.default_rng(9).normal(size=(B, T)).astype(np.float32))
    got = _grad(gspo_tok, token_adv)
    np.testing.assert_allclose(got, _ref_grad(gspo_tok, token_adv), rtol=1e-4, atol=1e-7)
    value = float(jnp.divide(*_loss(gspo_tok, token_adv)[:2]))
    np.testing.assert_allclose(value, _ref_loss(gspo_tok, token_adv), rtol=2e-6, atol=1e-6)
    assert np.abs(got - _grad(gspo_seq, token_adv)).max() > 1e-3


def test_bf16_inputs_are_computed_in_f32_and_jit_matches_eager():
    spec, bt = SPECS["grpo_dual_tis_k1"], _batch(6)
    low = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("logp", "old", "ref", "roll", "adv") else v)
           for k, v in bt.items()}
    up = {k: (np.asarray(v, np.float32) if k in ("logp", "old", "ref", "roll", "adv") else v) for k, v in low.items()}
    n16, c16, _ = _loss(spec, low)
    n32, c32, _ = _loss(spec, up)
    assert n16.dtype == jnp.float32
    np.testing.assert_allclose(float(n16 / c16), float(n32 / c32), rtol=1e-6)  # the same f32 math
    np.testing.assert_allclose(float(n16 / c16), _ref_loss(spec, bt), rtol=0.05, atol=0.02)  # bf16 tolerance
    jitted = jax.jit(policy_loss, static_argnames=("spec", "num_segments"))
    jn, jc, jm = jitted(spec, bt["logp"], bt["old"], bt["adv"], bt["mask"], ref_logp=bt["ref"],
                        rollout_logp=bt["roll"])
    en, ec, em = _loss(spec, bt)
    np.testing.assert_allclose(float(jn / jc), float(en / ec), rtol=1e-6)
    for key in em:
        np.testing.assert_allclose(finalize(jm[key]), finalize(em[key]), rtol=1e-6, atol=1e-7, err_msg=key)


def test_sharded_batch_gives_the_same_advantages_and_loss():
    """Rows over 8 devices: segment sums with static sizes need no gather in the user code."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows, cols = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    spec, bt = SPECS["gspo"], _batch(10)
    rewards, groups = np.arange(16, dtype=np.float32) % 3, np.arange(16) // 4
    adv = jax.jit(compute_advantages, static_argnums=(0, 3))("grpo", jax.device_put(rewards, rows),
                                                            jax.device_put(groups, rows), 4)
    np.testing.assert_allclose(adv, _ref_advantages("grpo", rewards, groups), rtol=1e-5, atol=1e-6)
    put = {k: jax.device_put(bt[k], cols if bt[k].ndim == 2 else rows)
           for k in ("logp", "old", "adv", "mask", "ref", "roll")}
    num, den, _ = jax.jit(policy_loss, static_argnums=0)(spec, put["logp"], put["old"], put["adv"], put["mask"],
                                                          ref_logp=put["ref"], rollout_logp=put["roll"])
    np.testing.assert_allclose(float(num / den), _ref_loss(spec, bt), rtol=2e-6, atol=1e-6)


def test_bad_names_and_missing_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match=r"ObjectiveSpec.loss_agg: 'mean' is not in LOSS_AGG; known: \["):
        ObjectiveSpec(loss_agg="mean")
    with pytest.raises(ValueError, match=r"KL_ESTIMATORS; known: \['k1', 'k2', 'k3', 'low_var_kl'\]"):
        ObjectiveSpec(kl_kind="k4")
    with pytest.raises(ValueError, match="ratio_level"):
        ObjectiveSpec(ratio_level="segment")
    with pytest.raises(ValueError, match="dual_clip"):
        ObjectiveSpec(dual_clip=0.5)
    with pytest.raises(ValueError, match=r"OBJECTIVES; known: \['dapo', 'dr_grpo', 'grpo', 'gspo'\]"):
        objective("ppo")
    bt = _batch(7, 2, 4)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(OBJECTIVES["grpo"], bt["logp"], bt["old"], bt["adv"], bt["mask"])
    with pytest.raises(ValueError, match="needs rollout_logp"):
        policy_loss(objective("dapo", tis_cap=2.0), bt["logp"], bt["old"], bt["adv"], bt["mask"])
    with pytest.raises(ValueError, match="token_sum_norm|norm"):
        policy_loss(OBJECTIVES["dr_grpo"], bt["logp"], bt["old"], bt["adv"], bt["mask"])
    assert isinstance(combine([SumCount(1.0, 2.0), SumCount(3.0, 4.0)]), SumCount)
    assert float(finalize(SumCount(jnp.float32(0.0), jnp.float32(0.0)))) == 0.0
