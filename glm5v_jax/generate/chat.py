"""Chat prompts for the engine: OpenAI-style messages (text and images) in the GLM chat template.

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": png_bytes},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    tokens, images = render_messages(tokenizer, messages, model.spec)
    engine.submit(Request(messages=messages))       # the same, inside an Engine(..., tokenizer=tokenizer)

The template is training's (`data.templates.chat_document`):

    [gMASK]<sop><|system|>\\n{system}<|user|>\\n{content}<|assistant|>\\n{answer}<|user|>\\n ... <|assistant|>\\n

Each message opens with its role's token and a newline (roles: system, user, assistant, observation, the
last for a tool's result); a content is a string or a list of parts, text (a string or `{"type": "text",
"text": ...}`) or an image (`{"type": "image", "image": encoded bytes | uint8 [H, W, 3]}`), which becomes
`<|begin_of_image|>` + n `<|image|>` + `<|end_of_image|>` where it stands (n from the image's NaFlex grid
at the model's patch budget, preprocessed as in training). A rendered prompt ends with `<|assistant|>\\n`
unless its last message is the assistant's (then the model continues that message).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from glm5v_jax.data.pipeline import preprocess_image

ROLE_TOKENS = {"system": "system_id", "user": "user_id", "assistant": "assistant_id",
               "observation": "observation_id"}  # role -> the Tokenizer property of its opening token


def chat_stops(tokenizer) -> list[int]:
    """The ids that end an assistant turn: `<|endoftext|>`, and the next role's opening (`<|user|>`, or
    `<|observation|>` after a tool call)."""
    return [tokenizer.eos_id, tokenizer.user_id, tokenizer.observation_id]


def image_inputs(image: bytes | np.ndarray, spec: Any) -> tuple[dict[str, np.ndarray], int]:
    """An encoded image (or a uint8 `[H, W, 3]` array) as one image slot of a chunk, preprocessed as in
    training (NaFlex at the model's patch budget), and its number of `<|image|>` tokens."""
    v = spec.vision
    try:
        x = preprocess_image(image, patch_size=v.patch_size, max_patches=v.max_patches, merge=v.merge_size)
    except Exception as e:  # noqa: BLE001 - the pipeline's skip reasons (undecodable, too small, empty)
        raise ValueError(f"the image cannot be used: {e}") from None
    arrays = {"patches": x["patches"][None], "patch_yx": x["patch_yx"][None], "patch_valid": x["valid"][None],
              "image_grid": x["grid"][None], "image_valid": np.ones((1,), bool)}
    gh, gw = (int(g) // v.merge_size for g in x["grid"])
    return arrays, gh * gw


def _parts(message: Any, where: str) -> tuple[str, list[tuple[str, Any]]]:
    """(role, [("text", str) | ("image", payload)]) of one message, or ValueError naming the field."""
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} must be a mapping with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLE_TOKENS:
        raise ValueError(f"{where}.role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
    content = message.get("content", "")
    if isinstance(content, str):
        return role, [("text", content)]
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            parts.append(("text", part))
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(("text", part["text"]))
        elif isinstance(part, Mapping) and part.get("type") == "image":
            if role == "system":
                raise ValueError(f"{where}.content[{i}]: a system message takes no image")
            parts.append(("image", part.get("image")))
        else:
            raise ValueError(f"{where}.content[{i}] must be text or {{'type': 'text', 'text': str}} or "
                             f"{{'type': 'image', 'image': bytes | uint8 array}}, got {part!r:.80}")
    return role, parts


def chat_tokens(tokenizer, messages: Sequence[Mapping[str, Any]], image_tokens: Sequence[int] = (), *,
                start: bool = True, after: int | None = None) -> list[int]:
    """The ids of `messages` in the chat template, the i-th image part as `image_tokens[i]` `<|image|>`s.

    start: open with `[gMASK]<sop>` (False for a turn appended to a held conversation); after: the id the
    conversation already ends with (a held turn's stop, e.g. `<|user|>`): a first message that opens with
    it does not repeat it.
    """
    t = tokenizer
    ids = [t.gmask_id, t.sop_id] if start else []
    newline = t.encode("\n")
    images = iter(image_tokens)
    role = None
    for m, message in enumerate(messages):
        role, parts = _parts(message, f"messages[{m}]")
        opening = getattr(t, ROLE_TOKENS[role])
        ids += ([] if (m == 0 and opening == after) else [opening]) + newline
        for kind, value in parts:
            if kind == "text":
                ids += t.encode(value) if value else []
                continue
            n = next(images, None)
            if n is None:
                raise ValueError(f"messages[{m}] has more image parts than the {len(image_tokens)} image sizes given")
            ids += [t.begin_image_id] + [t.image_id] * n + [t.end_image_id]
    if role is None:
        raise ValueError("messages must hold at least one message")
    if next(images, None) is not None:
        raise ValueError(f"{len(image_tokens)} image sizes given for fewer image parts in the messages")
    if role != "assistant":
        ids += [t.assistant_id] + newline
    return ids


def render_messages(tokenizer, messages: Sequence[Mapping[str, Any]], spec: Any, *, start: bool = True,
                    after: int | None = None) -> tuple[list[int], dict[str, np.ndarray] | None]:
    """(ids, image slots in the order of their blocks, concatenated; None without images) of `messages`:
    each image part preprocessed with `image_inputs` for the model `spec`. ValueError names the message."""
    slots, counts = [], []
    for m, message in enumerate(messages):
        for kind, value in _parts(message, f"messages[{m}]")[1]:
            if kind != "image":
                continue
            try:
                arrays, n = image_inputs(value, spec)
            except ValueError as e:
                raise ValueError(f"messages[{m}]: {e}") from None
            slots.append(arrays)
            counts.append(n)
    ids = chat_tokens(tokenizer, messages, counts, start=start, after=after)
    images = {k: np.concatenate([s[k] for s in slots]) for k in slots[0]} if slots else None
    return ids, images


def chat_prompt(tokenizer, prompt: str, *, image_tokens: int = 0, system: str = "") -> list[int]:
    """The ids of one user turn (an image of `image_tokens` tokens first, if any), up to the answer."""
    content = ([{"type": "image"}] if image_tokens else []) + [prompt]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return chat_tokens(tokenizer, messages, [image_tokens] if image_tokens else [])
