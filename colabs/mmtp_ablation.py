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
# # The MMTP ablation at small scale
#
# GLM-5V-Turbo's multimodal multi-token prediction (report, section 2.2) has to decide what the MTP
# head sees at image positions. Three options:
#
# - `image_token`: one shared `<|image|>` embedding at every image position (the report's choice);
# - `visual_embed`: the visual features themselves, as the main model sees them;
# - `mask`: image positions leave the MTP stream.
#
# The report's ablation, on a 0.5B model, found that `image_token` trains to lower loss and converges
# more stably than `visual_embed`. This notebook reruns the comparison on the `tiny` preset with
# `experiments/mmtp_ablation.py`: for every seed the three runs share initialisation, data order and
# hyper-parameters, and differ only in the mode (the runner checks, from a hash of every batch, that
# they saw byte-identical data).
#
# At the defaults below (3 modes x 3 seeds x 70 steps) it takes about 25 minutes on 2 CPU cores (a
# Colab CPU runtime) and a few minutes on a TPU runtime. The test suite runs it with 2 steps and one
# seed (`tests/test_colabs.py`).

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
STEPS = 70  # training steps per run
SEEDS = "0,1,2"  # each seed sets the initialisation and the data order
MODES = "image_token,visual_embed,mask"
EVAL_EVERY = 35  # 0: no evaluation
WORKDIR = "/tmp/mmtp_ablation"  # data (built once, shared by all runs) and run directories
OUT_DIR = "/tmp/mmtp_ablation/results"  # results.md, results.json, curves.png
EXTRA_ARGS: list = []  # more flags of experiments/mmtp_ablation.py, e.g. ["--set", "model.mtp.num_depths=2"]

# %%
import importlib.util
import json
import logging
from pathlib import Path

import jax
from IPython.display import Image, Markdown, display

# The repository root: the folder above colabs/ that holds experiments/mmtp_ablation.py.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments" / "mmtp_ablation.py").exists())
_spec = importlib.util.spec_from_file_location("mmtp_ablation", ROOT / "experiments" / "mmtp_ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)
logging.getLogger().setLevel(logging.WARNING)

devices = jax.device_count()
print("jax", jax.__version__, "| backend", jax.default_backend(), "|", devices, "device(s)")
argv = ["--preset", "tiny", "--steps", str(STEPS), "--seeds", SEEDS, "--modes", MODES,
        "--eval_every", str(EVAL_EVERY), "--data_dir", f"{WORKDIR}/data", "--workdir", WORKDIR,
        "--out_dir", OUT_DIR, *EXTRA_ARGS]
if devices > 1 and "--batch_size" not in EXTRA_ARGS:
    # The tiny preset shards the batch over every device (FSDP), so the rows per step must divide evenly.
    rows = -(-4 // devices) * devices
    argv += ["--batch_size", str(rows)]
    print(f"{devices} devices: {rows} packed rows per step (the committed CPU results use 4)")
print("python experiments/mmtp_ablation.py", " ".join(argv))

# %% [markdown]
# ## Run the three modes
# One line per run as it finishes: final main loss, median seconds per step and wall time.

# %%
result = ablation.main(argv)

# %% [markdown]
# ## Results
# Mean ± std over seeds. *smoothness* is the variance of the step-to-step change of the main loss (lower is
# smoother); a *gradient spike* is a step whose gradient norm exceeds twice the median of the previous 20
# steps; *vision B/step* is the bytes of visual features entering the MTP stream, which only
# `visual_embed` has. The verdict compares image_token and visual_embed seed by seed.

# %%
report = (Path(OUT_DIR) / "results.md").read_text()
display(Markdown(report.split("![curves]")[0]))
display(Image(filename=str(Path(OUT_DIR) / "curves.png")))

# %% [markdown]
# ## Compared with the committed run
# `experiments/results/mmtp_ablation/` holds the run the README reports (3 seeds x 70 steps on 2 CPU
# cores). With the same settings on a CPU runtime your numbers should agree to a few units in the last
# digit; other hardware or batch sizes change them.

# %%
committed = json.loads((ROOT / "experiments" / "results" / "mmtp_ablation" / "results.json").read_text())
mine = {r["mode"]: r for r in result["table"]}
print(f"{'mode':14s} {'committed main, last 20%':>26s} {'this run':>12s}")
for row in committed["table"]:
    here = mine.get(row["mode"])
    print(f"{row['mode']:14s} {row['main_tail']:>14.4f} ± {row['main_tail_std']:.4f} "
          f"{here['main_tail'] if here else float('nan'):>12.4f}")
for line in ablation.verdict(committed["runs_summary"], committed["table"], 0.2):
    print("committed:", line)
