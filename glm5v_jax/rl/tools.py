"""On-image tools for multi-step RL episodes (crop/zoom, draw boxes, mark points) and their call syntax.

Coordinates (one convention, everywhere): integers in [0, 1000] relative to the width and height of the
image the call names, x first; a box is [x1, y1, x2, y2] with x1 <= x2, y1 <= y2 (x2, y2 exclusive), a
point [x, y]. This is the data's frame (`data.templates.format_boxes`, `data.answer_scoring`): pixel
x = x * W / 1000. An image a tool returns has its own [0, 1000] frame.

Call syntax (GLM-4.5's, plain text in the assistant's message; one call per turn):

    <tool_call>crop
    <arg_key>box</arg_key>
    <arg_value>[100,200,400,500]</arg_value>
    </tool_call>

The name is on the first line, then key/value pairs; a value is parsed as JSON, falling back to the raw
string. Every tool takes an optional `image`: the index of an image of the conversation (the task's
images, then each tool's output, in order), default the latest. Text around the call (reasoning) is
ignored; a message without `<tool_call>` is a final answer (`call_tools` returns None). A malformed
call -- unknown or unavailable tool, text outside the pairs, a duplicate, missing or unknown argument, a
value of the wrong type, coordinates outside [0, 1000] (rejected, not clamped, so the policy learns the
frame) or reversed, an image index out of range, more than one call, no `</tool_call>` -- is an
`Observation` whose `error` says exactly what was wrong, never an exception: the episode goes on.

`crop` clamps its pixel box to the image, enlarges it around its centre to at least `MIN_CROP_PX` per
side (verl's `image_zoom_in_tool` MIN_DIMENSION=28), and upsamples (bicubic, aspect kept) a crop whose
short side is under `ZOOM_SHORT_SIDE` px to that size (the long side at most `MAX_SIDE`). NaFlex would
upsample a small image anyway; the zoom makes the returned image legible on its own (logs, judges).
Pure NumPy/Pillow; images are uint8 [H, W, 3] arrays here and PNG bytes in the conversation.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COORD_MAX = 1000  # coordinates are integers in [0, COORD_MAX]
MIN_CROP_PX = 28  # a crop is at least this many pixels per side (or the whole side of a smaller image)
ZOOM_SHORT_SIDE = 224  # a crop with a shorter short side is upsampled to this
MAX_SIDE = 2048  # ... but never beyond this long side
MAX_ITEMS = 32  # most boxes or points one call may draw
MARK_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 0, 255), (0, 200, 200), (255, 140, 0))
OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ToolCallError(ValueError):
    """A malformed tool call; the message is the observation the policy reads."""


# ---------------------------------------------------------------- the tools (arrays in, arrays out)

def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A [0, 1000] box as a pixel box (left, top, right, bottom; right/bottom exclusive) that covers it,
    clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = int(np.floor(min(max(x1, 0), COORD_MAX) * width / COORD_MAX))
    top = int(np.floor(min(max(y1, 0), COORD_MAX) * height / COORD_MAX))
    right = int(np.ceil(min(max(x2, 0), COORD_MAX) * width / COORD_MAX))
    bottom = int(np.ceil(min(max(y2, 0), COORD_MAX) * height / COORD_MAX))
    return left, top, max(left, right), max(top, bottom)


def _grow(lo: int, hi: int, size: int, minimum: int) -> tuple[int, int]:
    """[lo, hi) enlarged around its centre to at least min(minimum, size) pixels, shifted inside [0, size)."""
    need = min(minimum, size)
    if hi - lo >= need:
        return lo, hi
    lo = int(round((lo + hi - need) / 2))
    lo = min(max(lo, 0), size - need)
    return lo, lo + need


def crop_pixels(box: Sequence[float], width: int, height: int, min_px: int = MIN_CROP_PX) -> tuple[int, ...]:
    """The pixel box `crop` cuts: `box_to_pixels`, then each side enlarged to at least `min_px`."""
    left, top, right, bottom = box_to_pixels(box, width, height)
    left, right = _grow(left, right, width, min_px)
    top, bottom = _grow(top, bottom, height, min_px)
    return left, top, right, bottom


def crop(image: np.ndarray, box: Sequence[float], *, min_px: int = MIN_CROP_PX,
         short_side: int = ZOOM_SHORT_SIDE, max_side: int = MAX_SIDE) -> np.ndarray:
    """Zoom: the region `box` ([0, 1000] frame) of `image` [H, W, 3], at least `min_px` per side, upsampled
    (bicubic, aspect kept) so its short side is at least `short_side` (0: no upsampling) and its long side
    at most `max_side`."""
    h, w = image.shape[:2]
    left, top, right, bottom = crop_pixels(box, w, h, min_px)
    out = np.ascontiguousarray(image[top:bottom, left:right])
    ch, cw = out.shape[:2]
    if short_side and min(ch, cw) < short_side:
        scale = min(short_side / min(ch, cw), max(1.0, max_side / max(ch, cw)))
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        out = np.asarray(Image.fromarray(out).resize(size, Image.Resampling.BICUBIC))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable
    except TypeError:
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: tuple[int, ...], size: int,
           bounds: tuple[int, int]) -> None:
    """`text` in white on a `colour` patch whose top-left is near `xy`, kept inside the image."""
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(1, size // 6)
    tw, th = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    x = min(max(xy[0], 0), max(0, bounds[0] - tw))
    y = min(max(xy[1], 0), max(0, bounds[1] - th))
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour)
    draw.text((x + pad - x0, y + pad - y0), text, fill=(255, 255, 255), font=font)


def line_width(width: int, height: int) -> int:
    """Outline width of `draw_boxes` and marker scale of `mark_points`: about 1/300 of the short side."""
    return max(2, round(min(width, height) / 300))


def label_size(width: int, height: int) -> int:
    """Font size of box and point labels: 1/50 of the short side, at least 10 px."""
    return max(10, min(width, height) // 50)


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None) -> np.ndarray:
    """A copy of `image` with each [0, 1000] box outlined just outside its pixel box (`line_width` px, so
    what the box holds stays visible; colours cycle through MARK_COLOURS), and its label, if any, on a
    patch above the box (moved inside the image at the edges)."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    lw = line_width(w, h)
    for i, box in enumerate(boxes):
        colour = MARK_COLOURS[i % len(MARK_COLOURS)]
        left, top, right, bottom = box_to_pixels(box, w, h)
        draw.rectangle([left - lw, top - lw, max(left, right - 1) + lw, max(top, bottom - 1) + lw], outline=colour,
                       width=lw)
        if labels:
            size = label_size(w, h)
            _label(draw, (left - lw, top - lw - size - size // 2), str(labels[i]), colour, size, (w, h))
    return np.asarray(img)


def mark_points(image: np.ndarray, points: Sequence[Sequence[float]],
                labels: Sequence[str] | None = None) -> np.ndarray:
    """A copy of `image` with a filled disc (radius 2 x `line_width`, white rim) at each [0, 1000] point,
    and its label, if any, to the right of it."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    r = 2 * line_width(w, h)
    for i, (x, y) in enumerate(points):
        colour = MARK_COLOURS[i % len(MARK_COLOURS)]
        px, py = min(x * w / COORD_MAX, w - 1), min(y * h / COORD_MAX, h - 1)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=colour, outline=(255, 255, 255), width=1)
        if labels:
            size = label_size(w, h)
            _label(draw, (int(px + r + 2), int(py - size // 2)), str(labels[i]), colour, size, (w, h))
    return np.asarray(img)


# ---------------------------------------------------------------- argument schema and the registry

def _coords(value: Any, n: int, what: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ToolCallError(f"{what} must be a JSON list of {n} integers, got {_show(value)}")
    bad = [v for v in value if not 0 <= v <= COORD_MAX]
    if bad:
        raise ToolCallError(f"{what} {_show(value)} has coordinates outside [0, {COORD_MAX}]: {bad}")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    if isinstance(value, str) and value.lstrip()[:1] in "[{":
        text += " (not valid JSON)"
    return text if len(text) <= 80 else text[:77] + "..."


def parse_box(value: Any, what: str = "box") -> list[int]:
    """[x1, y1, x2, y2]: four integers in [0, 1000], x1 <= x2 and y1 <= y2."""
    box = _coords(value, 4, what)
    if box[2] < box[0] or box[3] < box[1]:
        raise ToolCallError(f"{what} {_show(value)} is reversed: need x1 <= x2 and y1 <= y2 in [x1, y1, x2, y2]")
    return box


def _many(value: Any, n: int, what: str, one: Callable[[Any, str], list[int]]) -> list[list[int]]:
    if isinstance(value, list) and len(value) == n and all(isinstance(v, int) for v in value):
        value = [value]  # a single box / point is a list of one
    if not isinstance(value, list) or not value:
        raise ToolCallError(f"{what} must be a non-empty JSON list, got {_show(value)}")
    if len(value) > MAX_ITEMS:
        raise ToolCallError(f"{what}: at most {MAX_ITEMS} per call, got {len(value)}")
    return [one(v, f"{what}[{i}]") for i, v in enumerate(value)]


def parse_boxes(value: Any, what: str = "boxes") -> list[list[int]]:
    """A list of boxes (or one box)."""
    return _many(value, 4, what, parse_box)


def parse_points(value: Any, what: str = "points") -> list[list[int]]:
    """A list of [x, y] points (or one point)."""
    return _many(value, 2, what, lambda v, w: _coords(v, 2, w))


def parse_labels(value: Any, what: str = "labels") -> list[str]:
    """A list of short strings (one per box or point)."""
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise ToolCallError(f"{what} must be a JSON list of strings, got {_show(value)}")
    return [str(v)[:40] for v in value]


def parse_image(value: Any, what: str = "image") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolCallError(f"{what} must be an integer image index, got {_show(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument: `parse` checks a JSON value and returns it normalised (raising ToolCallError)."""

    name: str
    parse: Callable[[Any, str], Any]
    required: bool
    doc: str


@dataclasses.dataclass(frozen=True)
class Tool:
    """`run(image [H, W, 3], **args) -> (new image, what it shows)`; `args` is the schema (`image` implicit)."""

    name: str
    doc: str
    args: tuple[Arg, ...]
    run: Callable[..., tuple[np.ndarray, str]]
    example: str


def _run_crop(image, box):
    out = crop(image, box)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop_pixels(box, w, h)
    return out, f"the crop of pixels x {x0}..{x1}, y {y0}..{y1}, zoomed to {out.shape[1]}x{out.shape[0]} px"


def _run_draw(image, boxes, labels=None):
    return draw_boxes(image, boxes, labels), f"{len(boxes)} box{'es' if len(boxes) > 1 else ''} drawn"


def _run_mark(image, points, labels=None):
    return mark_points(image, points, labels), f"{len(points)} point{'s' if len(points) > 1 else ''} marked"


_IMAGE = Arg("image", parse_image, False, "index of the image to use (0 = first); default the latest")
TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("crop", "Zoom in: returns the region `box` of an image, enlarged.",
         (Arg("box", parse_box, True, "[x1,y1,x2,y2], the region to zoom into"), _IMAGE), _run_crop,
         "[100,200,400,500]"),
    Tool("draw_boxes", "Returns a copy of an image with boxes outlined (to check a box before answering).",
         (Arg("boxes", parse_boxes, True, "[[x1,y1,x2,y2], ...]"),
          Arg("labels", parse_labels, False, '["a", ...], one per box'), _IMAGE), _run_draw,
         "[[100,200,400,500]]"),
    Tool("mark_points", "Returns a copy of an image with points marked (to check a point before answering).",
         (Arg("points", parse_points, True, "[[x,y], ...]"),
          Arg("labels", parse_labels, False, '["a", ...], one per point'), _IMAGE), _run_mark,
         "[[250,600]]"),
)}


