"""Images the RL task families draw themselves: bar charts, tables, and large scenes for the tool tasks.

Each `*_scene(rng)` is a pure function of a NumPy generator: it returns the PNG bytes and what was drawn
(values, words, boxes in the [0, 1000] frame of `rl.tools`), so a family builds its question and
reference from the same facts the pixels show. The tool scenes are large (long side 1000-1200 px) with
details of 10-16 px: at the models' patch budgets (<= 256 patches of 16 px, about 256 x 256 px) a detail
is 2-4 px, legible only after `crop`. Vocabulary (colours, shapes, words) is shapes world's.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glm5v_jax.data.shapes_world import COLOURS, SHAPES, WORDS, _shape_mask
from glm5v_jax.rl.tools import box_to_pixels

PxBox = tuple[int, int, int, int]  # left, top, right, bottom in pixels (right/bottom exclusive)
LIGHT_BACKGROUNDS = {"white": (250, 250, 250), "light gray": (215, 215, 215), "beige": (225, 212, 180),
                     "pale blue": (200, 220, 240), "pale green": (205, 232, 205)}
INK_COLOURS = tuple(c for c in COLOURS if c not in ("white", "yellow"))  # visible on light backgrounds
SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 5)
TABLE_COLUMNS = ("price", "count", "weight", "score", "age", "height")


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable
    except TypeError:
        return ImageFont.load_default()


def text_size(text: str, size: int) -> tuple[int, int, int, int]:
    """Pillow's bbox (l, t, r, b) of `text` drawn at (0, 0) in the default font of `size`."""
    return ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font(size))


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def normalised(box: PxBox, width: int, height: int) -> list[int]:
    """A pixel box in the [0, 1000] frame, rounded like shapes world's `boxes_json`."""
    return [round(1000 * box[0] / width), round(1000 * box[1] / height), round(1000 * box[2] / width),
            round(1000 * box[3] / height)]


