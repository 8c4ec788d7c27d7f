"""The trainer's optimizer: groups by path prefix (config-added groups included), per-group
Muon/AdamW learning rates, clear errors, and the update statistics of the train step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.models.vlm import GLM5V
from glm5v_jax.optim.routing import route
from glm5v_jax.train.optimizer import GroupSettings, group_assigner, groups_from_config, make_tx
from glm5v_jax.train.step import train_step

from helpers import small_batch, small_spec


def _groups(**overrides):
    base = {"vision": GroupSettings(("vision",), lr=1e-3, muon_lr=1e-3),
            "projector": GroupSettings(("projector",), lr=1e-3, muon_lr=1e-3),
            "text": GroupSettings(("backbone", "mtp"), lr=1e-3, muon_lr=1e-3)}
    base.update(overrides)
    return base


def test_longest_prefix_wins_and_unclaimed_paths_fail():
    groups = _groups(mtp=GroupSettings(("mtp",), lr=1e-4, muon_lr=1e-4),
                     text=GroupSettings(("backbone",), lr=1e-3, muon_lr=1e-3),
                     experts=GroupSettings(("backbone/moe_layers/mlp",), lr=1e-4, muon_lr=1e-4))
    group_of = group_assigner(groups)
    assert group_of(("mtp", "depths", "0", "eh_proj")) == "mtp"
    assert group_of(("backbone", "moe_layers", "mlp", "gate")) == "experts"
    assert group_of(("backbone", "moe_layers", "attn", "q")) == "text"
    assert group_of(("vision", "blocks", "mlp", "fc1")) == "vision"
    with pytest.raises(ValueError, match="decoder/w belongs to no optimizer group"):
        group_of(("decoder", "w"))
    with pytest.raises(ValueError, match="prefix 'mtp' is claimed by both 'text' and 'mtp'"):
        group_assigner(_groups(mtp=GroupSettings(("mtp",), lr=1e-4, muon_lr=1e-4)))


def test_groups_from_config_errors_name_the_field():
    cfg = ml_collections.ConfigDict({"text": {"prefixes": "backbone, mtp", "lr": 1e-3, "muon_lr": 2e-3}})
    groups = groups_from_config(cfg)
    assert groups["text"].prefixes == ("backbone", "mtp") and groups["text"].muon_lr == 2e-3
    with pytest.raises(ValueError, match=r"config.optim.groups.text.prefixes"):
        groups_from_config({"text": {"prefixes": "", "lr": 1e-3, "muon_lr": 1e-3}})
    with pytest.raises(ValueError, match=r"config.optim.groups.text: unknown field\(s\) \['lr_peak'\]"):
        groups_from_config({"text": {"prefixes": "backbone", "lr": 1e-3, "muon_lr": 1e-3, "lr_peak": 1.0}})
    with pytest.raises(ValueError, match="config.optim.name"):
        make_tx({}, total_steps=10, groups=_groups(), name="sgd")


def _changed(before, after):
    """{top-level module/optimizer kind: whether any of its leaves moved}."""
    flat_b = dict(nnx.to_flat_state(before))
    flat_a = dict(nnx.to_flat_state(after))
    return {k: not np.array_equal(np.asarray(flat_b[k][...]), np.asarray(flat_a[k][...])) for k in flat_b}


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_a_group_at_zero_lr_does_not_move(name):
    model = GLM5V(small_spec(), rngs=nnx.Rngs(0))
    table = route(model)
    # vision frozen; projector: only its AdamW leaves (biases) move under Muon (muon_lr 0).
    groups = _groups(vision=GroupSettings(("vision",), lr=0.0, muon_lr=0.0, weight_decay=0.0),
                     projector=GroupSettings(("projector",), lr=1e-2, muon_lr=0.0, weight_decay=0.0))
    tx, schedules = make_tx(nnx.state(model, nnx.Param), total_steps=10, groups=groups, name=name, table=table)
    assert ("text/muon" in schedules) == (name == "muon") and "text/adamw" in schedules
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    labels = {p: "x" for p in table}
    metrics = nnx.jit(lambda m, o, b: train_step(m, o, b, update_labels=labels))(model, opt, small_batch())
    after = nnx.state(model, nnx.Param)
    moved = _changed(before, after)
    for path, did in moved.items():
        key = tuple(str(p) for p in path)
        if key[0] == "vision":
            assert not did, key
        elif key[0] == "projector":
            expect_move = name == "adamw" or table[key] is None
            assert did == expect_move, key
        elif key[0] == "backbone" and key[1] in ("embed", "head"):
            assert did, key
    # The logged update RMS is that of the parameter change (one label covering every leaf).
    flat_b = dict(nnx.to_flat_state(before))
    sq, n = 0.0, 0
    for path, v in nnx.to_flat_state(after):
        d = np.asarray(v[...], np.float64) - np.asarray(flat_b[path][...], np.float64)
        sq, n = sq + float(np.sum(d * d)), n + d.size
    np.testing.assert_allclose(float(metrics["optim/update_rms/x"]), np.sqrt(sq / n), rtol=1e-4)
    assert ("optim/ortho_error" in metrics) == (name == "muon")
    if name == "muon":  # measured at step 0 (then every 10 steps)
        assert np.isfinite(float(metrics["optim/ortho_error"])) and float(metrics["optim/ortho_error"]) > 0
