"""Small model specs, batches and configs shared by the tests."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from glm5v_jax.data.synthetic import packed_vlm_batch
from glm5v_jax.models.specs import BackboneSpec, MTPSpec, ProjectorSpec, VisionSpec, VLMSpec

IMAGE_ID = 4
IMAGE_SIZES = [(32, 64), (64, 32), (40, 40)]  # three aspect ratios
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _module_at(path: Path, module_name: str):
    """The Python file `path` as module `module_name`, loaded by path (no `sys.path` entry)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses, pickling look it up)
    spec.loader.exec_module(module)
    return module


@functools.cache
def config_module(name: str):
    """The config file `configs/<name>.py` as a module, once per test process:
    `config_module("vlm_pretrain").get_config("tiny")`."""
    return _module_at(CONFIGS / f"{name}.py", f"glm5v_configs.{name}")


@functools.cache
def experiment_module(name: str):
    """The script `experiments/<name>.py` as module `name` (it defines functions only; main() is not run)."""
    return _module_at(CONFIGS.parent / "experiments" / f"{name}.py", name)


class FakeTokenizer:
    """Byte-level: id = 16 + byte; specials below 16 (eos = pad = 0)."""

    eos_id = pad_id = 0
    gmask_id, sop_id, system_id, user_id, assistant_id = 1, 2, 3, 4, 5
    begin_image_id, end_image_id, image_id, begin_box_id, end_box_id = 6, 7, 8, 9, 10
    vocab_size, padded_vocab_size = 272, 384

    def encode(self, text):
        return [16 + b for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(int(i) - 16 for i in ids if i >= 16).decode("utf-8", errors="replace")



def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| in float32: the kernels' error measure against their references."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def small_spec(mode="image_token", depths=1, trunk="full", dtype=jnp.float32, moe_impl="ragged_dot"):
    """A few-thousand-parameter VLM with every feature of the real ones (MoE, M-RoPE, MTP)."""
    common = dict(dtype=dtype)
    return VLMSpec(
        vision=VisionSpec(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, max_patches=16, **common),
        projector=ProjectorSpec(vision_dim=32, out_dim=32, **common),
        backbone=BackboneSpec(vocab_size=128, embed_dim=32, num_layers=2, first_k_dense=1, num_heads=4,
                              num_kv_heads=2, head_dim=16, mlp_dim=64, num_experts=4, experts_per_token=2,
                              moe_mlp_dim=16, mrope_sections=(1, 1, 2), moe_impl=moe_impl, **common),
        mtp=MTPSpec(num_depths=depths, mode=mode, trunk_gradient=trunk),
        image_token_id=IMAGE_ID,
    )


def small_batch(seed=0, rows=2, seq_len=64, image_sizes=IMAGE_SIZES, max_patches=16, vocab_size=128):
    b = packed_vlm_batch(rows=rows, seq_len=seq_len, vocab_size=vocab_size, image_token_id=IMAGE_ID,
                         image_sizes=image_sizes, max_patches=max_patches, seed=seed)
    return jax.tree.map(jnp.asarray, b)


def sharded_muon_vlm(spec, mesh, rules):
    """(make, parameter shardings) for the sharded-training tests: `make()` builds the VLM of
    `spec` and a Muon optimizer (f32 Newton-Schulz placed on `mesh`), for `create_sharded`."""
    from flax import nnx

    from glm5v_jax.models.vlm import GLM5V
    from glm5v_jax.optim.muon import muon
    from glm5v_jax.optim.routing import route
    from glm5v_jax.sharding.rules import parameter_shardings

    abstract = nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))
    shardings = parameter_shardings(abstract, mesh, rules)
    table = route(abstract)

    def make():
        model = GLM5V(spec, rngs=nnx.Rngs(0))
        tx = muon(0.02, table, ns_dtype=jnp.float32, mesh=mesh, shardings=shardings, adam_learning_rate=3e-3)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return make, shardings


def loss_step(graphdef):
    """`(state, batch) -> (state, total loss)`: the trainer's step on split (model, optimizer)."""
    from flax import nnx

    from glm5v_jax.train.step import train_step

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        return nnx.state((model, opt)), train_step(model, opt, batch)["loss/total"]

    return step


