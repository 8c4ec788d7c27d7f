"""The expert-parallel MoE dispatch (glm5v_jax.layers.moe_expert_parallel) on 8 fake CPU
devices: exact against the dense reference (values and gradients), lowers to all-to-all,
falls back to ragged_dot without a mesh, drops (and the MoE layer reports) exactly the slots
past a bounded capacity, and trains the tiny VLM like one device does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.moe import MoE, get_moe_impl, route
from glm5v_jax.layers.moe_expert_parallel import expert_parallel_dispatch
from glm5v_jax.models.specs import BackboneSpec
from glm5v_jax.sharding.context import use_mesh_rules
from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
from glm5v_jax.sharding.partition import create_sharded, state_shardings
from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules
from glm5v_jax.train.parallel import MeshPlan, batch_shardings, global_batch, jit_step

from helpers import loss_step, sharded_muon_vlm, small_batch, small_spec

T, H, E, MLP, K = 32, 8, 8, 8, 2  # tokens, hidden, experts, expert width (I), experts per token


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    weights = jnp.asarray(rng.uniform(0.2, 1.0, (T, K)).astype(np.float32))
    return f(T, H), jnp.asarray(idx), weights, f(E, H, MLP) * 0.5, f(E, H, MLP) * 0.5, f(E, MLP, H) * 0.5


def _jit_impl(name):
    """A freshly traced jit of a dispatch: jit's trace cache is keyed on the function, not on the
    active `use_mesh_rules`, so a shared function object would reuse a trace made under another mesh."""
    fn = get_moe_impl(name)
    return jax.jit(lambda *a: fn(*a)[0])


def _value_and_grads(name):
    """jit of (impl(...) [T,H], its vjp with a fixed cotangent w.r.t. x, weights, gate, up, down)."""
    fn = get_moe_impl(name)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((T, H)).astype(np.float32))

    def value_and_grads(x, idx, weights, gate, up, down):
        out, vjp = jax.vjp(lambda x, w, g, u, d: fn(x, idx, w, g, u, d)[0], x, weights, gate, up, down)
        return out, vjp(ct)

    return jax.jit(value_and_grads)


def _mesh_rules(shape, **overrides):
    mesh = make_mesh(MeshSpec(shape=shape), jax.devices()[:8])
    return mesh, check_rules({**DEFAULT_RULES, **overrides}, mesh.axis_names)


@pytest.fixture(scope="module")
def reference():
    args = _inputs()
    return args, _value_and_grads("dense")(*args)


@pytest.mark.parametrize("shape,overrides", [
    ((1, 2, 1, 4), {}), ((1, 1, 2, 4), {}), ((2, 1, 1, 4), {}), ((1, 1, 1, 8), {}),
    ((1, 2, 1, 4), {"exp": ("fsdp", "expert")}),  # two mesh axes hold the experts (ep = 8)
])
def test_matches_dense_values_and_gradients(shape, overrides, reference):
    args, (want_out, want_grads) = reference
    mesh, rules = _mesh_rules(shape, **overrides)
    with use_mesh_rules(mesh, rules):
        fn = _value_and_grads("expert_parallel")
        compiled = fn.lower(*args).compile()
    assert "all-to-all" in compiled.as_text()
    got_out, got_grads = compiled(*args)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "weights", "gate", "up", "down"), got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_capacity_factor_drops_overflow_slots_in_order():
    """With C = ceil(f*S/ep), the slots past C per (device, destination) contribute zero."""
    args = _inputs()
    x, idx, w, g, u, d = args
    mesh, rules = _mesh_rules((1, 2, 1, 4))  # 8 token shards of 4 tokens, ep = 4, 2 experts per rank
    factor, n_shards, ep = 0.5, 8, 4
    capacity = int(np.ceil(factor * (T // n_shards) * K / ep))
    with use_mesh_rules(mesh, rules):
        y, dropped = jax.jit(lambda *a: expert_parallel_dispatch(*a, capacity_factor=factor))(*args)
    keep = _kept_slots(np.asarray(idx), n_shards, ep, capacity)
    assert int(dropped) == int((~keep).sum()) > 0
    want, _ = get_moe_impl("dense")(x, idx, jnp.where(keep, w, 0.0), g, u, d)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _kept_slots(idx, n_shards, ep, capacity):
    """[T, K] bool by hand: per token shard and destination expert rank, the first `capacity`
    slots in slot order (token-major, then k) are kept."""
    keep = np.ones(idx.shape, bool)
    for shard in np.split(np.arange(idx.shape[0]), n_shards):
        seen = np.zeros(ep, int)
        for t in shard:
            for j in range(idx.shape[1]):
                rank = int(idx[t, j]) // (E // ep)
                keep[t, j] = seen[rank] < capacity
                seen[rank] += 1
    return keep


def _moe_layer(impl, capacity_factor):
    """An MoE layer of the dispatch tests' sizes, random router, shared expert."""
    return MoE(H, MLP, E, K, impl=impl, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))


