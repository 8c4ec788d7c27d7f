"""What callers hand the engine and what it hands back, and the checks and chunking of a request's tokens.

  Request      tokens (with `<|image|>` blocks) and their images, n samples, sampling, limits, a callback
  Sample       one sample's new tokens with both logprobs, the weight version of each, and its finish
  Completion   a request's samples when it finishes (or is aborted), with each sample's remaining budget
  chunks()     a prompt cut into extend chunks that never split an image block
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

IMAGE_DTYPES = {"patches": np.float32, "patch_yx": np.int32, "patch_valid": np.bool_, "image_grid": np.int32,
                "image_valid": np.bool_}  # one image slot's arrays (`chat.image_inputs`), as compiled
IMAGE_KEYS = tuple(IMAGE_DTYPES)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's sampling: temperature 0 is greedy; top_k 0 and top_p 1 keep every token; seed None
    lets the engine pick one (sample i of a group uses stream seed + i)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclasses.dataclass
class Request:
    """A prompt for the engine: `tokens` (with `<|image|>` blocks) and `images`, its image slots in the
    order of its blocks as `chat.image_inputs` gives them (arrays with a leading image axis,
    concatenated); or `messages` (chat messages with text and image parts, `chat.render_messages`; the
    engine needs its tokenizer). `keep`: hold the cache after the turn so that `Engine.extend` can
    continue the conversation (n = 1 only)."""

    tokens: Sequence[int] = ()
    images: dict[str, np.ndarray] | None = None
    n: int = 1
    sampling: Sampling = Sampling()
    max_new_tokens: int = 32
    stop: Sequence[int] = ()
    on_done: Callable[["Completion"], None] | None = None
    keep: bool = False
    messages: Sequence[Mapping[str, Any]] | None = None


@dataclasses.dataclass
class Sample:
    """One sample of a request: the tokens of every turn so far, their logprobs under the model
    (`logp_raw`) and as sampled (`logp_sampled`), the weight version that produced each token, and how
    the last turn ended: "stop" | "length" | "capacity" | "abort" (None while running)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logp_raw: list[float] = dataclasses.field(default_factory=list)
    logp_sampled: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    remaining: int = 0  # tokens the turn could still have emitted
    # with Engine(record_routing=True): the routed experts `[L_moe, top_k]` of every token fed to the model
    # (the prompt's, then each generated token's but the last), for routing replay in RL
    expert_ids: list[np.ndarray] = dataclasses.field(default_factory=list)

    def copy(self) -> "Sample":
        return Sample(list(self.tokens), list(self.logp_raw), list(self.logp_sampled), list(self.versions),
                      self.finish, self.remaining, list(self.expert_ids))


@dataclasses.dataclass
class Completion:
    """A finished (or aborted) request: `samples[i]` is sample i of its group."""

    id: int
    prompt_length: int
    samples: list[Sample]

    @property
    def finish(self) -> list[str | None]:
        return [s.finish for s in self.samples]


def image_blocks(tokens: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of `<|image|>` tokens, in order."""
    is_image = np.concatenate([[False], tokens == image_token_id, [False]])
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8)))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def check_images(tokens: np.ndarray, images: dict | None, image_token_id: int, merge: int, what: str) -> int:
    """The number of images after checking that `images` fills the `<|image|>` blocks of `tokens`
    exactly (one image per block, its merged grid giving the block's length); ValueError otherwise."""
    blocks = image_blocks(tokens, image_token_id)
    if images is None:
        if blocks:
            raise ValueError(f"{what}: {len(blocks)} <|image|> blocks but no images")
        return 0
    missing = [k for k in IMAGE_KEYS if k not in images]
    if missing:
        raise ValueError(f"{what}: images lack {missing} (use chat.image_inputs)")
    grid = np.asarray(images["image_grid"]).reshape(-1, 2)
    if len(grid) != len(blocks):
        raise ValueError(f"{what}: {len(grid)} images for {len(blocks)} <|image|> blocks")
    sizes = (grid[:, 0] // merge) * (grid[:, 1] // merge)
    for i, ((_, n), want) in enumerate(zip(blocks, sizes)):
        if n != want:
            raise ValueError(f"{what}: image {i} has {want} tokens but its <|image|> block {n}")
    return len(grid)


def chunks(tokens: np.ndarray, image_token_id: int, max_chunk: int) -> list[tuple[int, int, int, int]]:
    """Cut `tokens` into extend chunks of at most `max_chunk` tokens, never inside an image block:
    [(start, end, first image, end image)]. ValueError for an image block longer than `max_chunk`."""
    blocks = image_blocks(tokens, image_token_id)
    out, start, image = [], 0, 0
    while start < len(tokens):
        end = min(start + max_chunk, len(tokens))
        inside = [b for b in blocks if b[0] < end < b[0] + b[1]]
        if inside:
            if inside[0][0] <= start:
                raise ValueError(f"an image block of {inside[0][1]} tokens does not fit max_chunk={max_chunk}")
            end = inside[0][0]
        n_images = sum(1 for b in blocks if start <= b[0] < end)
        out.append((start, end, image, image + n_images))
        start, image = end, image + n_images
    return out


def pow2(n: int, low: int = 1) -> int:
    """The bucket of a size: the next power of two, at least `low`."""
    return max(low, 1 << (max(int(n), 1) - 1).bit_length())


def pad_images(images: list[dict]) -> dict[str, np.ndarray]:
    """A chunk's image slots in order (`IMAGE_DTYPES`), padded to a power-of-two count with invalid images."""
    joined = {k: np.concatenate([np.asarray(im[k], dt) for im in images]) for k, dt in IMAGE_DTYPES.items()}
    n = len(joined["image_valid"])
    pad = pow2(n) - n
    return {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in joined.items()}
