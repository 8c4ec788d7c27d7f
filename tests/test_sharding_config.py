"""Mesh from config, logical rules, and the checks run before compiling (each bad case
refused with the config field named). Abstract models only: nothing is compiled."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.errors import ConfigError
from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.sharding.checks import check_batch, check_divisibility, check_replication, replicated_fraction
from glm5v_jax.sharding.mesh import MeshSpec, make_mesh, resolve_shape
from glm5v_jax.sharding.rules import DEFAULT_RULES, check_rules, logical_to_spec, parameter_specs

from helpers import config_module, small_spec


@pytest.fixture(scope="module")
def model():
    return nnx.eval_shape(lambda: GLM5V(small_spec(), rngs=nnx.Rngs(0)))


def _mesh(shape):
    return make_mesh(MeshSpec(shape=shape), jax.devices()[:8])


def _rules(mesh, **overrides):
    return check_rules({**DEFAULT_RULES, **overrides}, mesh.axis_names)


def test_resolve_shape_fills_minus_one_and_refuses_bad_shapes():
    assert resolve_shape((1, -1, 2, 1), 8) == (1, 4, 2, 1)
    assert resolve_shape((2, 2, 2, 1), 8) == (2, 2, 2, 1)
    for bad, match in [((2, 2, 1, 1), "has 4 devices but 8"), ((-1, -1, 1, 1), "at most one axis may be -1"),
                       ((3, -1, 1, 1), "do not divide"), ((0, 8, 1, 1), "positive")]:
        with pytest.raises(ConfigError, match=match) as e:
            resolve_shape(bad, 8)
        assert e.value.field == "config.mesh.shape"


def test_mesh_axes_and_sizes():
    mesh = _mesh((2, -1, 2, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_rule_naming_an_unknown_axis_is_refused():
    with pytest.raises(ConfigError, match="mesh axis 'model'") as e:
        check_rules({**DEFAULT_RULES, "mlp": "model"}, ("data", "fsdp", "tensor", "expert"))
    assert e.value.field == "config.mesh.rules.mlp"


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = check_rules({"a": ("fsdp", "tensor"), "b": "tensor", "c": None}, ("fsdp", "tensor"))
    assert logical_to_spec(("a", "b", "c"), rules) == P(("fsdp", "tensor"), None, None)
    assert logical_to_spec(("b", "a"), rules) == P("tensor", "fsdp")
    with pytest.raises(ConfigError, match="logical axis 'z'"):
        logical_to_spec(("z",), rules)


def test_parameter_specs_follow_the_rules(model):
    mesh = _mesh((1, 2, 2, 2))
    specs = parameter_specs(model, _rules(mesh))
    assert specs[("backbone", "dense_layers", "attn", "q")] == P(None, ("fsdp", "expert"), "tensor", None)
    # the expert axis goes to the experts; embed keeps what is left of its axes
    assert specs[("backbone", "moe_layers", "mlp", "gate")] == P(None, "expert", "fsdp", "tensor")
    assert specs[("backbone", "embed")] == P("tensor", ("fsdp", "expert"))
    assert specs[("mtp", "depths", "0", "eh_proj")] == P("tensor", ("fsdp", "expert"))


@pytest.mark.parametrize("field, shape, change, rules", [
    ("config.model.backbone.num_kv_heads", (1, 1, 4, 2), {}, {}),  # 2 KV heads over tensor=4
    ("config.model.backbone.num_experts", (1, 1, 1, 8), {}, {}),  # 4 experts over expert=8
    ("config.model.backbone.vocab_size", (1, 1, 8, 1), {"vocab_size": 132},
     {"heads": None, "kv_heads": None, "mlp": None}),  # 132 over tensor=8
])
def test_indivisible_sizes_are_refused_naming_the_field(field, shape, change, rules):
    spec = small_spec()
    if change:
        spec = dataclasses.replace(spec, backbone=dataclasses.replace(spec.backbone, **change))
    model = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))
    mesh = _mesh(shape)
    with pytest.raises(ConfigError) as e:
        check_divisibility(model, mesh, _rules(mesh, **rules))
    assert e.value.field == field, str(e.value)


def test_heads_over_tensor_axis(model):
    mesh = _mesh((1, 1, 8, 1))  # 4 query heads over tensor=8
    with pytest.raises(ConfigError) as e:
        check_divisibility(model, mesh, _rules(mesh, kv_heads=None, vocab=None, mlp=None))
    assert e.value.field in ("config.model.backbone.num_heads", "config.model.vision.num_heads")


def test_batch_must_divide_the_data_axes():
    mesh = _mesh((2, 4, 1, 1))
    check_batch(16, mesh, _rules(mesh))
    with pytest.raises(ConfigError, match="12 rows") as e:
        check_batch(12, mesh, _rules(mesh))
    assert e.value.field == "config.data.batch_size"


def test_replication_check_lists_offenders_and_can_warn(model):
    mesh = _mesh((1, 8, 1, 1))
    assert check_replication(model, mesh, _rules(mesh)) < 0.02  # FSDP rules shard (almost) everything
    no_fsdp = _rules(mesh, embed=None, mtp_concat=None)
    frac, offenders = replicated_fraction(model, mesh, no_fsdp)
    assert frac > 0.5 and offenders[0][0] >= offenders[-1][0]
    with pytest.raises(ConfigError, match="replicated over a mesh axis.*Largest: ") as e:
        check_replication(model, mesh, no_fsdp)
    assert e.value.field == "config.mesh.replication_tolerance"
    with pytest.warns(UserWarning, match="replicated"):
        check_replication(model, mesh, no_fsdp, action="warn")
    data_only = _mesh((8, 1, 1, 1))  # pure data parallelism replicates by design
    assert check_replication(model, data_only, _rules(data_only)) == 0.0


def test_mesh_and_rules_from_config():
    import ml_collections

    from glm5v_jax.sharding.mesh import mesh_spec_from_config
    from glm5v_jax.sharding.rules import rules_from_config

    cfg = ml_collections.ConfigDict({"shape": (2, -1, 1, 1), "rules": {"mlp": ["tensor", "fsdp"], "vocab": None}})
    spec = mesh_spec_from_config(cfg)
    assert spec.shape == (2, -1, 1, 1) and spec.dcn_shape is None
    mesh = make_mesh(spec, jax.devices()[:8])
    rules = rules_from_config(cfg, mesh.axis_names)
    assert rules["mlp"] == ("tensor", "fsdp") and rules["vocab"] == () and rules["embed"] == ("fsdp", "expert")
    with pytest.raises(ConfigError) as e:
        mesh_spec_from_config(ml_collections.ConfigDict({"shape": (2, 4)}))
    assert e.value.field == "config.mesh.shape"
    with pytest.raises(ConfigError) as e:
        rules_from_config(ml_collections.ConfigDict({"shape": (8, 1, 1, 1), "rules": {"heads": "model"}}),
                          mesh.axis_names)
    assert e.value.field == "config.mesh.rules.heads"


def test_activation_constraints_follow_the_rules_and_are_identity_outside():
    from glm5v_jax.sharding.context import RESIDUAL, active, constrain, logical_sharding, use_mesh_rules

    mesh = _mesh((2, 2, 2, 1))
    rules = _rules(mesh)
    x = jnp.ones((8, 6, 4))
    assert active() is None and constrain(x, RESIDUAL) is x
    with use_mesh_rules(mesh, rules):
        y = jax.jit(lambda v: constrain(v * 2, RESIDUAL))(x)
        # batch over (data, fsdp), embed over tensor; 6 is not split (activation_length: None)
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
        # a mesh axis that does not divide the size is dropped (2 rows over data x fsdp = 4)
        assert logical_sharding((2, 6, 3), RESIDUAL).spec == P("data", None, None)
        with pytest.raises(ConfigError, match="logical axis 'nope'"):
            constrain(x, ("nope", None, None))
    assert active() is None
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 6, 4)))


def test_trainer_config_refusals_name_the_field():
    """The real config path: plan_from_config + preflight refuse before anything compiles."""
    from glm5v_jax.train.parallel import plan_from_config, preflight

    config = config_module("vlm_pretrain").get_config("tiny")
    model = nnx.eval_shape(lambda: GLM5V(small_spec(), rngs=nnx.Rngs(0)))
    cases = [
        (dict(shape=(3, -1, 1, 1)), 8, "config.mesh.shape"),  # 3 does not divide 8 devices
        (dict(shape=(2, 2, 1, 1)), 8, "config.mesh.shape"),  # 4 devices in the mesh, 8 available
        (dict(shape=(1, 1, 1, 8)), 8, "config.model.backbone.num_experts"),  # 4 experts over 8
        (dict(shape=(1, 1, 8, 1)), 8, ("config.model.backbone.num_kv_heads", "config.model.backbone.num_heads",
                                        "config.model.vision.num_heads")),  # 4 / 2 heads over 8
        (dict(shape=(2, 4, 1, 1)), 6, "config.data.batch_size"),  # 6 rows over 8 batch shards
        (dict(rules={"heads": "model"}), 8, "config.mesh.rules.heads"),  # unknown mesh axis
        (dict(replication_action="ignore"), 8, "config.mesh.replication_action"),
        (dict(rules={"embed": None, "mtp_concat": None, "patch": None}), 8, "config.mesh.replication_tolerance"),
    ]
    for change, batch, field in cases:
        cfg = ml_collections.ConfigDict(config.mesh.to_dict())
        for k, v in change.items():
            if k == "rules":
                cfg.rules.update(v)
            else:
                cfg[k] = v
        with pytest.raises(ConfigError) as e:
            preflight(model, plan_from_config(cfg, jax.devices()[:8]), global_batch=batch, mesh_cfg=cfg)
        assert e.value.field in ((field,) if isinstance(field, str) else field), (change, str(e.value))
    cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    cfg.rules.update({"embed": None, "mtp_concat": None, "patch": None})
    cfg.replication_action = "warn"
    with pytest.warns(UserWarning, match="replicated"):
        preflight(model, plan_from_config(cfg, jax.devices()[:8]), global_batch=8, mesh_cfg=cfg)