def describe_tools(names: Sequence[str]) -> str:
    """The system-prompt text that describes the tools `names`: convention, syntax, each tool's arguments
    ("" for no tools)."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise KeyError(f"unknown tools {unknown}; known: {sorted(TOOLS)}")
    if not names:
        return ""
    lines = ["You can call tools on the images. Coordinates are integers from 0 to 1000 relative to the "
             "width and height of the image used (x first); a box is [x1,y1,x2,y2]. Each image a tool "
             "returns is added after the others and has its own 0-1000 frame. Call one tool per turn as:",
             "<tool_call>NAME", "<arg_key>ARGUMENT</arg_key>", "<arg_value>JSON VALUE</arg_value>",
             "</tool_call>", "When you know the answer, reply with the answer only, without a tool call.",
             "Tools:"]
    for n in names:
        t = TOOLS[n]
        args = "; ".join(f"{a.name}{'' if a.required else ' (optional)'}: {a.doc}" for a in t.args)
        lines.append(f"- {t.name}: {t.doc} Arguments: {args}.")
    t = TOOLS[names[0]]
    lines += ["Example:", f"<tool_call>{t.name}", f"<arg_key>{t.args[0].name}</arg_key>",
              f"<arg_value>{t.example}</arg_value>", "</tool_call>"]
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing and calling

@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    args: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Observation:
    """What a tool call gives back: `text` for the observation turn, `images` (PNG) that join the
    conversation, `error` (also in `text`) when the call was malformed or failed."""

    text: str
    images: tuple[bytes, ...] = ()
    error: str | None = None


_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.strip()


def parse_tool_call(text: str) -> ToolCall | None:
    """The one tool call in `text` (name and JSON-decoded raw arguments), None when there is none; raises
    ToolCallError for a malformed one."""
    n = text.count(OPEN)
    if n == 0:
        return None
    if n > 1:
        raise ToolCallError(f"found {n} tool calls; make exactly one call per turn")
    start = text.index(OPEN) + len(OPEN)
    end = text.find(CLOSE, start)
    if end < 0:
        raise ToolCallError(f"unterminated tool call: {OPEN} without {CLOSE}")
    body = text[start:end]
    cut = min([i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0], default=len(body))
    name, rest = body[:cut].strip(), body[cut:]
    if not name:
        raise ToolCallError(f"missing tool name: put it right after {OPEN}, on the first line")
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(rest):
        m = _PAIR.match(rest, pos)
        if m is None:
            stray = rest[pos:].strip()
            if not stray:
                break
            raise ToolCallError(f"unexpected text in the {name} call: {stray[:60]!r}; expected "
                                "<arg_key>KEY</arg_key><arg_value>VALUE</arg_value> pairs")
        key = m.group(1).strip()
        if key in args:
            raise ToolCallError(f"argument {key!r} given twice in the {name} call")
        args[key] = _value(m.group(2))
        pos = m.end()
    return ToolCall(name, args)


def _checked(call: ToolCall, allowed: Sequence[str], n_images: int) -> tuple[Tool, int, dict[str, Any]]:
    """The tool, image index and parsed arguments of a call, or ToolCallError."""
    if call.name not in TOOLS or call.name not in allowed:
        where = f"available here: {', '.join(allowed)}" if allowed else "no tools are available here; answer"
        kind = "unknown tool" if call.name not in TOOLS else "tool not available in this task:"
        raise ToolCallError(f"{kind} {call.name!r}; {where}")
    tool = TOOLS[call.name]
    schema = {a.name: a for a in tool.args}
    extra = sorted(set(call.args) - set(schema))
    if extra:
        raise ToolCallError(f"unknown argument {extra[0]!r} for {tool.name}; its arguments: {', '.join(schema)}")
    missing = [a.name for a in tool.args if a.required and a.name not in call.args]
    if missing:
        raise ToolCallError(f"missing argument {missing[0]!r} for {tool.name}")
    parsed = {k: schema[k].parse(v, k) for k, v in call.args.items()}
    if n_images == 0:
        raise ToolCallError("there is no image to use")
    index = parsed.pop("image", n_images - 1)
    if not 0 <= index < n_images:
        raise ToolCallError(f"image index {index} out of range: the conversation has {n_images} "
                            f"image{'s' if n_images > 1 else ''} (0..{n_images - 1})")
    items = parsed.get("boxes", parsed.get("points"))
    if "labels" in parsed and len(parsed["labels"]) != len(items):
        raise ToolCallError(f"labels: {len(parsed['labels'])} labels for {len(items)} "
                            f"{'boxes' if 'boxes' in parsed else 'points'}")
    return tool, index, parsed


def decode_png(data: bytes) -> np.ndarray:
    """Encoded image bytes as uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def call_tools(text: str, images: Sequence[bytes], allowed: Sequence[str]) -> Observation | None:
    """Run the tool call in the assistant's `text` on the conversation's `images`: None when `text` has no
    call (a final answer), else an Observation -- the new image and what it is, or the error."""
    try:
        call = parse_tool_call(text)
        if call is None:
            return None
        tool, index, args = _checked(call, tuple(n for n in allowed if n in TOOLS), len(images))
        try:
            source = decode_png(images[index])
        except (OSError, ValueError) as e:  # a broken image in the conversation: still an observation
            raise ToolCallError(f"image {index} could not be decoded ({e})") from None
        out, what = tool.run(source, **args)
        new = len(images)
        return Observation(f"Image {new}: {what} (from image {index}, {tool.name}).", (encode_png(out),))
    except ToolCallError as e:
        return Observation(f"Error: {e}", (), str(e))
