"""Tests for the GLM MoE layer (glm5v_jax.layers.moe): routing, dispatch, load, bias balancing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.layers.mlp import SwiGLU
from glm5v_jax.layers.moe import MoE, route, sequence_balance_loss, update_router_bias


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_topk(values, k):
    """Indices of the k largest values per row, largest first."""
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def _np_swiglu(x, gate, up, down):
    a = x @ gate
    return (a * _sigmoid(a)) * (x @ up) @ down


def _np_moe(moe, x, replay=None):
    """Independent NumPy forward of MoE: unbiased combine weights, biased selection (or the experts of
    `replay` [T, k] where a row has no -1)."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    scores = _sigmoid(flat @ p(moe.router))
    idx = _np_topk(scores + p(moe.correction_bias), moe.top_k)
    if replay is not None:
        idx = np.where((replay >= 0).all(-1, keepdims=True), replay, idx)
    chosen = np.take_along_axis(scores, idx, -1)
    w = chosen / chosen.sum(-1, keepdims=True) * moe.routed_scaling
    y = np.zeros_like(flat)
    gate, up, down = p(moe.gate), p(moe.up), p(moe.down)
    for t in range(flat.shape[0]):
        for j in range(moe.top_k):
            e = idx[t, j]
            y[t] += w[t, j] * _np_swiglu(flat[t], gate[e], up[e], down[e])
    if moe.shared is not None:
        y += _np_swiglu(flat, p(moe.shared.gate), p(moe.shared.up), p(moe.shared.down))
    return y.reshape(x.shape), idx, w


def _build(make, rng, std):
    """Module from `make()` with every nnx.Param drawn from N(0, std) in NumPy (biases zero).

    Built abstractly (nnx.eval_shape) and filled in, which skips the per-shape compiles
    of eager initialisation; init_std 0.02 would make the outputs tiny anyway.
    """
    module = nnx.eval_shape(make)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(rng.standard_normal(var.shape).astype(np.float32) * std))
        elif isinstance(var, nnx.Variable):
            var.set_value(jnp.zeros(var.shape, var.dtype))
    return module


@nnx.jit
def _forward(moe, x, token_mask=None):
    return moe(x, token_mask)


def test_route_selects_with_bias_and_weights_without():
    """route: top-k of sigmoid(logits)+bias picks experts; weights use the unbiased scores."""
    rng = np.random.default_rng(0)
    t, e, k, scaling = 16, 6, 2, 2.5
    logits = rng.standard_normal((t, e)).astype(np.float32) * 2
    bias = np.array([0.0, 0.0, 0.0, 0.0, 0.45, 0.6], np.float32)
    idx, weights, scores = route(jnp.asarray(logits), jnp.asarray(bias), k, scaling)
    idx, weights, scores = np.asarray(idx), np.asarray(weights), np.asarray(scores)
    s = _sigmoid(logits.astype(np.float64))
    want_idx = _np_topk(s + bias, k)
    # Precondition: the bias changes the selection for some tokens.
    unbiased = _np_topk(s, k)
    assert np.any(np.sort(want_idx, -1) != np.sort(unbiased, -1))
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(want_idx, -1))
    np.testing.assert_allclose(scores, s, rtol=1e-6)
    chosen = np.take_along_axis(s, idx, -1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True) * scaling, rtol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), scaling, rtol=1e-5)
    # The biased scores would give other weights: the check tells the two apart.
    chosen_b = np.take_along_axis(s + bias, idx, -1)
    assert not np.allclose(weights, chosen_b / chosen_b.sum(-1, keepdims=True) * scaling, rtol=1e-3)


