"""Shapes-world generator properties and the TFDS (ArrayRecord) builder, without TensorFlow."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from glm5v_jax.data import shapes_world as sw

TINY = dict(train=40, validation=8, text_train=20, text_validation=4)
N_SAMPLE = 200


@pytest.fixture(scope="module")
def sample() -> list[dict]:
  return [sw.generate_image_example(0, "train", i) for i in range(N_SAMPLE)]


def _has_cjk(s: str) -> bool:
  return any("\u4e00" <= ch <= "\u9fff" for ch in s)


def test_determinism_and_seed_dependence():
  for split, i in [("train", 0), ("validation", 7), ("train", 123)]:
    a, b = sw.generate_image_example(3, split, i), sw.generate_image_example(3, split, i)
    assert a == b and a["image"] == b["image"]
  assert sw.generate_image_example(0, "train", 5)["image"] != sw.generate_image_example(1, "train", 5)["image"]
  assert sw.generate_image_example(0, "train", 5)["image"] != sw.generate_image_example(0, "validation", 5)["image"]
  assert sw.generate_text_example(0, "text_train", 2) == sw.generate_text_example(0, "text_train", 2)
  # encode=False (used by iter_texts) gives the same annotations
  full, light = sw.generate_image_example(0, "train", 9), sw.generate_image_example(0, "train", 9, encode=False)
  assert light["image"] == b"" and {**full, "image": b""} == light


def test_image_properties(sample):
  kinds, colours, qa_kinds = Counter(), Counter(), Counter()
  for ex in sample:
    w, h = ex["width"], ex["height"]
    assert ex["kind"] == "image" and ex["text"] == ""
    assert 32 <= w <= 512 and 32 <= h <= 512 and 0.25 <= w / h <= 4.0
    boxes = json.loads(ex["boxes_json"])
    assert 1 <= len(boxes) <= 6
    for b in boxes:
      x1, y1, x2, y2 = b["box"]
      assert all(isinstance(v, int) and 0 <= v <= 1000 for v in b["box"]) and x1 < x2 and y1 < y2
      colour, kind = b["label"].split(" ")
      colours[colour] += 1
      kinds[kind] += 1
    # the English caption names every (colour, kind) group with its count
    for label, n in Counter(b["label"] for b in boxes).items():
      colour, kind = label.split(" ")
      phrase = rf"\b{sw.NUM_EN[n]} {colour} {sw.PLURALS[kind]}\b" if n > 1 else rf"\ban? {label}\b"
      assert re.search(phrase, ex["caption_en"], re.IGNORECASE), (phrase, ex["caption_en"])
    assert ex["caption_en"] and ex["caption_zh"] and _has_cjk(ex["caption_zh"])
    if ex["ocr"]:
      assert ex["ocr"] in sw.WORDS and f'"{ex["ocr"]}"' in ex["caption_en"] and ex["ocr"] in ex["caption_zh"]
    qa = json.loads(ex["qa_json"])
    assert 2 <= len(qa) <= 4
    for item in qa:
      qa_kinds[item["kind"]] += 1
      _check_answer(item, boxes)
    png = Image.open(io.BytesIO(ex["image"]))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (w, h)
  assert len(kinds) >= 6 and len(colours) == 8, (kinds, colours)
  assert {"count", "colour", "position"} <= set(qa_kinds)
  ocr_frac = sum(bool(ex["ocr"]) for ex in sample) / len(sample)
  assert 0.20 <= ocr_frac <= 0.45, ocr_frac


def _check_answer(item: dict, boxes: list[dict]) -> None:
  """Recompute count, colour and left/higher answers from the boxes."""
  q, a = item["q"], item["a"]
  labels = [b["label"] for b in boxes]
  centre = {b["label"]: ((b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2) for b in boxes}
  if item["kind"] == "count":
    if q == "How many shapes are there?":
      want = len(labels)
    elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
      want = sum(lab.split(" ")[0] == m[1] for lab in labels)
    else:
      m = re.fullmatch(r"How many (\w+) are there\?", q)
      want = sum(lab.split(" ")[1] == sw.SINGULARS[m[1]] for lab in labels)
    assert a == str(want), (q, a, labels)
  elif item["kind"] == "colour":
    m = re.fullmatch(r"What colour (?:is the (\w+)|are the (\w+))\?", q)
    kind = m[1] or sw.SINGULARS[m[2]]
    assert {lab.split(" ")[0] for lab in labels if lab.split(" ")[1] == kind} == {a}, (q, a, labels)
  else:
    if m := re.fullmatch(r"Is the (\w+ \w+) left of the (\w+ \w+)\?", q):
      assert a == ("yes" if centre[m[1]][0] < centre[m[2]][0] else "no"), (q, a, boxes)
    elif m := re.fullmatch(r"Which is higher, the (\w+ \w+) or the (\w+ \w+)\?", q):
      assert a == "the " + min(m[1], m[2], key=lambda lab: centre[lab][1]), (q, a, boxes)
    else:
      assert re.fullmatch(r"Where is the (\w+ \w+)\?", q) and a in sum(sw.REGIONS, ()), (q, a)


def test_text_examples_and_iter_texts():
  docs = [sw.generate_text_example(0, "text_train", i) for i in range(100)]
  for d in docs:
    assert d["kind"] == "text" and d["image"] == b"" and d["width"] == d["height"] == 0
    assert d["qa_json"] == d["boxes_json"] == "[]" and d["caption_en"] == d["ocr"] == ""
    assert 3 <= len(re.findall(r"[.。]", d["text"])) <= 8
  assert any(_has_cjk(d["text"]) for d in docs) and any(re.search(r"\d plus \d is \d+\.", d["text"]) for d in docs)
  texts = list(sw.iter_texts(0, dict(train=5, text_train=3)))
  assert all(isinstance(t, str) and t for t in texts) and len(texts) >= 5 * 2 + 5 * 4 + 3
  assert texts[-1] == sw.generate_text_example(0, "text_train", 2)["text"]


# ---------------------------------------------------------------------------- TFDS builder

def _sha256_tree(root: str) -> dict[str, str]:
  out = {}
  for r, _, files in os.walk(root):
    for f in files:
      p = os.path.join(r, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


_SUBPROCESS_BUILD = """
import sys
from glm5v_jax.data.shapes_world_tfds import build_shapes_world, load_split
d = build_shapes_world(sys.argv[1], split_sizes=dict(train=40, validation=8, text_train=20, text_validation=4))
assert load_split(d, "train")[0]["image"][:4] == b"\\x89PNG"
bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
assert not bad, bad
print(d)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[str, str]:
  """The TINY dataset built here and, independently, in a fresh process that must not import TF."""
  from glm5v_jax.data.shapes_world_tfds import build_shapes_world
  a = build_shapes_world(str(tmp_path_factory.mktemp("a")), seed=0, split_sizes=TINY)
  res = subprocess.run([sys.executable, "-c", _SUBPROCESS_BUILD, str(tmp_path_factory.mktemp("b"))],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  return a, res.stdout.strip().splitlines()[-1]


def test_builder_is_byte_identical(built):
  a, b = built
  assert a.endswith(os.path.join("shapes_world", "s0_40_8_20_4", "1.0.0"))
  ha, hb = _sha256_tree(os.path.dirname(os.path.dirname(a))), _sha256_tree(os.path.dirname(os.path.dirname(b)))
  assert sum(".array_record-" in k for k in ha) == 4
  # Two processes (the map order of an unpatched tf.Example serialization is stable within
  # one process but changes between processes; the builder serializes with deterministic=True).
  # Every file is compared, metadata included: in tfds 4.9.10 neither dataset_info.json
  # nor features.json holds a timestamp or an absolute path, so nothing needs excluding.
  assert ha == hb


def test_load_split_matches_generator(built):
  import grain
  from glm5v_jax.data.shapes_world_tfds import load_split
  for split, size in TINY.items():
    src = load_split(built[0], split)
    assert len(src) == size
    for i in range(size):
      rec, want = src[i], sw.generate_example(0, split, i)
      assert rec["id"] == i and isinstance(rec["image"], bytes) and isinstance(rec["caption_zh"], bytes)
      got = {k: (v.decode("utf-8") if isinstance(v, bytes) and k != "image" else v) for k, v in rec.items()}
      assert got == {**want, "id": i}
  ds = grain.MapDataset.source(load_split(built[0], "train")).map(lambda r: r["width"])
  assert ds[3] == sw.generate_image_example(0, "train", 3)["width"]


def test_seed_and_sizes_select_the_directory(tmp_path):
  from glm5v_jax.data.shapes_world_tfds import build_shapes_world, config_name, load_split
  small = dict(train=3, validation=2, text_train=2, text_validation=1)
  d = build_shapes_world(str(tmp_path), seed=7, split_sizes=small)
  assert os.path.basename(os.path.dirname(d)) == config_name(7, small) == "s7_3_2_2_1"
  rec = load_split(d, "validation")[1]
  assert rec["image"] == sw.generate_image_example(7, "validation", 1)["image"]


def test_build_and_read_without_tensorflow(built):
  # The subprocess in `built` built and read the dataset and asserted that no
  # `tensorflow` module was imported (this pytest process may import other things).
  assert os.path.isfile(os.path.join(built[1], "features.json"))


def test_single_object_splits_for_evaluation(tmp_path):
  """`single_object_*` images hold exactly one shape (clean shape and colour labels for k-NN and
  zero-shot evaluation), are their own split of the builder, and only the splits asked for are
  generated."""
  from glm5v_jax.data.image_batches import labels_of
  from glm5v_jax.data.shapes_world_tfds import SPLITS, build_shapes_world, config_name, load_split
  examples = [sw.generate_image_example(0, "single_object_validation", i) for i in range(60)]
  for ex in examples:
    boxes = json.loads(ex["boxes_json"])
    assert len(boxes) == 1 and ex["caption_en"].count(boxes[0]["label"].split()[1]) >= 1
  labels = [labels_of(ex) for ex in examples]
  assert len({lab["shape"] for lab in labels}) >= 6 and len({lab["colour"] for lab in labels}) >= 6
  assert min(lab["shape"] for lab in labels) >= 0
  assert examples[0]["image"] != sw.generate_image_example(0, "validation", 0)["image"]
  sizes = dict.fromkeys(SPLITS, 0) | dict(single_object_train=3, single_object_validation=2)
  d = build_shapes_world(str(tmp_path), seed=0, split_sizes=sizes)
  assert os.path.basename(os.path.dirname(d)) == config_name(0, sizes) == "s0_0_0_0_0_3_2"
  assert config_name(0, TINY) == "s0_40_8_20_4"  # names of the datasets built before these splits
  assert [len(load_split(d, s)) for s in ("single_object_train", "single_object_validation")] == [3, 2]
  assert load_split(d, "single_object_train")[1]["image"] == sw.generate_image_example(0, "single_object_train",
                                                                                       1)["image"]
  with pytest.raises(Exception):
    load_split(d, "train")  # size 0: not generated
  first_text = next(sw.iter_split_texts(0, "single_object_train", 1))  # any split's texts can train a tokenizer
  assert first_text == sw.generate_image_example(0, "single_object_train", 0, encode=False)["caption_en"]
