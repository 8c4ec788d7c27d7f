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
# # Generation: a small SFT run answers questions about shapes-world images
#
# This notebook trains a small chat model and then asks it questions through the generation engine
# (`glm5v_jax/generate/`):
#
# 1. an SFT run on the embedded *shapes world* data, trained with the project's command line
#    (`python -m glm5v_jax.main --config=configs/vlm_sft.py:tiny`), or reused if `WORKDIR` already
#    holds one;
# 2. `load_run`, a few validation images, and for each a caption and answers to its count / colour /
#    position questions: greedy, one `Request` per question, all submitted together so the engine
#    batches them continuously; the model's answers next to the reference answers, and
#    `engine.metrics()`;
# 3. a group of `N` samples of one question at temperature 1 (one prefill, then forks of its pages)
#    with each token's two logprobs;
# 4. a conversation held in the cache (`Request(keep=True)`) and continued with a follow-up question
#    (`engine.extend`);
# 5. the same question from the command line, `python -m glm5v_jax.generate`.
#
# **Expect poor answers at the defaults.** The default run is 300 SFT steps of the `tiny` preset
# (about 10M parameters) from random weights, so that it finishes in minutes on a CPU runtime (1-3 s
# per step on 2 CPU cores, and about a minute to build the data, once per `DATA_DIR`; seconds per
# step on a GPU or TPU runtime). Such a run learns the chat format and the form of each answer (a
# number, a colour, "yes"/"no", a caption sentence) long before it learns to read the image: in our
# run at step 300 the captions named the same few shapes for every image, and the answers it got right
# were mostly the most common ones ("1" for "How many green shapes are there?"). At step 600 the captions
# began to name the image's background and colours. Section 6 says how to train a better model. The
# test suite runs this notebook with a 2-step run of an even smaller model (`tests/test_colabs.py`),
# whose answers are noise.

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
WORKDIR = "/tmp/glm5v_generate/sft"  # the SFT run: trained here unless it already reached STEPS
DATA_DIR = "/tmp/glm5v_generate/data"  # the shapes-world records (built once) and the example image
CONFIG = "configs/vlm_sft.py:tiny"  # config file and preset, as on the command line
STEPS = 300  # SFT steps (a run already in WORKDIR with fewer steps is resumed up to STEPS)
FLAGS: list = ["--config.eval_every=0"]  # more flags of glm5v_jax.main, e.g. "--config.data.batch_size=8"
IMAGES = 3  # shapes-world validation images to ask about
N = 8  # samples of one question in section 3
MAX_NEW_TOKENS = 48  # per answer (a shapes-world caption takes about 30 tokens)

# %%
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# The repository root: the folder above colabs/ that holds configs/vlm_sft.py.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "vlm_sft.py").exists())


