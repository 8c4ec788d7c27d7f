"""A run answers: `load_run` rebuilds a VLM run's model from its config.json, tokenizer and checkpoint
(parameters bit-exact); `python -m glm5v_jax.generate` prints an answer about an image; bad input is
refused naming the run directory or the image. The run directory is written here, tiny."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from glm5v_jax.errors import ConfigError
from glm5v_jax.generate.__main__ import answer
from glm5v_jax.generate.offline import generate
from glm5v_jax.generate.chat import chat_prompt, image_inputs
from glm5v_jax.generate.run_loader import load_run
from helpers import build_vlm_run

ROOT = Path(__file__).parents[1]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A VLM run directory as the trainer leaves it: config.json (resolved), tokenizer.model, a checkpoint."""
    workdir = tmp_path_factory.mktemp("run")
    return workdir, build_vlm_run(workdir)


def test_load_run_restores_the_trained_parameters(run_dir):
    workdir, model = run_dir
    loaded, tokenizer, config = load_run(str(workdir))
    assert config.trainer == "vlm_pretrain" and tokenizer.image_id == loaded.spec.image_token_id
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    arrays, n = image_inputs(_png(0), loaded.spec)
    ids = chat_prompt(tokenizer, "What colour is the square?", image_tokens=n)
    assert ids.count(tokenizer.image_id) == n > 0
    a = generate(model, [ids], images=arrays, max_new_tokens=5)
    b = generate(loaded, [ids], images=arrays, max_new_tokens=5)
    assert a.tokens.tolist() == b.tokens.tolist()
    other = generate(loaded, [ids], images=image_inputs(_png(1), loaded.spec)[0], max_new_tokens=5)
    assert not np.allclose(other.logp_raw, b.logp_raw)  # the image is seen


def test_command_line_prints_the_answer(run_dir, tmp_path):
    workdir, _ = run_dir
    image = tmp_path / "shape.png"
    image.write_bytes(_png(0))
    want = answer(str(workdir), "Describe the image.", image=image.read_bytes(), max_new_tokens=6)
    out = subprocess.run([sys.executable, "-m", "glm5v_jax.generate", f"--workdir={workdir}",
                          "--prompt=Describe the image.", f"--image={image}", "--max_new_tokens=6"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip("\n") == want


def test_bad_input_is_refused_by_name(run_dir, tmp_path):
    workdir, _ = run_dir
    with pytest.raises(ConfigError, match="workdir: .*config.json not found"):
        load_run(str(tmp_path / "nothing"))
    other = tmp_path / "mim"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"trainer": "cogvit_mim"}))
    with pytest.raises(ConfigError, match="trained by 'cogvit_mim'"):
        load_run(str(other))
    model, _, _ = load_run(str(workdir))
    with pytest.raises(ValueError, match="image cannot be used"):
        image_inputs(b"not an image", model.spec)
