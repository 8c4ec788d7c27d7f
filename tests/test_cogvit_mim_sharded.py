"""CogViT stage 1 on a mesh: the same losses as on one device, parameters, optimizer state and
frozen teachers sharded per the rules, and a checkpoint written on one mesh resumed on another
(8 fake CPU devices)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from glm5v_jax.train import run as run_lib
from glm5v_jax.errors import ConfigError
from glm5v_jax.train.writers import read_jsonl

from helpers import tiny_mim_config


def _config(data_dir: Path, steps: int, shape, num_devices: int):
    cfg = tiny_mim_config(data_dir, steps, batch_size=8, num_devices=num_devices)
    cfg.mesh.shape = shape
    cfg.optim.muon.ns_dtype = "float32"  # float32 throughout: sharded and one-device sums agree to 1e-5
    return cfg


RTOL = 1e-5
# Steps after a resume onto a mesh with tensor parallelism (heads split over 2 devices): the
# attention and MLP contractions are summed in another order; 1.5e-5 was measured.
RTOL_TENSOR = 5e-5


def _losses(workdir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_world")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):

    workdir = tmp_path_factory.mktemp("one_device")
    run_lib.train_and_evaluate(_config(data_dir, 5, (1, 1, 1, 1), 1), str(workdir))
    return _losses(workdir)


def test_mesh_run_matches_one_device_and_resumes_on_another_mesh(tmp_path, data_dir, reference, monkeypatch):
    from glm5v_jax.train import cogvit_mim

    placed = {}
    place = cogvit_mim.place_on_mesh
    monkeypatch.setattr(cogvit_mim, "place_on_mesh", lambda *a, **k: placed.setdefault("p", place(*a, **k)))
    workdir = tmp_path / "run"
    cfg = _config(data_dir, 5, (2, 4, 1, 1), 8)  # data x fsdp
    cfg.checkpoint_every = 3
    run_lib.train_and_evaluate(cfg, str(workdir))
    p = placed.pop("p")
    np.testing.assert_allclose(_losses(workdir), reference, rtol=RTOL)

    # Sharded, not replicated: student and optimizer slots over fsdp, and the frozen teachers too.
    # (the state itself was donated to the first step; the step keeps its shardings)
    flat = dict(nnx.to_flat_state(p.shardings))
    embed = [v.get_value() for path, v in flat.items()
             if path[0] == "model" and "embed" in (v.get_metadata().get("out_sharding") or ())]
    assert len(embed) > 5 and all("fsdp" in str(sh.spec) for sh in embed)  # 'embed' -> fsdp (DEFAULT_RULES)
    assert all(sh.device_set == set(jax.devices()) for sh in jax.tree.leaves(p.shardings))
    t_bytes = {}
    for leaf in jax.tree.leaves(p.teacher_state):
        for s in leaf.addressable_shards:
            t_bytes[s.device] = t_bytes.get(s.device, 0) + s.data.nbytes
    full = sum(x.nbytes for x in jax.tree.leaves(p.teacher_state))
    assert len(t_bytes) == 8 and max(t_bytes.values()) < 0.5 * full

    # Resume from step 3 on another mesh (heads over tensor, 4 devices): the checkpoint is resharded
    # and steps 4-5 repeat the reference's losses.
    shutil.rmtree(workdir / "checkpoints" / "5")
    run_lib.train_and_evaluate(_config(data_dir, 5, (1, 2, 2, 1), 4), str(workdir))
    p = placed.pop("p")
    assert {d.id for sh in jax.tree.leaves(p.shardings) for d in sh.device_set} == {0, 1, 2, 3}
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # the first run's rows of steps 4-5 were dropped on resume (from step 3) and logged again: once each
    assert [r["step"] for r in raw if "loss" in r] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(_losses(workdir), reference, rtol=RTOL_TENSOR)


def test_bad_mesh_settings_name_the_field(tmp_path):
    from glm5v_jax.train import cogvit_mim

    with pytest.raises(ConfigError, match="config.data.batch_size"):  # 6 rows over 4 devices
        cfg = _config(tmp_path, 1, (1, 4, 1, 1), 4)
        cfg.data.batch_size = 6
        cogvit_mim.place_on_mesh(cfg, *_pieces(cfg), run_lib.mesh_plan(cfg))
    with pytest.raises(ConfigError, match="config.mesh.num_devices"):
        run_lib.mesh_plan(_config(tmp_path, 1, (1, -1, 1, 1), 99))


def _pieces(cfg):
    from glm5v_jax.models.build import vision_spec_from_config

    spec = vision_spec_from_config(cfg.model.vision, dtype="float32")
    return spec, {"siglip2": 64, "dinov3": 64}, {}
