"""Shapes world: a procedurally generated, bilingual image-text dataset.

Why: the VLM needs real image-text data for end-to-end training runs, tests and
demos, with no network access and no licensing questions. Every example is a
pure function of (seed, split, index) via ``np.random.default_rng([seed,
split_code, index])``, so examples can be generated independently, in any order
and in parallel, and a dataset rebuilt anywhere is byte-identical (for a given
Pillow version, which renders the PNGs and the text).

What: images of 32..512 px per side (aspect 1:4..4:1) on a plain or lightly
noisy background with 1..6 shapes (8 kinds, 8 named colours; exactly one in the
``single_object_*`` splits, whose shape and colour are clean evaluation labels)
and, in about 30% of images, a rendered English word. Annotations: English and Chinese captions,
question/answer pairs (count, colour, position), normalised (0..1000) tight
boxes per shape and the OCR word. A text-only split holds short documents about
shapes, colours and arithmetic, sometimes with Chinese sentences.

Only NumPy and Pillow are used; the TFDS builder lives in ``shapes_world_tfds``.
"""
from __future__ import annotations

import functools
import io
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLIT_SIZES: dict[str, int] = dict(train=6000, validation=300, text_train=3000, text_validation=150,
                                   single_object_train=0, single_object_validation=0)
SPLIT_CODES: dict[str, int] = dict(train=0, validation=1, text_train=2, text_validation=3, single_object_train=4,
                                   single_object_validation=5)
# Exactly one object per image: clean shape and colour labels for k-NN and zero-shot evaluation.
SINGLE_OBJECT_SPLITS = ("single_object_train", "single_object_validation")
IMAGE_SPLITS = ("train", "validation") + SINGLE_OBJECT_SPLITS
TEXT_SPLITS = ("text_train", "text_validation")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (130, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (250, 250, 250)}
COLOURS_ZH = dict(red="红色", green="绿色", blue="蓝色", yellow="黄色", purple="紫色", orange="橙色",
                  black="黑色", white="白色")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "light gray": (205, 205, 205), "dark gray": (60, 60, 60),
    "beige": (225, 212, 180), "pale blue": (185, 210, 235), "pale green": (195, 228, 195)}
BACKGROUNDS_ZH = {"gray": "灰色", "light gray": "浅灰色", "dark gray": "深灰色", "beige": "米色",
                  "pale blue": "浅蓝色", "pale green": "浅绿色"}
SHAPES = ("circle", "square", "triangle", "rectangle", "star", "diamond", "ellipse", "cross")
SHAPES_ZH = dict(circle="圆形", square="正方形", triangle="三角形", rectangle="长方形", star="五角星",
                 diamond="菱形", ellipse="椭圆形", cross="十字形")
PLURALS = {s: s + "es" if s == "cross" else s + "s" for s in SHAPES}
SINGULARS = {p: s for s, p in PLURALS.items()}
CORNERS = dict(triangle=3, square=4, rectangle=4, diamond=4, star=10, cross=12)
NUM_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUM_ZH = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九", "十")
WORDS = tuple("""apple tree house cat dog sun moon star fish bird book door hat car bus boat cake
milk rain snow wind fire lake hill road park city farm king queen ship lamp desk chair table
cup bowl ring bell drum song game ball kite shoe sock coat bag box key lock map pen ink
paper card gift leaf rose seed corn rice bread egg jam tea salt home room wall roof gate
bridge river stone sand wave shell frog bear lion wolf duck goat horse mouse owl bee ant
red blue green gold time day night love hope play jump run sing walk read""".split())
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"),
           ("bottom left", "bottom", "bottom right"))
REGIONS_ZH = dict(zip(sum(REGIONS, ()), ("左上角", "上方", "右上角", "左侧", "中间", "右侧",
                                         "左下角", "下方", "右下角")))
TEXT_PROB = 0.34  # some texts do not fit; about 30% of images end up with a word


def _split_code(split: str) -> int:
  if split not in SPLIT_CODES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
  return SPLIT_CODES[split]


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
  except TypeError:
    return ImageFont.load_default()


