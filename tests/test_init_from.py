"""init_from: parsing, subtree copies into this run's shardings, and refusals naming the paths."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glm5v_jax.errors import ConfigError
from glm5v_jax.train.checkpoint import Checkpointer
from glm5v_jax.init_from import InitFrom, apply_init_from, parse_init_from
from glm5v_jax.train.run import TrainState


class Tower(nnx.Module):
    def __init__(self, width: int, seed: int):
        rngs = nnx.Rngs(seed)
        self.encoder = nnx.Linear(4, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])


class Source(nnx.Module):  # like a stage-2 run: model.image.encoder + a head
    def __init__(self, seed: int = 0):
        self.image = Tower(8, seed)
        self.head = nnx.Linear(8, 3, rngs=nnx.Rngs(seed + 1))


class Target(nnx.Module):  # like the VLM: model.vision is a Tower, plus parts of its own
    def __init__(self, width: int = 8, seed: int = 7):
        self.vision = Tower(width, seed)
        self.text = nnx.Linear(8, 5, rngs=nnx.Rngs(seed + 1))


def _state(model: nnx.Module):
    return nnx.state(TrainState(model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)))


def _save(workdir, step: int, model: nnx.Module):
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(step, _state(model), {}, {}, force=True)
    ckpt.close()


def _leaves(tree, *path):
    for p in path:
        tree = tree[p]
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_parse():
    assert parse_init_from("runs/s1:encoder=vision") == InitFrom("runs/s1", None, (("encoder", "vision"),))
    assert parse_init_from("runs/pt@300") == InitFrom("runs/pt", 300, (("", ""),))
    assert parse_init_from("gs://bucket/run@5:a.b=c,d=e") == InitFrom("gs://bucket/run", 5, (("a.b", "c"), ("d", "e")))
    assert parse_init_from("gs://bucket/run").workdir == "gs://bucket/run"
    with pytest.raises(ConfigError, match="config.init_from.*overlap"):
        parse_init_from("r:a=vision,b=vision.encoder")
    with pytest.raises(ConfigError, match="config.init_from"):
        parse_init_from(":=")


def test_copies_a_subtree_bit_for_bit_into_this_runs_shardings(tmp_path):
    src_model = Source(seed=3)
    _save(tmp_path / "src", 2, Source(seed=99))  # an older step, not the one read
    _save(tmp_path / "src", 5, src_model)
    target = Target()
    state = _state(target)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 2 == 0 else P()),
                             state)
    state = jax.device_put(state, shardings)
    out = apply_init_from(f"{tmp_path / 'src'}:image=vision", state, shardings)

    want = _leaves(nnx.state(src_model), "image")
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(out, "model", "vision"), want))
    # what was not named is untouched: the text head and the optimizer (fresh)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(out, "model", "text"), _leaves(state, "model", "text")))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(out, "optimizer"), _leaves(state, "optimizer")))
    # arrays arrive in this run's shardings
    for a, s in zip(jax.tree.leaves(out), jax.tree.leaves(shardings)):
        assert a.sharding == s

    older = apply_init_from(f"{tmp_path / 'src'}@2:image.encoder=vision.encoder", state, shardings)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(older, "model", "vision", "encoder"),
                                                    _leaves(nnx.state(Source(seed=99)), "image", "encoder")))
    fresh = _state(Source(seed=0))
    whole = apply_init_from(str(tmp_path / "src"), fresh, jax.tree.map(lambda x: x.sharding, fresh))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(whole, "model"), _leaves(nnx.state(src_model))))


def test_refusals_name_the_paths_and_shapes(tmp_path):
    _save(tmp_path / "src", 1, Source())
    state = _state(Target())
    shardings = jax.tree.map(lambda x: x.sharding, state)
    with pytest.raises(ConfigError, match=r"config.init_from: SRC imag: no such path.*\['head', 'image'\]"):
        apply_init_from(f"{tmp_path / 'src'}:imag=vision", state, shardings)
    with pytest.raises(ConfigError, match=r"DST visio: no such path.*\['text', 'vision'\]"):
        apply_init_from(f"{tmp_path / 'src'}:image=visio", state, shardings)
    wide = _state(Target(width=16))
    with pytest.raises(ConfigError, match=r"shape mismatch: model.image.blocks.0.bias in .* is \(8,\), "
                                          r"model.vision.blocks.0.bias here is \(16,\)"):
        apply_init_from(f"{tmp_path / 'src'}:image=vision", wide, jax.tree.map(lambda x: x.sharding, wide))
    with pytest.raises(ConfigError, match=r"model.vision.blocks.0.bias has no counterpart model.head.blocks.0.bias"):
        apply_init_from(f"{tmp_path / 'src'}:head=vision", state, shardings)
    with pytest.raises(ConfigError, match="no checkpoint of step 4"):
        apply_init_from(f"{tmp_path / 'src'}@4:image=vision", state, shardings)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        apply_init_from(f"{tmp_path / 'nowhere'}:image=vision", state, shardings)
