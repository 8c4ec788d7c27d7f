"""The tiny VLM trains with the Pallas kernels (`attention_impl="pallas"`, `moe_impl="pallas"`,
interpreted on CPU) with the same losses as the reference paths (`xla`, `ragged_dot`): on one
device, and on a mesh, where the kernels run per device inside `shard_map`."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.sharding.mesh import MeshSpec, make_mesh
from glm5v_jax.sharding.partition import create_sharded
from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules
from glm5v_jax.train.parallel import MeshPlan, batch_shardings, global_batch, jit_step

from helpers import loss_step, sharded_muon_vlm, small_batch, small_spec

STEPS = 3


def _spec(attention_impl: str, moe_impl: str):
    spec = small_spec(trunk="isolate_vision", moe_impl=moe_impl)
    return dataclasses.replace(
        spec, vision=dataclasses.replace(spec.vision, attention_impl=attention_impl),
        backbone=dataclasses.replace(spec.backbone, attention_impl=attention_impl))


def _losses(shape, attention_impl, moe_impl):
    n = int(np.prod(shape))
    mesh = make_mesh(MeshSpec(shape=shape), jax.devices()[:n])
    rules = check_rules(DEFAULT_RULES, mesh.axis_names)
    make, shardings = sharded_muon_vlm(_spec(attention_impl, moe_impl), mesh, rules)
    graphdef, state, state_sh = create_sharded(make, mesh, shardings)
    plan = MeshPlan(mesh, rules)
    host_batch = jax.tree.map(np.asarray, small_batch(rows=8))
    batch_sh = batch_shardings(host_batch, plan)
    batch = global_batch(host_batch, batch_sh)
    jitted = jit_step(loss_step(graphdef), plan, state_sh, batch_sh)
    losses = []
    for _ in range(STEPS):
        state, loss = jitted(state, batch)
        losses.append(float(loss))
    return losses


@pytest.fixture(scope="module")
def reference():
    return _losses((1, 1, 1, 1), "xla", "ragged_dot")


# One device, and a mesh with heads split over `tensor` (attention in shard_map) and experts over
# `expert` (the expert-parallel all_to_all dispatch with the kernel as its local matmul).
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 2, 4)])
def test_pallas_kernels_train_like_the_reference(shape, reference):
    losses = _losses(shape, "pallas", "pallas")
    np.testing.assert_allclose(losses, reference, rtol=2e-5, atol=2e-5)
    assert losses[-1] < losses[0]


def test_cudnn_impl_falls_back_to_xla_off_gpu():
    from glm5v_jax.layers.attention import get_attention_impl

    assert jax.default_backend() != "gpu"
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 16, 4, 8)).astype(np.float32)
    seg = np.array([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16])
    kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, scale=0.3)
    np.testing.assert_array_equal(get_attention_impl("cudnn")(q, k, k, **kw), get_attention_impl("xla")(q, k, k, **kw))


def test_unknown_impl_names_the_config_field():
    from configs.vlm_pretrain import get_config
    from glm5v_jax.errors import ConfigError
    from glm5v_jax.models.build import vlm_spec_from_config

    with pytest.raises(ConfigError, match=r"config.model.attention_impl: unknown implementation 'flash'"):
        vlm_spec_from_config(get_config("tiny,attention_impl=flash").model)
    with pytest.raises(ConfigError, match=r"config.model.moe_impl: unknown .*'megablox'.*'pallas'"):
        vlm_spec_from_config(get_config("tiny,moe_impl=megablox").model)
    spec = vlm_spec_from_config(get_config("tiny,attention_impl=pallas,moe_impl=pallas").model)
    assert (spec.vision.attention_impl, spec.backbone.attention_impl, spec.backbone.moe_impl) == ("pallas",) * 3


def test_train_step_lowers_to_mosaic_kernels_for_tpu():
    """The loss gradient of the tiny VLM, lowered for TPU from this CPU host, holds the Mosaic
    kernels (not the interpreter): 3 flash calls (forward, dq, dk/dv) per attention site (CogViT,
    the dense and MoE layer stacks, the MTP block) and 9 gmm calls (3 forward, 3 dlhs, 3 tgmm)
    per MoE stack."""
    from glm5v_jax.models.vlm import GLM5V
    from glm5v_jax.train.step import loss_and_outputs

    from helpers import lower_text

    graphdef, params = nnx.split(GLM5V(_spec("pallas", "pallas"), rngs=nnx.Rngs(0)))

    def grads(params, batch):
        return jax.grad(lambda p: loss_and_outputs(nnx.merge(graphdef, p), batch, 0.3, 0.0)[0])(params)

    text = lower_text(grads, (params, small_batch(rows=2)), "tpu")
    assert text.count("tpu_custom_call") >= 3 * 4 + 9, text.count("tpu_custom_call")
