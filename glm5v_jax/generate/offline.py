"""Offline generation: a batch of prompts in, arrays out, through the engine.

    out = generate(model, prompts, images=..., n=4, max_new_tokens=64, temperature=1.0, seed=0)
    out.tokens[i * n + j]   # sample j of prompt i (padded after out.count)

Every prompt and its n samples run at once (one engine slot each); each prompt is prefilled once and
its other samples fork its pages.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from glm5v_jax.generate.engine import Engine
from glm5v_jax.generate.requests import IMAGE_KEYS, Request, Sampling, image_blocks


class Generated(NamedTuple):
    """Per row (sample j of prompt i is row i * n + j): the new tokens, their logprobs (raw and as
    sampled), how many are real, and why the row ended."""

    tokens: np.ndarray  # [B * n, max_new] int32 (after `count`: 0)
    logp_raw: np.ndarray  # [B * n, max_new]
    logp_sampled: np.ndarray  # [B * n, max_new]
    count: np.ndarray  # [B * n]
    finish: list[str]  # "stop" | "length" | "capacity"


def split_images(prompts: Sequence[Sequence[int]], images: dict | None, image_token_id: int) -> list[dict | None]:
    """The image slots of each prompt from `images` (every prompt's images, concatenated in order)."""
    counts = [len(image_blocks(np.asarray(p), image_token_id)) for p in prompts]
    if images is None:
        return [None] * len(prompts)
    total = len(np.asarray(images["image_valid"]))
    if total != sum(counts):
        raise ValueError(f"generate: {total} images for {sum(counts)} <|image|> blocks in the prompts")
    ends = np.cumsum(counts)
    return [{k: np.asarray(images[k])[e - c:e] for k in IMAGE_KEYS} if c else None for c, e in zip(counts, ends)]


def _per_prompt(value, b: int, name: str) -> list:
    values = np.broadcast_to(np.asarray(value), (b,)) if np.ndim(value) <= 1 else None
    if values is None:
        raise ValueError(f"generate: {name} must be a scalar or one value per prompt")
    return values.tolist()


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, images: dict | None = None, n: int = 1,
             max_new_tokens: int = 32, stop_ids: Sequence[int] = (), page_size: int = 16,
             capacity: int | None = None, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             mesh: jax.sharding.Mesh | None = None, steps: int = 8) -> Generated:
    """Prompts (token ids; `images`: the image slots of their `<|image|>` blocks in order, as
    `chat.image_inputs` gives them, concatenated) -> n samples of up to `max_new_tokens` tokens each,
    with both logprobs. Sampling parameters are scalars or one per prompt; sample j of prompt i uses the
    stream seed + i * n + j. `capacity`: the most tokens a sequence may hold (default: the longest prompt
    plus max_new_tokens)."""
    b = len(prompts)
    if b == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    capacity = int(capacity or max(len(p) for p in prompts) + max_new_tokens)
    engine = Engine(model, max_slots=b * n, max_seq_len=capacity, page_size=page_size, prefill_rows=b,
                    max_chunk=max(len(p) for p in prompts), min_chunk=8, steps=steps,
                    max_stop_ids=max(len(stop_ids), 1), mesh=mesh)
    temps, ks, ps, seeds = (_per_prompt(v, b, name) for v, name in
                            ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p"), (seed, "seed")))
    ids = [engine.submit(Request(p, im, n=n, sampling=Sampling(temps[i], ks[i], ps[i], seeds[i] + i * n),
                                 max_new_tokens=max_new_tokens, stop=stop_ids))
           for i, (p, im) in enumerate(zip(prompts, split_images(prompts, images, model.spec.image_token_id)))]
    done = {c.id: c for c in engine.run()}
    samples = [s for rid in ids for s in done[rid].samples]
    if engine.pool.free_pages != engine.pool.num_pages:  # every page handed out is freed exactly once
        raise RuntimeError(f"generate: {engine.pool.num_pages - engine.pool.free_pages} pages leaked")
    rows = len(samples)
    tokens = np.zeros((rows, max_new_tokens), np.int32)
    raw, smp = np.zeros((rows, max_new_tokens), np.float32), np.zeros((rows, max_new_tokens), np.float32)
    for r, s in enumerate(samples):
        k = len(s.tokens)
        tokens[r, :k], raw[r, :k], smp[r, :k] = s.tokens, s.logp_raw, s.logp_sampled
    count = np.array([len(s.tokens) for s in samples], np.int32)
    return Generated(tokens, raw, smp, count, [s.finish for s in samples])