def _distinct(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return [str(pool[i]) for i in rng.choice(len(pool), size=n, replace=False)]


def _canvas(rng: np.random.Generator, long_side: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with the long side in `long_side` and aspect ratio in [3/4, 4/3]."""
    long = int(rng.integers(*long_side))
    short = int(long * rng.uniform(0.75, 1.0))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _free(box: PxBox, taken: Sequence[PxBox], gap: int) -> bool:
    x1, y1, x2, y2 = box
    return not any(x1 < b[2] + gap and b[0] < x2 + gap and y1 < b[3] + gap and b[1] < y2 + gap for b in taken)


def _place(rng: np.random.Generator, w: int, h: int, area: PxBox, taken: Sequence[PxBox], gap: int = 3,
           avoid: Sequence[PxBox] = (), tries: int = 60) -> PxBox | None:
    """A free w x h pixel box inside `area`, `gap` px from every box in `taken` and clear of `avoid`."""
    if area[2] - area[0] <= w or area[3] - area[1] <= h:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(area[0], area[2] - w)), int(rng.integers(area[1], area[3] - h))
        box = (x, y, x + w, y + h)
        if _free(box, taken, gap) and _free(box, avoid, gap):
            return box
    return None


def _shape(img: Image.Image, kind: str, colour: str, box: PxBox) -> PxBox:
    """Draws a shapes-world shape filling `box`; returns its tight pixel box."""
    mask = _shape_mask(kind, box[2] - box[0], box[3] - box[1])
    img.paste(COLOURS[colour], box[:2], mask)
    x0, y0, x1, y1 = mask.getbbox()
    return box[0] + x0, box[1] + y0, box[0] + x1, box[1] + y1


# ---------------------------------------------------------------- charts and tables

def bar_chart_scene(rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A vertical bar chart: 3-6 bars with word labels under them and integer values (1-100) written above
    them, a y axis with three ticks. Info: labels, values, colours, bar pixel boxes, image size."""
    W, H = int(rng.integers(360, 640)), int(rng.integers(280, 460))
    n = int(rng.integers(3, 7))
    labels = _distinct(rng, SHORT_WORDS, n)
    values = [int(v) for v in rng.integers(1, 101, size=n)]
    colours = [str(rng.choice(INK_COLOURS))] * n if rng.random() < 0.5 else _distinct(rng, INK_COLOURS, n)
    fs = max(11, H // 26)
    img = Image.new("RGB", (W, H), LIGHT_BACKGROUNDS["white"])
    d = ImageDraw.Draw(img)
    top_value = max(10, -(-max(values) // 10) * 10)
    left, right, top, bottom = 3 * fs, W - fs, 2 * fs + 4, H - 2 * fs  # plot area
    d.line([left, top, left, bottom], fill=(0, 0, 0), width=1)
    d.line([left, bottom, right, bottom], fill=(0, 0, 0), width=1)
    for tick in (0, top_value // 2, top_value):
        y = bottom - (bottom - top) * tick / top_value
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        x0, y0, x1, y1 = text_size(str(tick), fs)
        d.text((left - 6 - (x1 - x0) - x0, y - (y1 + y0) / 2), str(tick), fill=(0, 0, 0), font=font(fs))
    slot = (right - left) / n
    bars = []
    for i, (label, value, colour) in enumerate(zip(labels, values, colours)):
        x1, x2 = round(left + slot * (i + 0.2)), round(left + slot * (i + 0.8))
        y1 = round(bottom - (bottom - top) * value / top_value)
        d.rectangle([x1, y1, x2 - 1, bottom - 1], fill=COLOURS[colour])
        bars.append((x1, y1, x2, bottom))
        for text, y in ((str(value), y1 - fs - 3), (label, bottom + 4)):
            tx0, ty0, tx1, _ = text_size(text, fs)
            d.text(((x1 + x2 - (tx1 - tx0)) / 2 - tx0, y - ty0), text, fill=(0, 0, 0), font=font(fs))
    return to_png(img), dict(labels=labels, values=values, colours=colours, bars=bars, size=(W, H))


def table_scene(rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A grid table: a header row of 2-3 numeric columns and 3-5 rows named by words, integer cells 1-999.
    Info: rows, columns, cells[row][column], image size."""
    rows = _distinct(rng, SHORT_WORDS, int(rng.integers(3, 6)))
    cols = _distinct(rng, TABLE_COLUMNS, int(rng.integers(2, 4)))
    cells = {r: {c: int(rng.integers(1, 1000)) for c in cols} for r in rows}
    fs = int(rng.integers(14, 20))
    pad = fs // 2
    header = ["item"] + cols
    grid = [header] + [[r] + [str(cells[r][c]) for c in cols] for r in rows]
    widths = [max(text_size(row[j], fs)[2] for row in grid) + 2 * pad for j in range(len(header))]
    row_h = fs + 2 * pad
    W, H = sum(widths) + 2 * pad + 1, row_h * len(grid) + 2 * pad + 1
    img = Image.new("RGB", (W, H), LIGHT_BACKGROUNDS["white"])
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, pad + sum(widths), pad + row_h - 1], fill=(215, 215, 215))
    for i, row in enumerate(grid):
        x = pad
        for j, text in enumerate(row):
            x0, y0, x1, y1 = text_size(text, fs)
            y = pad + i * row_h + (row_h - (y1 - y0)) / 2 - y0
            d.text((x + pad - x0, y), text, fill=(0, 0, 0), font=font(fs))
            x += widths[j]
    for i in range(len(grid) + 1):
        d.line([pad, pad + i * row_h, pad + sum(widths), pad + i * row_h], fill=(0, 0, 0))
    for x in np.cumsum([pad] + widths):
        d.line([int(x), pad, int(x), pad + row_h * len(grid)], fill=(0, 0, 0))
    return to_png(img), dict(rows=rows, columns=cols, cells=cells, size=(W, H))


# ---------------------------------------------------------------- scenes for the tool tasks

def _distractors(rng: np.random.Generator, img: Image.Image, taken: list[PxBox], n: int, size: tuple[int, int],
                 area: PxBox, avoid: Sequence[PxBox] = ()) -> list[dict[str, Any]]:
    """Up to `n` random shapes of `size` px placed in `area`; their label and tight pixel box."""
    out = []
    for _ in range(n):
        kind, colour = str(rng.choice(SHAPES)), str(rng.choice(INK_COLOURS))
        s = int(rng.integers(*size))
        box = _place(rng, s, s, area, taken, avoid=avoid)
        if box is not None:
            taken.append(box)
            out.append(dict(kind=kind, colour=colour, box=_shape(img, kind, colour, box)))
    return out


def tiny_word_scene(rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A large canvas (long side 1000-1200 px) with 3-6 big shapes and a white sign (black border) holding
    a word in 13-16 px type (7-15 px of ink): 2-4 px tall at 256 patches, readable only in a crop. Info:
    word, word_box and sign_box ([0, 1000]), word_px (its pixel box), size."""
    W, H = _canvas(rng, (1000, 1201))
    img = Image.new("RGB", (W, H), LIGHT_BACKGROUNDS[str(rng.choice(list(LIGHT_BACKGROUNDS)[1:]))])
    d = ImageDraw.Draw(img)
    word, fs = str(rng.choice(WORDS)), int(rng.integers(13, 17))
    x0, y0, x1, y1 = text_size(word, fs)
    pad = max(12, y1 - y0)  # the border stays out of a MIN_CROP_PX crop of the word
    sign = _place(rng, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, (20, 20, W - 20, H - 20), [])
    d.rectangle([sign[0], sign[1], sign[2] - 1, sign[3] - 1], fill=(255, 255, 255), outline=(0, 0, 0), width=3)
    wx, wy = sign[0] + pad, sign[1] + pad
    d.text((wx - x0, wy - y0), word, fill=(0, 0, 0), font=font(fs))
    word_px = (wx, wy, wx + x1 - x0, wy + y1 - y0)
    _distractors(rng, img, [sign], int(rng.integers(3, 7)), (60, 200), (0, 0, W, H))
    return to_png(img), dict(word=word, word_px=word_px, word_box=normalised(word_px, W, H),
                             sign_box=normalised(sign, W, H), size=(W, H))


def zoom_count_scene(rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A large canvas scattered with 10-16 px shapes in three colours, and a region (a box in [0, 1000],
    not drawn) holding 0-8 shapes of a target colour among others; no shape straddles its border (4 px
    clear). Info: region, colour, count (target-colour shapes inside), objects, size."""
    W, H = _canvas(rng, (1000, 1201))
    img = Image.new("RGB", (W, H), LIGHT_BACKGROUNDS[str(rng.choice(list(LIGHT_BACKGROUNDS)))])
    rw, rh = int(rng.integers(180, 351)), int(rng.integers(180, 351))  # region size in the 0-1000 frame
    x1, y1 = int(rng.integers(0, 1001 - rw)), int(rng.integers(0, 1001 - rh))
    region = [x1, y1, x1 + rw, y1 + rh]
    rpx = box_to_pixels(region, W, H)  # the pixels `crop` cuts
    inner = (rpx[0] + 4, rpx[1] + 4, rpx[2] - 4, rpx[3] - 4)
    colours = _distinct(rng, INK_COLOURS, 3)
    target = colours[0]
    taken: list[PxBox] = []
    objects: list[dict[str, Any]] = []
    plan = [(target, True)] * int(rng.integers(0, 9))  # (colour, inside the region)
    plan += [(str(c), True) for c in rng.choice(colours[1:], int(rng.integers(2, 7)))]
    plan += [(str(c), False) for c in rng.choice(colours, int(rng.integers(15, 41)))]
    for colour, inside in plan:
        kind, s = str(rng.choice(SHAPES)), int(rng.integers(10, 17))
        area = inner if inside else (0, 0, W, H)
        box = _place(rng, s, s, area, taken, avoid=() if inside else [rpx], gap=4)
        if box is not None:
            taken.append(box)
            objects.append(dict(kind=kind, colour=colour, inside=inside, box=_shape(img, kind, colour, box)))
    count = sum(o["inside"] and o["colour"] == target for o in objects)
    return to_png(img), dict(region=region, region_px=rpx, colour=target, count=count, objects=objects, size=(W, H))


def find_small_scene(rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """A large canvas with 20-40 shapes of 12-20 px, one of which has a label ("colour kind") no other
    shape has. Info: label, box ([0, 1000], tight, as in shapes world), size."""
    W, H = _canvas(rng, (1000, 1201))
    img = Image.new("RGB", (W, H), LIGHT_BACKGROUNDS[str(rng.choice(list(LIGHT_BACKGROUNDS)))])
    taken: list[PxBox] = []
    target = dict(kind=str(rng.choice(SHAPES)), colour=str(rng.choice(INK_COLOURS)))
    s = int(rng.integers(12, 21))
    box = _place(rng, s, s, (0, 0, W, H), taken, gap=4)
    taken.append(box)
    tight = _shape(img, target["kind"], target["colour"], box)
    for _ in range(int(rng.integers(20, 41))):  # distractors: any colour and kind but the target's pair
        kind, colour = str(rng.choice(SHAPES)), str(rng.choice(INK_COLOURS))
        if kind == target["kind"] and colour == target["colour"]:
            continue
        s = int(rng.integers(12, 21))
        b = _place(rng, s, s, (0, 0, W, H), taken, gap=4)
        if b is not None:
            taken.append(b)
            _shape(img, kind, colour, b)
    label = f"{target['colour']} {target['kind']}"
    return to_png(img), dict(label=label, box=normalised(tight, W, H), box_px=tight, size=(W, H))
