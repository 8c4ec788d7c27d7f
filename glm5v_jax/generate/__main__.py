"""`python -m glm5v_jax.generate --workdir=RUN [--step=N] --prompt="..." [--image=PATH] [--temperature=T]
[--max_new_tokens=N]`: a trained VLM run answers one chat turn (the answer is printed)."""
from __future__ import annotations

from absl import flags

from glm5v_jax.errors import run_cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a VLM stage (pre-training or SFT).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that reads).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's message.", required=True)
_IMAGE = flags.DEFINE_string("image", None, "An image file (local or gs://) the message is about.")
_SYSTEM = flags.DEFINE_string("system", "", "A system message.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: no limit.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1: no limit).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")


def answer(workdir: str, prompt: str, *, image: bytes | None = None, step: int | None = None, system: str = "",
           **kwargs) -> str:
    """The run's answer to one user turn (with an image): what the command line prints."""
    from glm5v_jax.generate.offline import generate
    from glm5v_jax.generate.chat import chat_prompt, image_inputs
    from glm5v_jax.generate.run_loader import load_run

    model, tokenizer, _ = load_run(workdir, step)
    arrays, n_image = image_inputs(image, model.spec) if image is not None else (None, 0)
    ids = chat_prompt(tokenizer, prompt, image_tokens=n_image, system=system)
    stops = [tokenizer.eos_id, tokenizer.user_id]
    out = generate(model, [ids], images=arrays, stop_ids=stops, **kwargs)
    tokens = [t for t in out.tokens[0, :out.count[0]].tolist() if t not in stops]
    return tokenizer.decode(tokens)


def main(argv) -> None:
    del argv
    from glm5v_jax.paths import as_path

    image = as_path(_IMAGE.value).read_bytes() if _IMAGE.value else None
    print(answer(_WORKDIR.value, _PROMPT.value, image=image, step=_STEP.value, system=_SYSTEM.value,
                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                 max_new_tokens=_MAX_NEW.value))


if __name__ == "__main__":
    run_cli(main)
