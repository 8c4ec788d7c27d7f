# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # glm5v_jax quick start
#
# This notebook walks through the library's main path on the `tiny` preset (about 10M parameters:
# CogViT, a GLM-style MoE backbone and one MMTP depth):
#
# 1. build the model from its ml-collections config,
# 2. look at its parameters with treescope,
# 3. run a forward pass on a packed image-text batch from the embedded *shapes world* data,
# 4. train a few steps with Muon,
# 5. save a checkpoint with orbax and restore it into a freshly built model.
#
# It runs on a Colab CPU, GPU or TPU runtime. On 2 CPU cores the whole notebook takes about
# 4 minutes, one of them building the dataset (once per WORKDIR); the main loss falls from 8.4 to
# about 2.5 in the 30 steps. The test suite runs it with smaller settings (`tests/test_colabs.py`).

# %% tags=["skip-execution"]
# Colab only; the test suite skips this cell (tag `skip-execution`).
# Get the code and install it: set REPO_URL to the git URL of your copy of glm5v_jax,
# or upload the repository to /content/glm5v_jax first.
import os
import subprocess

REPO_URL = ""
if not os.path.exists("/content/glm5v_jax"):
    if not REPO_URL:
        raise SystemExit("Set REPO_URL, or upload the repository to /content/glm5v_jax.")
    subprocess.run(["git", "clone", "-q", REPO_URL, "/content/glm5v_jax"], check=True)
# %pip install -q -e /content/glm5v_jax
# %cd /content/glm5v_jax/colabs

# %% [markdown]
# ## Settings
# The test suite replaces this cell's values with smaller ones (the cell is tagged `parameters`).

# %% tags=["parameters"]
PRESET = "tiny"  # a preset of configs/vlm_pretrain.py
STEPS = 30  # training steps in section 4
WORKDIR = "/tmp/glm5v_quickstart"  # data, tokenizer and checkpoints
OVERRIDES: dict = {}  # extra config fields, e.g. {"data.batch_size": 8}

# %%
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The repository root: the folder above colabs/ that holds configs/vlm_pretrain.py.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "vlm_pretrain.py").exists())
sys.path.insert(0, str(ROOT / "configs"))

import vlm_pretrain  # noqa: E402  (configs/vlm_pretrain.py)
from glm5v_jax.losses.lm import vlm_loss  # noqa: E402
from glm5v_jax.models.build import vlm_spec_from_config  # noqa: E402
from glm5v_jax.models.vlm import GLM5V  # noqa: E402
from glm5v_jax.tools.summary import format_summary  # noqa: E402
from glm5v_jax.train import vlm_pretrain as trainer  # noqa: E402
from glm5v_jax.train.checkpoint import Checkpointer  # noqa: E402
from glm5v_jax.train.step import jit_train_step  # noqa: E402

print("jax", jax.__version__, "| backend", jax.default_backend(), "|", jax.device_count(), "device(s)")
workdir = Path(WORKDIR)
shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # fresh checkpoints; the data is kept for reruns
workdir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The config
# `get_config("<preset>,<option>=<value>,...")` returns an ml-collections `ConfigDict`; every field can be
# changed before anything is built. `models/build.py` is the one place where the config becomes
# model settings, and a bad value is refused there with the field's name.

# %%
config = vlm_pretrain.get_config(f"{PRESET},mmtp=image_token")
for key, value in OVERRIDES.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
config.data.data_dir = str(workdir / "data")
print(config.model.backbone)
print("MMTP:", config.model.mtp)

# %% [markdown]
# ## 2. Data and the model
# The shapes-world dataset is built on first use (TFDS builder writing ArrayRecord, no TensorFlow)
# with a SentencePiece tokenizer trained on its text. The vocabulary size and the `<|image|>` id come
# from that tokenizer, whatever the preset said.

# %%
t0 = time.time()
sources, weights, tokenizer = trainer.prepare_data(config.data, workdir)
config = trainer.resolve_model_config(config, tokenizer)
print(f"data and tokenizer ready in {time.time() - t0:.1f} s: {tokenizer}")

record = sources["train"]["image"][0]
print(record["text"].decode("utf-8")[:300])

# %%
from IPython.display import display  # noqa: E402
from PIL import Image  # noqa: E402
import io  # noqa: E402

display(Image.open(io.BytesIO(record["image"])))

# %% [markdown]
# The spec is a tree of frozen dataclasses, validated when it is made. The summary builds the model
# abstractly (no memory) to count parameters.

# %%
spec = vlm_spec_from_config(config.model)
print(format_summary(spec))

# %%
model = GLM5V(spec, rngs=nnx.Rngs(config.seed))
nnx.display(model)  # treescope: click to expand modules; parameters carry logical axis names

# %% [markdown]
# ## 3. A forward pass
# The grain pipeline packs image-text and text-only documents into rows of `seq_len` tokens; each image
# is resized to its NaFlex patch budget and becomes `gh/2 * gw/2` `<|image|>` tokens after the 2x2 merge.