# An H100 as an abstract device: jax >= 0.11 lowers Triton kernels on a host without a GPU only
# when the abstract mesh names the target GPU (it reads the compute capability from it).
CUDA_TARGET = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def lower_text(fn, args, platform: str) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for `platform` ('tpu' or 'cuda') on this CPU host."""
    import contextlib
    import warnings

    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    ctx = contextlib.nullcontext()
    if platform == "cuda":
        mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=AbstractDevice(**CUDA_TARGET))
        ctx = use_abstract_mesh(mesh)
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax 0.11 deprecates the Triton backend
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def tiny_mim_config(data_dir, steps: int, *, options: str = "", batch_size: int = 4,
                    train_images: tuple[int, int, int] = (24, 8, 8), eval_every: int = 0,
                    checkpoint_every: int = 100, num_devices: int = 1):
    """configs/cogvit_mim.py:tiny shrunk for tests: float32 (plus `options`), depth-1 student and
    teachers, one warm-up step, `train_images` for the natural / instruction / scientific sources,
    logging every step, on the first `num_devices` devices."""
    cfg = config_module("cogvit_mim").get_config(",".join(filter(None, ("tiny,dtype=float32", options))))
    cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = steps, 1, eval_every, checkpoint_every
    cfg.model.vision.depth = 1
    for t in cfg.teachers.values():
        t.overrides.depth = 1
    cfg.data.data_dir = str(data_dir)
    cfg.data.batch_size = batch_size
    cfg.mesh.num_devices = num_devices
    for source, n in zip(("natural", "instruction", "scientific"), train_images):
        cfg.data.sources[source].train_size = n
    for g in cfg.optim.groups.values():
        g.warmup_steps = 1
    return cfg


# ----------------------------------------------------------------------------- every stage from the command line
_VLM_DATA = ["--config.data.batch_size=2", "--config.data.seq_len=128", "--config.data.sources.image.train_size=48",
             "--config.data.sources.image.eval_size=8", "--config.data.sources.text.train_size=24",
             "--config.data.sources.text.eval_size=4", "--config.data.tokenizer_vocab_size=1024",
             # the notebooks' small model (notebooks.SMALL_MODEL): a dense and a MoE layer, MTP, a one-block
             # tower; half the tiny preset's step time and a third less compile for every launch
             "--config.model.backbone.num_layers=2", "--config.model.vision.depth=1"]
_VISION_DATA = ["--config.data.batch_size=4", "--config.data.sources.natural.train_size=24",
                "--config.data.sources.instruction.train_size=8", "--config.data.sources.scientific.train_size=8",
                "--config.mesh.num_devices=1"]
# Every stage, as a user runs it, shrunk: (config argument, flags).
STAGE_RUNS = {
    "vlm_pretrain": ("configs/vlm_pretrain.py:tiny", _VLM_DATA + [
        f"--config.optim.groups.{g}.warmup_steps=2" for g in ("text", "vision", "projector")]),
    "vlm_sft": ("configs/vlm_sft.py:tiny", _VLM_DATA + [
        f"--config.optim.groups.{g}.warmup_steps=2" for g in ("text", "vision", "projector")]),
    "cogvit_mim": ("configs/cogvit_mim.py:tiny,dtype=float32", _VISION_DATA + [
        "--config.model.vision.depth=1", "--config.teachers.siglip2.overrides.depth=1",
        "--config.teachers.dinov3.overrides.depth=1"] + [
        f"--config.optim.groups.{g}.warmup_steps=1" for g in ("encoder", "heads")]),
    "cogvit_siglip": ("configs/cogvit_siglip.py:tiny", _VISION_DATA + [
        "--config.data.text_len=40", "--config.data.patch_budgets=(32, 16)", "--config.model.vision.depth=1",
        "--config.model.text.depth=1"] + [f"--config.optim.groups.{g}.warmup_steps=1"
                                          for g in ("vision", "text", "projection")]),
}


def stage_command(stage: str, workdir, data_dir, steps: int, *extra: str, checkpoint_every: int = 4) -> list[str]:
    """`python -m glm5v_jax.main` for `stage` (STAGE_RUNS) in `workdir`, logging every step; `extra` flags last."""
    config, flags = STAGE_RUNS[stage]
    return [sys.executable, "-m", "glm5v_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.total_steps={steps}", "--config.log_every=1", f"--config.checkpoint_every={checkpoint_every}",
            "--config.eval_every=0", f"--config.data.data_dir={data_dir}"] + flags + list(extra)


def cli_env(data_dir) -> dict:
    """Environment of a command-line run: CPU, and a persistent compilation cache next to `data_dir` so
    that runs of one test module compile their steps once. XLA_FLAGS: conftest's."""
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["JAX_COMPILATION_CACHE_DIR"] = str(Path(data_dir).parent / f"{Path(data_dir).name}_jit_cache")
    return env