def _moe_forward(moe, x):
    """A fresh jit per call (see `_jit_impl`): (y, aux)."""
    return nnx.jit(lambda m, x: m(x))(moe, x)


@pytest.mark.parametrize("factor", [0.5, 0.0])
def test_moe_layer_reports_dropped_fraction(factor):
    """The MoE layer's aux `dropped_fraction` is the hand-counted share of the T*k slots past the
    capacity C = ceil(f*S/ep) (expert-parallel exchange); dropless (f = 0) reports 0."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, T // 4, H)).astype(np.float32))
    mesh, rules = _mesh_rules((1, 2, 1, 4))  # 8 token shards of 4 tokens, ep = 4
    n_shards, ep = 8, 4
    moe = _moe_layer("expert_parallel", factor)
    with use_mesh_rules(mesh, rules):
        _, aux = _moe_forward(moe, x)
    logits = x.reshape(T, H) @ moe.router[...]
    idx, _, _ = route(logits, moe.correction_bias[...], K, 1.0)
    capacity = int(np.ceil(factor * (T // n_shards) * K / ep)) if factor else T // n_shards * K
    want = float((~_kept_slots(np.asarray(idx), n_shards, ep, capacity)).sum()) / (T * K)
    assert (want > 0) == (factor > 0)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), want, rtol=1e-6)


def test_dispatch_without_an_exchange_drops_nothing():
    """A capacity factor bounds only the expert-parallel exchange: `ragged_dot` keeps every slot."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, T // 4, H)).astype(np.float32))
    _, aux = _moe_forward(_moe_layer("ragged_dot", 0.5), x)
    assert float(aux["dropped_fraction"]) == 0.0


def test_negative_capacity_factor_is_refused():
    with pytest.raises(ConfigError, match="capacity_factor"):
        _moe_layer("expert_parallel", -1.0)
    with pytest.raises(ConfigError, match="capacity_factor"):
        BackboneSpec(capacity_factor=-0.5)


def test_falls_back_to_ragged_dot_without_a_mesh():
    args = _inputs()
    got = _jit_impl("expert_parallel")(*args)
    want = _jit_impl("ragged_dot")(*args)
    np.testing.assert_array_equal(got, want)


def test_activation_batch_without_expert_axis_is_refused():
    mesh, rules = _mesh_rules((1, 2, 1, 4), activation_batch=("data", "fsdp"))
    with use_mesh_rules(mesh, rules), pytest.raises(ValueError, match=r"config\.mesh\.rules\.activation_batch"):
        _jit_impl("expert_parallel")(*_inputs())


def test_indivisible_tokens_are_refused():
    x, idx, w, g, u, d = _inputs()
    mesh, rules = _mesh_rules((1, 2, 1, 4))
    with use_mesh_rules(mesh, rules), pytest.raises(ValueError, match="not divisible"):
        _jit_impl("expert_parallel")(x[:12], idx[:12], w[:12], g, u, d)


# --- the tiny VLM, trained sharded with the expert-parallel dispatch ---------------------------------

STEPS = 3


def _vlm_losses(shape, moe_impl, init_state=None):
    """(losses of STEPS train steps of the tiny VLM on a mesh, initial state), following
    test_sharded_training._setup; `init_state` (a one-device initial state) is put onto the
    mesh instead of creating it again, which saves an init compile per mesh."""
    n = int(np.prod(shape))
    mesh = make_mesh(MeshSpec(shape=shape), jax.devices()[:n])
    rules = check_rules(DEFAULT_RULES, mesh.axis_names)
    make, shardings = sharded_muon_vlm(small_spec(trunk="isolate_vision", moe_impl=moe_impl), mesh, rules)
    if init_state is None:
        graphdef, state, state_sh = create_sharded(make, mesh, shardings)
    else:
        graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
        assert jax.tree.structure(abstract_state) == jax.tree.structure(init_state)
        state_sh = state_shardings(abstract_state, mesh, shardings)
        state = jax.device_put(init_state, state_sh)
    plan = MeshPlan(mesh, rules)
    host_batch = jax.tree.map(np.asarray, small_batch(rows=8))
    batch_sh = batch_shardings(host_batch, plan)
    batch = global_batch(host_batch, batch_sh)
    # Traced under the mesh rules (the dispatch reads the mesh from them). No donation: the
    # initial state is returned to seed the other meshes.
    jitted = jit_step(loss_step(graphdef), plan, state_sh, batch_sh, donate=False)
    losses, first = [], state
    for _ in range(STEPS):
        state, loss = jitted(state, batch)
        losses.append(float(loss))
    return losses, first


@pytest.fixture(scope="module")
def vlm_reference():
    return _vlm_losses((1, 1, 1, 1), "ragged_dot")


@pytest.mark.parametrize("shape", [(1, 2, 1, 4), (1, 1, 2, 4)])
def test_vlm_trains_like_one_device(shape, vlm_reference):
    want, init_state = vlm_reference
    losses, _ = _vlm_losses(shape, "expert_parallel", init_state)
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