# %%
train_iter = trainer.make_iterator(config.data, sources["train"], weights, tokenizer, spec, seed=config.seed,
                                   train=True)
batch = next(train_iter)
for name, array in batch.items():
    print(f"{name:12s} {str(array.shape):16s} {array.dtype}")
row = batch["tokens"][0][batch["segment_ids"][0] == 1]
print("\nfirst document of row 0:", tokenizer.decode(row)[:200])

# %%
forward = nnx.jit(lambda model, batch: model(batch))  # compiled once, reused in section 5
outputs = forward(model, jax.tree.map(jnp.asarray, batch))
loss, metrics = vlm_loss(outputs, batch, mtp_loss_weight=config.model.mtp.loss_weight)
print("logits", outputs["logits"].shape, "| MTP logits per depth", [x.shape for x in outputs["mtp_logits"]])
print(f"main loss {float(metrics['loss/main']):.3f}, MTP depth-1 loss {float(metrics['loss/mtp_1']):.3f} "
      f"(uniform guess: ln(vocab) = {np.log(tokenizer.vocab_size):.3f})")
assert np.isfinite(float(loss))

# %% [markdown]
# ## 4. Train a few steps
# `build_optimizer` reads `config.optim`: Muon for the matrices of each group (text, vision, projector),
# AdamW for embeddings, norms and biases, with per-group learning-rate schedules. `jit_train_step` is the
# step the trainer runs (loss, gradients, update, router-bias balancing).

# %%
optimizer, schedules, labels = trainer.build_optimizer(model, config.optim, STEPS)
losses = []
t0 = time.time()
for step in range(1, STEPS + 1):
    batch = jax.tree.map(jnp.asarray, next(train_iter))
    metrics = jit_train_step(model, optimizer, batch, mtp_loss_weight=config.model.mtp.loss_weight)
    losses.append(float(metrics["loss/main"]))
    if step == 1 or step % 10 == 0 or step == STEPS:
        print(f"step {step:3d}  main loss {losses[-1]:.3f}  MTP loss {float(metrics['loss/mtp_1']):.3f}  "
              f"grad norm {float(metrics['grad_norm']):.2f}  ({time.time() - t0:.0f} s)")
assert np.all(np.isfinite(losses))

# %%
import matplotlib.pyplot as plt  # noqa: E402

plt.figure(figsize=(5, 3))
plt.plot(range(1, STEPS + 1), losses)
plt.xlabel("step")
plt.ylabel("main LM loss")
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 5. Save and restore
# The trainer's `Checkpointer` (orbax) saves the model and optimizer state as one pytree, with the data
# iterator's state and the config. We restore into a model built from a different seed and check that
# parameters, predictions and the data order all match.

# %%
ckpt = Checkpointer(workdir / "checkpoints")
ckpt.save(STEPS, nnx.state((model, optimizer)), train_iter.get_state(), config.to_dict())
ckpt.wait()
print("saved steps:", ckpt.all_steps())

fresh = GLM5V(spec, rngs=nnx.Rngs(config.seed + 1))
fresh_opt, _, _ = trainer.build_optimizer(fresh, config.optim, STEPS)
restored = ckpt.restore_latest(nnx.state((fresh, fresh_opt)))  # step, state, data, config, meta
ckpt.close()
nnx.update((fresh, fresh_opt), restored.state)

same_params = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                        nnx.state(model, nnx.Param), nnx.state(fresh, nnx.Param)))
resumed_iter = trainer.make_iterator(config.data, sources["train"], weights, tokenizer, spec, seed=config.seed,
                                     train=True)
resumed_iter.set_state(restored.data)
next_a, next_b = next(train_iter), next(resumed_iter)
same_batch = all(np.array_equal(next_a[k], next_b[k]) for k in next_a)
logits_a = forward(model, jax.tree.map(jnp.asarray, next_a))["logits"]
logits_b = forward(fresh, jax.tree.map(jnp.asarray, next_b))["logits"]
print(f"restored step {restored.step}: parameters equal: {same_params}, next batch equal: {same_batch}, "
      f"max |logits difference| = {float(jnp.max(jnp.abs(logits_a - logits_b))):.2e}")
assert same_params and same_batch and bool(jnp.array_equal(logits_a, logits_b))

# %% [markdown]
# ## Next
# The whole loop above, with evaluation, TensorBoard and `metrics.jsonl` logging, async checkpoints,
# resume and SIGTERM handling, sharding on a mesh from `config.mesh`, is one call of the run layer
# (the same for every stage of the chain: CogViT stages 2 and 1, VLM pre-training, SFT):
#
# ```python
# from glm5v_jax.train.run import train_and_evaluate
# train_and_evaluate(config, "runs/tiny")
# ```
#
# or from a shell: `python -m glm5v_jax.main --config=configs/vlm_pretrain.py:tiny --workdir=runs/tiny`.
# `colabs/mmtp_ablation.ipynb` reruns the report's MMTP ablation at this scale.