def checkpoint_array_files(step_dir) -> list[Path]:
    """The files holding a checkpoint step's array bytes (the state item's OCDBT data files), sorted."""
    return sorted(f for f in (Path(step_dir) / "state").rglob("*") if f.is_file() and f.parent.name == "d")


# ----------------------------------------------------------------------------- generation over the paged cache
def paged_cache(stacks: dict[str, int], backbone, num_pages: int, page_size: int) -> dict:
    """A zero paged KV cache {stack name: {"k", "v"}} for `stacks` {name: layers} (e.g.
    `GLM5V.cache_stacks()`) of a backbone spec's attention shape."""
    from glm5v_jax.generate.kv_cache import StackCache

    return {name: StackCache(n, backbone.num_kv_heads, backbone.head_dim).init(num_pages, page_size)
            for name, n in stacks.items()}


def image_blocks(row, image_id: int = IMAGE_ID) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens in a row of token ids."""
    from glm5v_jax.generate.requests import image_blocks as runs

    return [(start, start + n) for start, n in runs(np.asarray(row), image_id)]




def one_sequence_batch(seq_len: int = 64) -> tuple[dict, int]:
    """`small_batch(rows=1)` as numpy, its packed documents joined into one sequence (generation tests),
    and that sequence's length."""
    batch = {k: np.asarray(v) for k, v in small_batch(rows=1, seq_len=seq_len).items()}
    batch["segment_ids"] = (batch["segment_ids"] != 0).astype(np.int32)
    return batch, int(batch["segment_ids"].sum())


# ----------------------------------------------------------------------------- a trained run to serve
def build_vlm_run(workdir, *, vocab_size: int = 400, seed: int = 3):
    """A VLM run directory as the trainer leaves it in `workdir`: config.json (resolved), tokenizer.model and a
    checkpoint at step 5 of a tiny `vlm_pretrain` model (2 layers, width 64, random weights). Returns the model."""
    import json

    import optax
    from flax import nnx

    from glm5v_jax.data import shapes_world
    from glm5v_jax.data.tokenizer import train_tokenizer
    from glm5v_jax.models.build import vlm_spec_from_config
    from glm5v_jax.models.vlm import GLM5V
    from glm5v_jax.train.checkpoint import Checkpointer
    from glm5v_jax.train.run import TrainState
    from glm5v_jax.train.vlm_pretrain import resolve_model_config

    workdir = Path(workdir)
    texts = list(shapes_world.iter_split_texts(0, "train", 24))
    tokenizer = train_tokenizer(texts, workdir / "tokenizer.model", vocab_size=vocab_size)
    config = config_module("vlm_pretrain").get_config("tiny,layers=2")
    config.model.backbone.embed_dim, config.model.backbone.mlp_dim = 64, 128
    config = resolve_model_config(config, tokenizer)
    model = GLM5V(vlm_spec_from_config(config.model), rngs=nnx.Rngs(seed))
    state = nnx.state(TrainState(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(5, state, {}, json.loads(config.to_json_best_effort()), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    return model


def chat_tokenizer(directory, vocab_size: int = 400):
    """A SentencePiece tokenizer with the GLM special tokens, trained on shapes-world texts in `directory`."""
    from glm5v_jax.data import shapes_world
    from glm5v_jax.data.tokenizer import train_tokenizer

    texts = list(shapes_world.iter_split_texts(0, "train", 24))
    return train_tokenizer(texts, Path(directory) / "tok.model", vocab_size=vocab_size)


def chat_model(tokenizer, seed: int = 0):
    """`small_spec()`'s VLM with `tokenizer`'s vocabulary and `<|image|>` id (random weights)."""
    import dataclasses

    from flax import nnx

    from glm5v_jax.models.vlm import GLM5V

    spec = small_spec()
    spec = dataclasses.replace(spec, backbone=dataclasses.replace(spec.backbone, vocab_size=tokenizer.vocab_size),
                               image_token_id=tokenizer.image_id)
    return GLM5V(spec, rngs=nnx.Rngs(seed))


def png(seed: int, size=(32, 48)) -> bytes:
    """A PNG of random pixels, `size` = (height, width)."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
