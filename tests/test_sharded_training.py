"""The tiny VLM trains on 8 fake CPU devices under several (data, fsdp, tensor, expert)
meshes with the same losses as on one device, its state created sharded per the rules."""
import jax
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.muon import muon
from glm5v_jax.optim.routing import route
from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
from glm5v_jax.sharding.partition import bytes_per_device, create_sharded
from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules, parameter_shardings
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.train.parallel import MeshPlan, batch_shardings, global_batch, jit_step

from helpers import loss_step, sharded_muon_vlm, small_batch, small_spec

STEPS = 3


def _setup(shape, devices):
    """(state, state shardings, jitted train step, batch, parameter shardings) on a mesh."""
    mesh = make_mesh(MeshSpec(shape=shape), devices)
    rules = check_rules(DEFAULT_RULES, mesh.axis_names)
    make, shardings = sharded_muon_vlm(small_spec(trunk="isolate_vision"), mesh, rules)
    graphdef, state, state_sh = create_sharded(make, mesh, shardings)
    plan = MeshPlan(mesh, rules)
    host_batch = jax.tree.map(np.asarray, small_batch(rows=8))
    batch_sh = batch_shardings(host_batch, plan)  # leading dims (rows, image slots) over the batch axes
    batch = global_batch(host_batch, batch_sh)

    # Traced under the mesh rules: activations carry their logical shardings.
    jitted = jit_step(loss_step(graphdef), plan, state_sh, batch_sh)
    return state, state_sh, jitted, batch, shardings


def _losses(shape, devices):
    state, _, jitted, batch, shardings = _setup(shape, devices)
    losses = []
    for _ in range(STEPS):
        state, loss = jitted(state, batch)
        losses.append(float(loss))
    return losses, state, shardings


@pytest.fixture(scope="module")
def reference():
    return _losses((1, 1, 1, 1), jax.devices()[:1])[0]


# data, fsdp, tensor and expert each appear at size > 1; pure data parallelism (8,1,1,1) is the
# data axis of (2,4,1,1) and (2,2,2,1) alone, and left out to save the suite a compile
@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4), (1, 1, 2, 4)])
def test_same_losses_as_one_device(shape, reference):
    losses, state, shardings = _losses(shape, jax.devices()[:8])
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]
    params = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(state[0])}
    for path, sharding in shardings.items():
        leaf = params[path][...]
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (path, leaf.sharding, sharding)


def test_fsdp_bytes_per_device_fall_as_one_over_n():
    spec = small_spec()
    per_n = {}
    for n in (1, 2, 4, 8):
        mesh = make_mesh(MeshSpec(shape=(1, n, 1, 1)), jax.devices()[:n])
        rules = check_rules(DEFAULT_RULES, mesh.axis_names)
        abstract = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))
        shardings = parameter_shardings(abstract, mesh, rules)
        table = route(abstract)

        def make():
            model = GLM5V(spec, rngs=nnx.Rngs(0))
            return model, nnx.Optimizer(model, muon(0.02, table), wrt=nnx.Param)

        _, state, _ = create_sharded(make, mesh, shardings)
        per_device = bytes_per_device(state)
        assert len(per_device) == n
        per_n[n] = max(per_device.values())
    for n in (2, 4, 8):  # replicated norms, biases and counters keep it slightly above 1/N
        assert 1 / n <= per_n[n] / per_n[1] < 1.15 / n, per_n


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    state, _, step_a, batch_a, _ = _setup((2, 4, 1, 1), jax.devices()[:8])
    for _ in range(2):
        state, _ = step_a(state, batch_a)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(2, state, {}, {"note": "mesh (2,4,1,1)"}, force=True)
    ckpt.close()
    _, loss_a = step_a(state, batch_a)

    fresh, state_sh_b, step_b, batch_b, shardings_b = _setup((1, 2, 2, 2), jax.devices()[:8])
    reader = Checkpointer(tmp_path / "ckpt", async_save=False)
    step, restored, _, config = reader.restore_latest(fresh)[:4]  # fresh: the target structure and shardings
    reader.close()
    assert step == 2 and config["note"] == "mesh (2,4,1,1)"
    params = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(restored[0])}
    for path, sharding in shardings_b.items():
        leaf = params[path][...]
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), path
    _, loss_b = step_b(restored, batch_b)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