@pytest.mark.parametrize("impl", ["dense", "ragged_dot"])
def test_single_expert_moe_equals_swiglu(impl):
    """E=1, k=1, no shared expert, scaling 1: MoE equals a SwiGLU with the expert's weights."""
    rng = np.random.default_rng(1)
    moe = _build(lambda: MoE(8, 12, 1, 1, num_shared_experts=0, routed_scaling=1.0, impl=impl,
                             rngs=nnx.Rngs(0)), rng, 0.4)
    mlp = _build(lambda: SwiGLU(8, 12, rngs=nnx.Rngs(1)), rng, 1.0)
    mlp.gate[...] = moe.gate[...][0]
    mlp.up[...] = moe.up[...][0]
    mlp.down[...] = moe.down[...][0]
    x = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
    y, aux = _forward(moe, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(nnx.jit(lambda m, v: m(v))(mlp, x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), [10.0])


def _loss(moe, x, r):
    y, aux = moe(x)
    return jnp.sum(y * r) + aux["balance_loss"], y


def test_dense_and_ragged_dot_agree_in_value_and_grad():
    """E=8 top-2 with a shared expert: dense and ragged_dot give equal outputs and gradients,
    and both match an independent NumPy forward."""
    rng = np.random.default_rng(2)
    moe = _build(lambda: MoE(8, 6, 8, 2, num_shared_experts=1, routed_scaling=1.7, impl="dense",
                             rngs=nnx.Rngs(0)), rng, 0.4)
    moe.correction_bias[...] = jnp.asarray(rng.standard_normal(8).astype(np.float32) * 0.1)
    x_np = rng.standard_normal((2, 6, 8)).astype(np.float32)
    x = jnp.asarray(x_np)
    r = jnp.asarray(rng.standard_normal((2, 6, 8)).astype(np.float32))

    ref, _, _ = _np_moe(moe, x_np)
    results = {}
    for impl in ("dense", "ragged_dot"):
        moe.impl = impl
        # One jit per impl: value, aux and gradients w.r.t. every nnx.Param.
        (_, y), grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))(moe, x, r)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
        results[impl] = (np.asarray(y), jax.tree.map(np.asarray, nnx.to_pure_dict(grads)))
    y_d, g_d = results["dense"]
    y_r, g_r = results["ragged_dot"]
    np.testing.assert_allclose(y_r, y_d, rtol=1e-5, atol=1e-5)
    flat_d = dict(jax.tree_util.tree_leaves_with_path(g_d))
    flat_r = dict(jax.tree_util.tree_leaves_with_path(g_r))
    assert flat_d.keys() == flat_r.keys()
    names = {jax.tree_util.keystr(p) for p in flat_d}
    assert any("router" in n for n in names) and any("down" in n for n in names)
    assert not any("correction_bias" in n for n in names)  # not an nnx.Param
    for path, gd in flat_d.items():
        assert np.any(gd != 0), jax.tree_util.keystr(path)
        np.testing.assert_allclose(flat_r[path], gd, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_expert_load_excludes_masked_tokens():
    """expert_load counts only unmasked tokens' slots and sums to k * unmasked tokens."""
    rng = np.random.default_rng(3)
    e, k = 8, 3
    moe = _build(lambda: MoE(8, 4, e, k, num_shared_experts=0, impl="dense", rngs=nnx.Rngs(0)),
                 rng, 0.5)
    x_np = rng.standard_normal((2, 7, 8)).astype(np.float32)
    mask = np.ones((2, 7), bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    _, aux = _forward(moe, jnp.asarray(x_np), jnp.asarray(mask))
    load = np.asarray(aux["expert_load"])
    _, idx, _ = _np_moe(moe, x_np)
    want = np.bincount(idx.reshape(2, 7, k)[mask].ravel(), minlength=e)
    np.testing.assert_array_equal(load, want)
    assert load.sum() == k * mask.sum()
    _, aux_all = _forward(moe, jnp.asarray(x_np), jnp.ones((2, 7), bool))
    np.testing.assert_array_equal(np.asarray(aux_all["expert_load"]),
                                  np.bincount(idx.ravel(), minlength=e))


def test_bias_balancing_reduces_imbalance():
    """update_router_bias on a skewed router spreads the load; combine weights stay unbiased."""
    rng = np.random.default_rng(4)
    e, k, d = 8, 2, 8
    moe = _build(lambda: MoE(d, 4, e, k, num_shared_experts=0, impl="dense", rngs=nnx.Rngs(0)),
                 rng, 0.3)
    router = rng.standard_normal((d, e)).astype(np.float32) * 0.5
    router[0, :2] += 3.0  # feature 0 is a constant 1: experts 0 and 1 get most tokens
    moe.router[...] = jnp.asarray(router)
    x_np = rng.standard_normal((4, 16, d)).astype(np.float32)
    x_np[..., 0] = 1.0
    x = jnp.asarray(x_np)

    def load_fn(m, xs):
        return _forward(m, xs)[1]["expert_load"]

    def imbalance(load):
        return float(load.max() / load.mean())

    load0 = np.asarray(load_fn(moe, x))
    initial = imbalance(load0)
    assert initial > 3.0  # skewed: experts 0 and 1 take most of the 128 slots
    rate = 0.01
    history = []
    for _ in range(200):
        load = load_fn(moe, x)
        history.append(imbalance(np.asarray(load)))
        moe.correction_bias[...] = update_router_bias(moe.correction_bias[...], load, rate)
    final = np.mean(history[-20:])
    assert final < initial / 2, (initial, history[-20:])
    bias = np.asarray(moe.correction_bias[...])
    assert bias[:2].max() < bias[2:].min()  # overloaded experts were pushed down

    # Combine weights come from the unbiased scores even with a large bias.
    y, _ = _forward(moe, x)
    ref, idx, w = _np_moe(moe, x_np)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    logits = x_np.reshape(-1, d).astype(np.float64) @ router
    j_idx, j_w, _ = route(jnp.asarray(logits, jnp.float32), moe.correction_bias[...], k, 1.0)
    j_idx, j_w = np.asarray(j_idx), np.asarray(j_w)
    np.testing.assert_array_equal(np.sort(j_idx, -1), np.sort(idx, -1))
    scores = _sigmoid(logits)
    chosen = np.take_along_axis(scores, j_idx, -1)
    np.testing.assert_allclose(j_w, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
    chosen_b = np.take_along_axis(scores + bias, j_idx, -1)
    assert not np.allclose(j_w, chosen_b / chosen_b.sum(-1, keepdims=True), rtol=1e-3)


def test_sequence_balance_loss_golden_by_hand():
    """E=4, k=2, one row of 2 counted tokens plus 1 padding token (DeepSeek-V3 eq. 17-20):
    top-2 of t0 = {0, 1}, of t1 = {1, 2}, so f = E/(k T) * counts = [1, 2, 1, 0];
    P = mean of s/sum(s) = [111/420, 307/840, 93/420, ...]; L = sum f P = 511/420."""
    scores = jnp.asarray([[[0.9, 0.8, 0.3, 0.1],
                           [0.2, 0.7, 0.6, 0.5],
                           [0.9, 0.05, 0.9, 0.9]]], jnp.float32)  # the padding token
    mask = jnp.asarray([[True, True, False]])
    np.testing.assert_allclose(float(sequence_balance_loss(scores, mask, 2)), 511 / 420, rtol=1e-6)
    # Rows are sequences: the loss is the mean of the rows' losses.
    row2 = jnp.asarray([[[0.5, 0.5 + 1e-3, 0.1, 0.2]] * 3], jnp.float32)  # always experts 1, 0
    two = sequence_balance_loss(jnp.concatenate([scores, row2]), jnp.concatenate([mask, jnp.ones((1, 3), bool)]), 2)
    l2 = 2 * (0.5 + 0.501) / 1.301  # f = [2, 2, 0, 0], P = s / sum(s)
    np.testing.assert_allclose(float(two), (511 / 420 + l2) / 2, rtol=1e-5)


def _np_balance(scores, mask, k, selection):
    """NumPy reference: f from the given selection scores' top-k, P from the normalised scores."""
    b, s, e = scores.shape
    flat_sel = _np_topk(selection.reshape(b * s, e), k).reshape(b, s, k)
    counts = np.zeros((b, e))
    for i in range(b):
        for t in range(s):
            if mask[i, t]:
                counts[i, flat_sel[i, t]] += 1
    n = np.maximum(mask.sum(-1), 1)[:, None]
    f = counts * e / (k * n)
    p = ((scores / scores.sum(-1, keepdims=True)) * mask[..., None]).sum(1) / n
    return float(np.mean(np.sum(f * p, -1)))


def test_correction_bias_does_not_change_the_balance_loss():
    """The balance loss's indicator is the top-k of the *un-biased* scores (DeepSeek-V3):
    a correction bias that changes which experts tokens are routed to (expert_load moves)
    leaves the balance loss unchanged, and it matches the NumPy reference built from the
    un-biased top-k, not the one built from the biased selection."""
    rng = np.random.default_rng(5)
    e, k, d = 6, 2, 8
    moe = _build(lambda: MoE(d, 4, e, k, num_shared_experts=0, impl="dense", rngs=nnx.Rngs(0)), rng, 0.5)
    x_np = rng.standard_normal((2, 9, d)).astype(np.float32)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    x, m = jnp.asarray(x_np), jnp.asarray(mask)
    _, aux0 = _forward(moe, x, m)
    bias = np.array([0.0, 0.0, 0.0, 0.0, 0.4, 0.8], np.float32)
    moe.correction_bias[...] = jnp.asarray(bias)
    _, aux1 = _forward(moe, x, m)
    # Precondition: the bias changes the routing.
    assert not np.array_equal(np.asarray(aux0["expert_load"]), np.asarray(aux1["expert_load"]))
    assert float(aux1["balance_loss"]) == float(aux0["balance_loss"])
    scores = _sigmoid(x_np.reshape(-1, d).astype(np.float64) @ np.asarray(moe.router[...], np.float64))
    scores = scores.reshape(2, 9, e)
    want = _np_balance(scores, mask, k, scores)
    np.testing.assert_allclose(float(aux1["balance_loss"]), want, rtol=1e-5)
    biased = _np_balance(scores, mask, k, scores + bias)
    assert abs(biased - want) > 1e-3  # the check tells the two indicators apart


@pytest.mark.parametrize("impl", ["dense", "ragged_dot"])
def test_routing_replay_routes_to_the_given_experts(impl):
    """replay_ids: each token goes to the given experts (a row with -1 keeps the router's own choice), with
    combine weights from this router's scores at them (NumPy reference); the router still gets a gradient;
    replaying the layer's own choice changes nothing; expert_load counts the replayed experts."""
    rng = np.random.default_rng(3)
    e, k = 6, 2
    moe = _build(lambda: MoE(8, 12, e, k, num_shared_experts=1, routed_scaling=2.0, impl=impl,
                             rngs=nnx.Rngs(0)), rng, 0.4)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)).astype(np.float32))
    replay = np.stack([rng.permutation(e)[:k] for _ in range(10)]).astype(np.int32)
    replay[3] = -1  # no record: routed by the layer
    _, own, _ = _np_moe(moe, np.asarray(x))
    assert (np.sort(replay[replay[:, 0] >= 0], -1) != np.sort(own[replay[:, 0] >= 0], -1)).any()

    run = nnx.jit(lambda m, v, ids: m(v, replay_ids=ids, return_expert_ids=True))
    y, aux = run(moe, x, jnp.asarray(replay).reshape(2, 5, k))
    want, idx, _ = _np_moe(moe, np.asarray(x), replay)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["expert_ids"]).reshape(10, k), idx)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), np.bincount(idx.ravel(), minlength=e))

    same, _ = run(moe, x, jnp.asarray(own, jnp.int32).reshape(2, 5, k))
    np.testing.assert_allclose(np.asarray(same), np.asarray(_forward(moe, x)[0]), rtol=1e-6, atol=1e-7)

    grad = nnx.grad(lambda m: jnp.sum(m(x, replay_ids=jnp.asarray(replay).reshape(2, 5, k))[0] ** 2))(moe)
    assert float(jnp.abs(grad.router[...]).sum()) > 0