def _shape_mask(kind: str, w: int, h: int) -> Image.Image:
  """A w x h mode-"L" mask (255 inside) of one shape."""
  m = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(m)
  if kind in ("circle", "ellipse"):
    d.ellipse([0, 0, w - 1, h - 1], fill=255)
  elif kind in ("square", "rectangle"):
    d.rectangle([0, 0, w - 1, h - 1], fill=255)
  elif kind == "triangle":
    d.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
  elif kind == "diamond":
    d.polygon([(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)], fill=255)
  elif kind == "cross":
    t = max(2, round(min(w, h) / 3))
    d.rectangle([(w - t) // 2, 0, (w - t) // 2 + t - 1, h - 1], fill=255)
    d.rectangle([0, (h - t) // 2, w - 1, (h - t) // 2 + t - 1], fill=255)
  elif kind == "star":
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    pts = [((w - 1) / 2 * (1 + r * np.cos(a)), (h - 1) / 2 * (1 + r * np.sin(a))) for r, a in zip(rad, ang)]
    d.polygon(pts, fill=255)
  else:
    raise ValueError(kind)
  return m


def _overlaps(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]], gap: int = 2) -> bool:
  x1, y1, x2, y2 = box
  return any(x1 < b2 + gap and b1 < x2 + gap and y1 < c2 + gap and c1 < y2 + gap for b1, c1, b2, c2 in taken)


def _place(rng: np.random.Generator, w: int, h: int, W: int, H: int, taken: list) -> tuple[int, int] | None:
  if w > W - 2 or h > H - 2:
    return None
  for _ in range(30):
    x, y = int(rng.integers(1, W - w)), int(rng.integers(1, H - h))
    if not _overlaps((x, y, x + w, y + h), taken):
      return x, y
  return None


def _count_phrase(n: int, colour: str, kind: str) -> str:
  if n == 1:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind}"
  return f"{NUM_EN[n]} {colour} {PLURALS[kind]}"


def _join_en(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _join_zh(items: list[str]) -> str:
  return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def _region(cx: float, cy: float, W: int, H: int) -> str:
  return REGIONS[min(2, int(3 * cy / H))][min(2, int(3 * cx / W))]


def _captions(rng, objs, bg: str, word: str, region: str) -> tuple[str, str]:
  groups = sorted(Counter((o["colour"], o["kind"]) for o in objs).items(), key=lambda kv: (-kv[1], kv[0]))
  en = _join_en([_count_phrase(n, c, k) for (c, k), n in groups])
  zh = _join_zh([f"{NUM_ZH[n]}个{COLOURS_ZH[c]}的{SHAPES_ZH[k]}" for (c, k), n in groups])
  is_are = "is" if len(objs) == 1 else "are"
  t = int(rng.integers(4))
  cap_en = [f"{en[0].upper() + en[1:]} on a {bg} background.", f"There {is_are} {en} in this picture.",
            f"This image shows {en} against a {bg} background.", f"A {bg} background with {en}."][t]
  cap_zh = [f"图中有{zh}。", f"{BACKGROUNDS_ZH[bg]}背景上有{zh}。", f"这张图片里有{zh}，背景是{BACKGROUNDS_ZH[bg]}。",
            f"画面中可以看到{zh}。"][t]
  if word:
    where = "in the center" if region == "center" else f"in the {region}"
    cap_en += [f' The word "{word}" is written {where}.', f' It also says "{word}" {where}.'][t % 2]
    cap_zh += [f"{REGIONS_ZH[region]}写着单词“{word}”。", f"图片{REGIONS_ZH[region]}有一个单词“{word}”。"][t % 2]
  return cap_en, cap_zh


def _qa(rng, objs, W: int, H: int) -> list[dict[str, str]]:
  cands: dict[str, list[tuple[str, str]]] = {"count": [], "colour": [], "position": []}
  colours = Counter(o["colour"] for o in objs)
  kinds = Counter(o["kind"] for o in objs)
  labels = Counter(o["label"] for o in objs)
  cands["count"].append(("How many shapes are there?", str(len(objs))))
  for c in sorted(colours) + [str(rng.choice(list(COLOURS)))]:
    cands["count"].append((f"How many {c} shapes are there?", str(colours.get(c, 0))))
  for k in sorted(kinds):
    cands["count"].append((f"How many {PLURALS[k]} are there?", str(kinds[k])))
  for k in sorted(kinds):
    same = {o["colour"] for o in objs if o["kind"] == k}
    if len(same) == 1:  # only ask when unambiguous
      cands["colour"].append((f"What colour is the {k}?" if kinds[k] == 1 else f"What colour are the {PLURALS[k]}?",
                              same.pop()))
  uniq = [o for o in objs if labels[o["label"]] == 1]
  for i, a in enumerate(uniq):
    for b in uniq[i + 1:]:
      dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
      if abs(dx) > 0.1 * W:
        cands["position"].append((f"Is the {a['label']} left of the {b['label']}?", "yes" if dx < 0 else "no"))
      if abs(dy) > 0.1 * H:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        top = a if dy < 0 else b
        cands["position"].append((f"Which is higher, the {first['label']} or the {second['label']}?",
                                  f"the {top['label']}"))
  for o in uniq:
    cands["position"].append((f"Where is the {o['label']}?", _region(o["cx"], o["cy"], W, H)))
  n = int(rng.integers(2, 5))
  order = [k for k in rng.permutation(list(cands)) if cands[k]]
  out: list[dict[str, str]] = []
  seen: set[str] = set()
  for step in range(40):  # round-robin over kinds so each kind appears when possible
    if len(out) >= n:
      break
    kind = order[step % len(order)]
    q, a = cands[kind][int(rng.integers(len(cands[kind])))]
    if q not in seen:
      seen.add(q)
      out.append({"q": q, "a": a, "kind": kind})
  return out


def _empty(kind: str) -> dict[str, Any]:
  return dict(image=b"", width=0, height=0, caption_en="", caption_zh="", ocr="", qa_json="[]",
              boxes_json="[]", kind=kind, text="")


def _dumps(x: Any) -> str:
  return json.dumps(x, ensure_ascii=False, sort_keys=True)


def generate_image_example(seed: int, split: str, index: int, *, encode: bool = True) -> dict[str, Any]:
  """One image example; ``encode=False`` skips the PNG (image=b"") for text-only uses."""
  rng = np.random.default_rng([seed, _split_code(split), index])
  aspect = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
  side = float(np.exp(rng.uniform(np.log(40), np.log(400))))
  W = int(np.clip(round(side * aspect ** 0.5), 32, 512))
  H = int(np.clip(round(side / aspect ** 0.5), 32, 512))
  bg = str(rng.choice(list(BACKGROUNDS)))
  bg_rgb = np.array(BACKGROUNDS[bg])
  noise = int(rng.choice([0, 0, 4, 8]))
  arr = np.broadcast_to(bg_rgb, (H, W, 3))
  if noise:  # a child generator so that skipping encode leaves the main stream unchanged
    arr = arr + np.random.default_rng([seed, _split_code(split), index, 1]).integers(-noise, noise + 1, (H, W, 3))
  img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB") if encode else None
  palette = [c for c, rgb in COLOURS.items() if np.linalg.norm(np.array(rgb) - bg_rgb) > 110]
  n_objs, want_text = int(rng.integers(1, 7)), rng.random() < TEXT_PROB
  if split in SINGLE_OBJECT_SPLITS:
    n_objs = 1  # the same random stream, one object
  word = str(rng.choice(WORDS)) if want_text else ""
  min_side, taken, objs = min(W, H), [], []
  text_box, region = None, ""
  for i in range(n_objs):
    kind, colour = str(rng.choice(SHAPES)), str(rng.choice(palette))
    size = max(8.0, min_side * rng.uniform(0.15, 0.45))
    w = h = int(round(size))
    if kind in ("rectangle", "ellipse"):
      short = max(4, int(round(size * rng.uniform(0.4, 0.65))))
      w, h = (w, short) if rng.random() < 0.5 else (short, w)
    pos = _place(rng, w, h, W, H, taken)
    if pos is None:
      continue
    mask = _shape_mask(kind, w, h)
    bx1, by1, bx2, by2 = mask.getbbox()
    box = (pos[0] + bx1, pos[1] + by1, pos[0] + bx2, pos[1] + by2)  # tight, x2/y2 exclusive
    taken.append(box)
    if img is not None:
      img.paste(COLOURS[colour], pos, mask)
    objs.append(dict(kind=kind, colour=colour, label=f"{colour} {kind}", box=box,
                     cx=(box[0] + box[2]) / 2, cy=(box[1] + box[3]) / 2))
    if i == 0 and word:  # place the word after the first shape, so there is always one shape
      font = _font(int(np.clip(round(min_side * rng.uniform(0.12, 0.2)), 9, 48)))
      left, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
      pos = _place(rng, r - left, b - t, W, H, taken)
      if pos is None:
        word = ""
      else:
        text_box = (pos[0], pos[1], pos[0] + r - left, pos[1] + b - t)
        taken.append(text_box)
        region = _region((text_box[0] + text_box[2]) / 2, (text_box[1] + text_box[3]) / 2, W, H)
        if img is not None:
          ink = (10, 10, 10) if bg_rgb.mean() > 128 else (250, 250, 250)
          ImageDraw.Draw(img).text((pos[0] - left, pos[1] - t), word, fill=ink, font=font)
  if not objs:
    raise AssertionError("unreachable: the first shape always fits")  # min 8px shape, >= 32px image
  cap_en, cap_zh = _captions(rng, objs, bg, word, region)
  qa = _qa(rng, objs, W, H)
  boxes = [{"label": o["label"], "box": [round(1000 * o["box"][0] / W), round(1000 * o["box"][1] / H),
                                         round(1000 * o["box"][2] / W), round(1000 * o["box"][3] / H)]}
           for o in objs]
  png = b""
  if img is not None:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    png = buf.getvalue()
  return dict(_empty("image"), image=png, width=W, height=H, caption_en=cap_en, caption_zh=cap_zh,
              ocr=word, qa_json=_dumps(qa), boxes_json=_dumps(boxes))


def _sentence(rng: np.random.Generator, zh: bool) -> str:
  t = int(rng.integers(7))
  c, k = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
  a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
  n = int(rng.integers(1, 7))
  if t == 0:
    return f"{a}加{b}等于{a + b}。" if zh else f"{a} plus {b} is {a + b}."
  if t == 1:
    a, b = max(a, b), min(a, b)
    return f"{a}减{b}等于{a - b}。" if zh else f"{a} minus {b} is {a - b}."
  if t == 2:
    return f"{a}乘以{b}等于{a * b}。" if zh else f"{a} times {b} is {a * b}."
  if t == 3:
    return f"我有{NUM_ZH[n]}个{COLOURS_ZH[c]}的{SHAPES_ZH[k]}。" if zh else f"I have {_count_phrase(n, c, k)}."
  if t == 4:
    k = str(rng.choice(list(CORNERS)))
    return (f"{SHAPES_ZH[k]}有{CORNERS[k]}个角。" if zh
            else f"A {k} has {CORNERS[k]} corners.")
  if t == 5:
    return (f"我有{n}个{SHAPES_ZH[k]}，再加{b % 4 + 1}个，就有{n + b % 4 + 1}个。" if zh
            else f"If you have {n} {PLURALS[k]} and add {b % 4 + 1} more, you have {n + b % 4 + 1} {PLURALS[k]}.")
  c2 = str(rng.choice([x for x in COLOURS if x != c]))
  return (f"{COLOURS_ZH[c]}的{SHAPES_ZH[k]}旁边是一个{COLOURS_ZH[c2]}的{SHAPES_ZH[k]}。" if zh
          else f"The {c} {k} is next to {_count_phrase(1, c2, k)}.")


def generate_text_example(seed: int, split: str, index: int) -> dict[str, Any]:
  """One text-only document of 3..8 template sentences; about 30% mix in Chinese."""
  rng = np.random.default_rng([seed, _split_code(split), index])
  zh_prob = 0.5 if rng.random() < 0.3 else 0.0
  sents = [_sentence(rng, bool(rng.random() < zh_prob)) for _ in range(int(rng.integers(3, 9)))]
  return dict(_empty("text"), text=" ".join(sents))


def generate_example(seed: int, split: str, index: int) -> dict[str, Any]:
  """Dispatch on the split: image splits or text splits."""
  if split in TEXT_SPLITS:
    return generate_text_example(seed, split, index)
  return generate_image_example(seed, split, index)


def generate_examples(seed: int, split: str, start: int, stop: int) -> list[dict[str, Any]]:
  """Examples start..stop-1 of a split (a picklable unit of work for process pools)."""
  return [generate_example(seed, split, i) for i in range(start, stop)]


def iter_split_texts(seed: int, split: str, size: int) -> Iterator[str]:
  """The caption, QA and OCR strings of the first `size` images of an image split, or the first
  `size` documents of a text split (for tokenizer training; no image is rendered)."""
  _split_code(split)
  for i in range(size):
    if split in TEXT_SPLITS:
      yield generate_text_example(seed, split, i)["text"]
      continue
    ex = generate_image_example(seed, split, i, encode=False)
    yield ex["caption_en"]
    yield ex["caption_zh"]
    for qa in json.loads(ex["qa_json"]):
      yield qa["q"]
      yield qa["a"]
    if ex["ocr"]:
      yield ex["ocr"]


def iter_texts(seed: int = 0, sizes: Mapping[str, int] | None = None) -> Iterator[str]:
  """All caption, QA, OCR and document strings of the train splits (for tokenizer training)."""
  sizes = dict(SPLIT_SIZES if sizes is None else sizes)
  yield from iter_split_texts(seed, "train", sizes.get("train", 0))
  yield from iter_split_texts(seed, "text_train", sizes.get("text_train", 0))