def run_command(cmd: list[str], show: str = "", env: dict | None = None) -> str:
    """Runs `cmd` in the repository root, printing the output lines that match `show` as they come;
    returns the whole output, or raises with its tail if the command fails."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if show and re.search(show, line):
            print(line.split("] ", 1)[-1].rstrip())  # without the absl prefix
    if proc.wait():
        raise RuntimeError(f"exit status {proc.returncode}:\n" + "".join(lines[-40:]))
    return "".join(lines)


def checkpoint_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


# %% [markdown]
# ## 1. Train (or reuse) an SFT run
# `configs/vlm_sft.py` renders each shapes-world record as a multi-turn GLM chat (an optional system
# message; user turns with the image; assistant answers about count, colour, position, boxes, the
# written word, a caption; sometimes a text-only turn) and puts the loss on the assistant's tokens
# only. In the report's chain SFT starts from a pre-trained model (`--config.init_from=RUN` of a
# `configs/vlm_pretrain.py` run); here it starts from random weights to keep the notebook short.
#
# This is the command a researcher runs in a shell. Every field of the config can be changed with a
# `--config.<field>=<value>` flag in `FLAGS` (`--config.eval_every=100` adds validation answer
# accuracy per task, in `WORKDIR/eval_table.md`); a change of the model or data needs a new `WORKDIR`
# (the run refuses to resume with another model). The training runs in its own process, before this
# kernel touches an accelerator (a TPU belongs to one process at a time).

# %%
saved = checkpoint_steps(WORKDIR)
if saved and saved[-1] >= STEPS:
    print(f"reusing {WORKDIR}: checkpoint step {saved[-1]}")
else:
    flags = list(FLAGS)
    if CONFIG.endswith(":tiny") and not any(f.startswith("--config.data.batch_size") for f in flags):
        # The run shards the batch over every device (FSDP), so its 4 rows must divide evenly (8 TPU cores:
        # 8 rows). Counted in a separate process, so that this kernel leaves the accelerator to the run.
        probe = [sys.executable, "-c", "import jax; print(jax.device_count())"]
        devices = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-1])
        if devices > 1:
            flags.append(f"--config.data.batch_size={-(-4 // devices) * devices}")
    cmd = [sys.executable, "-m", "glm5v_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
           f"--config.total_steps={STEPS}", f"--config.data.data_dir={DATA_DIR}", *flags]
    print("from the repository root:\n$ python", shlex.join(cmd[1:]), "\n")
    t0 = time.time()
    run_command(cmd, show=r"\] (step \d+/|resuming|shapes world .* ready|checkpoint step \d+ saved)")
    print(f"\ntrained in {time.time() - t0:.0f} s")

# %% [markdown]
# ## 2. Load the run and ask questions about a few images
# `load_run` rebuilds the model from the run's `config.json` and reads the newest checkpoint (or
# `step=`); nothing is initialised at random. The tokenizer is the run's own.
#
# The images come from the shapes-world *validation* split, which training never saw (it is generated
# from the same seed, so this is in-distribution data). Each record carries a caption and two to four
# question-answer pairs.

# %%
import io
import json

import jax
import matplotlib.pyplot as plt
from PIL import Image

from glm5v_jax.data import shapes_world
from glm5v_jax.data.templates import CAPTION_PROMPT_EN
from glm5v_jax.generate.chat import chat_stops
from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import Request, Sampling
from glm5v_jax.generate.run_loader import load_run

print("jax", jax.__version__, "| backend", jax.default_backend(), "|", jax.device_count(), "device(s)")
model, tokenizer, config = load_run(WORKDIR)
print(f"step {checkpoint_steps(WORKDIR)[-1]} of {config.trainer} ({CONFIG}): backbone "
      f"{config.model.backbone.num_layers} layers x {config.model.backbone.embed_dim}, "
      f"vocabulary {tokenizer.vocab_size}, MMTP {config.model.mtp.mode}")

seed = config.data.sources.image.get("build_seed", 0)
records = [shapes_world.generate_image_example(seed, "validation", i) for i in range(IMAGES)]
fig, axes = plt.subplots(1, IMAGES, figsize=(4 * IMAGES, 3.5), squeeze=False)
for i, (ax, r) in enumerate(zip(axes[0], records)):
    ax.imshow(Image.open(io.BytesIO(r["image"])))
    ax.set_title(f"image {i} ({r['width']}x{r['height']})")
    ax.axis("off")
plt.show()

# %% [markdown]
# Each question becomes one greedy `Request` of chat messages (`{"role": "user", "content": [image,
# question]}`). The engine renders them in the template SFT trained on
# (`[gMASK]<sop><|user|>\n<image block>{question}<|assistant|>\n`), with the image preprocessed as in
# training (NaFlex at the model's patch budget: one `<|image|>` token per 2x2 group of patches). The
# ids that end an answer are `<|user|>` (it opens the next turn in training), `<|observation|>` and
# `<|endoftext|>` (`chat_stops`).
#
# All requests go in at once. The engine has fewer decode slots than requests: it admits what fits,
# prefills the admitted prompts together (CogViT once per image), decodes every live slot
# `steps` tokens per device call, and refills a slot as soon as its answer ends, so short answers do
# not wait for the captions. Shapes are bucketed, so after the first calls nothing compiles.

# %%
STOPS = chat_stops(tokenizer)
# Decode slots (fewer than the requests at the defaults), the longest sequence, its pages, prompts per
# prefill call and the prompt-chunk buckets (64 or 128 tokens: one compiled prefill shape for these prompts).
engine = Engine(model, max_slots=max(8, N), max_seq_len=256, page_size=16, prefill_rows=4, min_chunk=64, max_chunk=128,
                tokenizer=tokenizer)


def as_text(tokens) -> str:
    return tokenizer.decode([t for t in tokens if t not in STOPS]).strip()


def ask(record, question: str, **kwargs) -> Request:
    messages = [{"role": "user", "content": [{"type": "image", "image": record["image"]}, question]}]
    return Request(messages=messages, stop=STOPS, max_new_tokens=MAX_NEW_TOKENS, **kwargs)


asked = {}  # request id -> (image, task, question, reference)
finish_order = []
for i, r in enumerate(records):
    items = [("caption", CAPTION_PROMPT_EN, r["caption_en"])]
    items += [(qa["kind"], qa["q"], qa["a"]) for qa in json.loads(r["qa_json"])]
    for task, question, reference in items:
        rid = engine.submit(ask(r, question, on_done=lambda c: finish_order.append(c.id)))
        asked[rid] = (i, task, question, reference)
print(f"{len(asked)} requests for {engine.max_slots} slots")
t0 = time.time()
answers = {c.id: c for c in engine.run()}
print(f"answered in {time.time() - t0:.1f} s (compiling included); finishing order: {finish_order}\n")

right = Counter()
for rid, (i, task, question, reference) in asked.items():
    answer = as_text(answers[rid].samples[0].tokens)
    ok = answer.lower().rstrip(".") == reference.lower().rstrip(".")
    right[task, ok] += 1
    if task == "caption":
        print(f"image {i}\n  caption   model: {answer!r}\n            reference: {reference!r}")
    else:
        print(f"  [{task:8s}] {question}  model: {answer!r}  reference: {reference!r}  {'right' if ok else 'wrong'}")
print("\nexact answers:", {t: f"{right[t, True]}/{right[t, True] + right[t, False]}"
                           for t in sorted({t for t, _ in right})})
metrics = engine.metrics()
print("engine.metrics():", {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})

# %% [markdown]
# How to read the metrics: `prefill_calls` counts batched prompt extends (each holds up to `prefill_rows`
# prompts), `decode_calls` device calls of `steps` decode steps for every slot, `admission_waits` how
# often the head of the queue waited for a slot or pages, and `useful_slot_fraction` the share of slot
# steps that produced a token (an idle slot in a decode call is wasted work). Raise `max_slots` for
# throughput, `max_seq_len` for longer conversations; `engine.warmup()` compiles every shape up front.

# %% [markdown]
# ## 3. A group of N samples at temperature 1
# A GRPO-style group: `Request(n=N)` prefills the prompt once and forks it N-1 times. The forks share
# the prompt's full pages and copy only its last, partly filled page, so `prefill_calls` grows by one.
# The spread of the answers is the model's uncertainty; a reward over the group is what RL trains on.
#
# Each token carries two logprobs: `logp_raw` under the model's own distribution (what the trainer
# computes for the same tokens) and `logp_sampled` under the distribution actually sampled from
# (after temperature, top-k, top-p, renormalised). At temperature 1 without top-k or top-p they differ
# only by the mass of the `<|image|>` placeholder, which is never sampled (an image must fill it): about
# 0.001 for a model that has barely trained, less once it has learned not to predict it. A second
# request at temperature 0.7 with top-k 3 shows them apart. Sampling parameters are arrays on
# the device, so changing them compiles nothing. Change `N`, the temperature or `top_p` here.

# %%
record, question = records[0], json.loads(records[0]["qa_json"])[0]
before = engine.metrics()["prefill_calls"]
group = engine.submit(ask(record, question["q"], n=N, sampling=Sampling(temperature=1.0, seed=0)))
done = {c.id: c for c in engine.run()}
print(f"{question['q']} (reference {question['a']!r})\nprefill calls for the {N} samples: "
      f"{engine.metrics()['prefill_calls'] - before}")
group_answers = [as_text(s.tokens) for s in done[group].samples]
print(f"{N} samples at temperature 1.0:", Counter(group_answers).most_common())
sharp = engine.submit(ask(record, question["q"], sampling=Sampling(temperature=0.7, top_k=3, seed=1)))
done.update({c.id: c for c in engine.run()})


def logprob_table(sample, title: str) -> None:
    print(f"\n{title}\n  {'token':>14s} {'logp_raw':>9s} {'logp_sampled':>13s}")
    for t, raw, smp in zip(sample.tokens, sample.logp_raw, sample.logp_sampled):
        print(f"  {tokenizer.decode([t]) if t not in STOPS else '<stop>':>14s} {raw:9.3f} {smp:13.3f}")


logprob_table(done[group].samples[0], "sample 0 of the group (temperature 1.0)")
logprob_table(done[sharp].samples[0], "one sample at temperature 0.7, top-k 3")

# %% [markdown]
# ## 4. A conversation: `keep=True`, then `engine.extend`
# A request with `keep=True` holds its cache when its turn ends (`held` in the metrics). `extend` appends
# the next user turn to that cache (messages with text or more images, or token ids), so the earlier
# turns and the image are not prefilled again, and the model answers again. The completion holds every
# turn's tokens so far; `release` frees the pages. The follow-up is one of the text-only turns SFT trains
# on (arithmetic on the last count).

# %%
n_shapes = len(json.loads(record["boxes_json"]))
first = engine.submit(ask(record, "How many shapes are there?", keep=True))
turn1 = {c.id: c for c in engine.run()}[first].samples[0]
print(f"user: How many shapes are there?\nmodel: {as_text(turn1.tokens)!r}  (reference {str(n_shapes)!r})")
print("held conversations:", engine.metrics()["held"])

follow_up = "If I added 2 more, how many would there be?"
# The turn's last token (<|user|> when the model closed its answer) is appended first by extend, and a
# message that opens with it does not repeat it.
engine.extend(first, messages=[{"role": "user", "content": follow_up}])
turn2 = {c.id: c for c in engine.run()}[first].samples[0]
print(f"user: {follow_up}\nmodel: {as_text(turn2.tokens[len(turn1.tokens):])!r}  (reference {str(n_shapes + 2)!r})")
engine.release(first)
metrics = engine.metrics()
print("held after release:", metrics["held"], "| free pages:", metrics["free_pages"], "of", metrics["num_pages"])

# %% [markdown]
# ## 5. The command line
# Section 3's question, answered greedily from a shell (the command loads the run, preprocesses the image
# as above and answers one turn):
#
# ```bash
# python -m glm5v_jax.generate --workdir=/tmp/glm5v_generate/sft --prompt="How many shapes are there?" --image=shape.png
# ```
#
# In Colab, `!python -m glm5v_jax.generate --workdir={WORKDIR} --prompt="..." --image={path}` runs it
# from a cell. Below it runs as a subprocess. When this kernel holds an accelerator (a TPU serves one
# process at a time) the subprocess runs on the CPU, which is enough for the tiny model.

# %%
image_path = Path(DATA_DIR) / "example_0.png"
image_path.write_bytes(record["image"])
cli = [sys.executable, "-m", "glm5v_jax.generate", f"--workdir={WORKDIR}", f"--prompt={question['q']}",
       f"--image={image_path}", f"--max_new_tokens={MAX_NEW_TOKENS}"]
print("$ python", shlex.join(cli[1:]))
env = None if jax.default_backend() == "cpu" else dict(os.environ, JAX_PLATFORMS="cpu")
out = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True)
if out.returncode:
    raise RuntimeError(f"exit status {out.returncode}:\n{out.stderr[-3000:]}")
greedy = next(as_text(answers[rid].samples[0].tokens) for rid, (i, _, q, _) in asked.items()
              if i == 0 and q == question["q"])
print(f"command line: {out.stdout.strip()!r}\nengine above: {greedy!r}\nreference:    {question['a']!r}")

# %% [markdown]
# ## 6. Better answers
# - **Train longer.** Raise `STEPS` and rerun this notebook: the run resumes from its newest checkpoint
#   (the learning-rate schedule is stretched to the new length). The config's own default for `tiny` is
#   400 steps; go to a few thousand on a GPU or TPU runtime. Watch the loss in `WORKDIR/metrics.jsonl`,
#   and drop `--config.eval_every=0` from `FLAGS` (or set `--config.eval_every=200`) for validation
#   answer accuracy per task (teacher-forced, and greedy answers generated by this engine) in
#   `WORKDIR/eval_table.md`.
# - **More data per step**: `--config.data.batch_size=16` (the tiny preset packs 4 rows of 256 tokens; a
#   new `WORKDIR`).
# - **Start from a pre-trained model**, as the report does: train
#   `python -m glm5v_jax.main --config=configs/vlm_pretrain.py:tiny --workdir=runs/pt`, then add
#   `--config.init_from=runs/pt` to `FLAGS` with a new `WORKDIR`.
# - **A bigger model**: `CONFIG = "configs/vlm_sft.py:0p5b"` (an accelerator runtime), or fields such as
#   `--config.model.backbone.num_layers=8` (a new `WORKDIR`).
# - **Sampling**: `Sampling(temperature=..., top_k=..., top_p=..., seed=...)` per request and `n`
#   samples per prompt (section 3); greedy is temperature 0.
