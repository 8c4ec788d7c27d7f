"""RL task families (`glm5v_jax.rl.tasks`, `rl.scenes`): valid, deterministic tasks with references the
verifiers can read, references checked against what the image shows, the weighted mixture, and the tool
families' premise (the detail is unreadable at the model's input size, legible in a crop)."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from glm5v_jax.data import shapes_world as sw
from glm5v_jax.data.naflex import fit_grid
from glm5v_jax.data.templates import format_boxes
from glm5v_jax.errors import ConfigError
from glm5v_jax.rl import scenes, tasks, tools
from glm5v_jax.rl.types import RewardSpec, Task

N = 6  # tasks per family checked
KNOWN_VERIFIERS = {"count", "exact", "choice", "grounding_iou", "grounding_match", "point_in_box", "anls",
                   "edit_similarity", "relaxed_number", "box_format"}
REQUIRED = {"shapes/count", "shapes/colour", "shapes/position", "shapes/grounding", "shapes/pointing", "shapes/ocr",
            "shapes/choice", "charts/bar", "charts/table", "tools/tiny_word", "tools/zoom_count"}


@pytest.fixture(scope="module")
def made() -> dict[str, list[Task]]:
    return {name: [f.make(0, i) for i in range(N)] for name, f in tasks.FAMILIES.items()}


def _is_box(b) -> bool:
    return (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in b)
            and b[0] <= b[2] and b[1] <= b[3])


def _reference_ok(verifier: str, ref) -> bool:
    """The fields `verifier` reads, of the right type (the brief's reference formats)."""
    if verifier in ("grounding_iou", "grounding_match", "point_in_box", "box_format"):
        return isinstance(ref.get("boxes"), list) and ref["boxes"] and all(map(_is_box, ref["boxes"]))
    answer = ref.get("answer")
    if verifier == "count":
        return isinstance(answer, int) and answer >= 0
    if verifier == "choice":
        return answer in ("A", "B", "C", "D")
    if verifier == "relaxed_number":
        return isinstance(answer, (int, float)) and not isinstance(answer, bool)
    answers = ref.get("answers", [answer])
    return isinstance(answer, str) and bool(answer.strip()) and all(isinstance(a, str) and a for a in answers)


def _record(task: Task) -> dict:
    return sw.generate_image_example(0, tasks.RECORD_SPLIT, task.reference["record"])


def _golden(task: Task) -> str:
    """A response that is right for the task: its gold answer (single-turn families), or the final answer
    of a tool episode."""
    if task.data_source in tasks.GOLD:
        return tasks.gold_answer(task)
    ref = task.reference
    if "boxes" in ref:
        return "<|begin_of_box|>" + format_boxes(ref["boxes"]) + "<|end_of_box|>"
    return str(ref["answer"])


# ---------------------------------------------------------------- the registry and every family

def test_registry():
    assert len(tasks.FAMILIES) >= 10 and REQUIRED <= set(tasks.FAMILIES)
    specs = tasks.reward_specs()
    assert set(specs) == set(tasks.FAMILIES)
    for name, spec in specs.items():
        assert isinstance(spec, RewardSpec) and tasks.FAMILIES[name].name == name
        assert {c.verifier for c in spec.components} <= KNOWN_VERIFIERS
        if spec.aggregate == "gate":
            assert spec.gate in [c.name for c in spec.components]
    assert [c.verifier for c in specs["shapes/grounding"].components] == ["box_format", "grounding_iou"]
    assert specs["shapes/grounding"].aggregate == "gate" and specs["shapes/grounding"].gate == "format"
    multi = [f for f in tasks.FAMILIES.values() if f.make(0, 0).max_turns > 1]
    assert len(multi) >= 2 and all(f.name.startswith("tools/") for f in multi)


def test_every_family_makes_valid_tasks(made):
    for name, batch in made.items():
        spec = tasks.FAMILIES[name].reward
        for i, task in enumerate(batch):
            assert task.data_source == name and task.uid == f"{name}/0/{i}"
            assert task.prompt.strip() and len(task.images) == 1
            arr = tools.decode_png(task.images[0])
            assert arr.ndim == 3 and min(arr.shape[:2]) >= 16
            for c in spec.components:
                assert _reference_ok(c.verifier, task.reference), (name, c.verifier, task.reference)
            assert set(task.tools) <= set(tools.TOOLS)
            if task.tools:
                assert task.max_turns > 1 and "crop" in task.prompt and not task.system  # the gym describes tools
                assert "<tool_call>" in tools.describe_tools(task.tools)
            else:
                assert task.max_turns == 1


def test_tasks_are_deterministic_and_seeded(made):
    for name, f in tasks.FAMILIES.items():
        assert f.make(0, 3) == made[name][3]
        assert f.make(1, 3).images != made[name][3].images
        assert len({t.images for t in made[name]}) == N  # different images for different indices


def test_families_do_not_share_records(made):
    records = Counter(t.reference["record"] for batch in made.values() for t in batch if "record" in t.reference)
    assert max(records.values()) == 1


def test_the_right_answer_scores_one(made):
    verifiers = pytest.importorskip("glm5v_jax.rl.verifiers")
    for name, batch in made.items():
        for task in batch:
            for c in tasks.FAMILIES[name].reward.components:
                assert verifiers.VERIFIERS[c.verifier](_golden(task), task.reference) == 1.0, (name, task.reference)
                assert verifiers.VERIFIERS[c.verifier]("no idea", task.reference) < 1.0


def test_gold_records_feed_sft_conversations(made):
    from glm5v_jax.data.conversations import make_conversation

    records = tasks.GoldRecords(tasks.SFT_FAMILIES, seed=2, size=8)
    assert len(records) == 8 and records[3] == records[3]
    seen = set()
    for i in range(len(records)):
        r = records[i]
        task = records.mix.task(i)
        seen.add(task.data_source)
        conv = make_conversation(r, np.random.default_rng(i), image=True, min_turns=1, max_turns=1)
        (turn,) = conv.turns
        assert (turn.user, turn.answer, turn.task) == (task.prompt, tasks.gold_answer(task), "qa")
        assert r["image"] == task.images[0]
    assert seen <= set(tasks.SFT_FAMILIES) and len(seen) >= 3
    with pytest.raises(ConfigError, match="gold"):
        tasks.GoldRecords(["tools/tiny_word"], seed=0, size=1)


# ---------------------------------------------------------------- references against what the image shows

def test_shapes_references_match_the_record():
    for i in range(12):
        t = tasks.FAMILIES["shapes/count"].make(0, i)
        rec = _record(t)
        assert t.images[0] == rec["image"]
        labels = [b["label"] for b in json.loads(rec["boxes_json"])]
        m = re.fullmatch(r"How many (?:(\w+) shapes|(\w+)) are there\?", t.prompt)
        if m.group(1):
            want = sum(label.split()[0] == m.group(1) for label in labels)
        elif m.group(2) == "shapes":
            want = len(labels)
        else:
            want = sum(label.split()[1] == sw.SINGULARS[m.group(2)] for label in labels)
        assert t.reference["answer"] == want, (t.prompt, labels)
    for i in range(6):
        t = tasks.FAMILIES["shapes/grounding"].make(0, i)
        label = re.search(r"(?:every|each) (.+?)(?: in the image)?\.$", t.prompt).group(1)
        boxes = [b["box"] for b in json.loads(_record(t)["boxes_json"]) if b["label"] == label]
        assert t.reference["boxes"] == boxes
        t = tasks.FAMILIES["shapes/ocr"].make(0, i)
        assert t.reference["answer"] == _record(t)["ocr"] != ""
        t = tasks.FAMILIES["shapes/pointing"].make(0, i)
        label = re.match(r"Point to the (.+?)\.", t.prompt).group(1)
        assert [b["box"] for b in json.loads(_record(t)["boxes_json"]) if b["label"] == label] == t.reference["boxes"]


def test_choice_options():
    seen = Counter()
    for i in range(40):
        t = tasks.FAMILIES["shapes/choice"].make(0, i)
        options = re.findall(r"^([A-D])\. (.+)$", t.prompt, re.M)
        assert [o for _, o in options] == t.reference["options"] and len(set(t.reference["options"])) == 4
        right = dict(options)[t.reference["answer"]]
        labels = [b["label"] for b in json.loads(_record(t)["boxes_json"])]
        if t.prompt.startswith("How many shapes"):
            assert right == str(len(labels))
        elif t.prompt.startswith("What colour is the"):
            kind = re.match(r"What colour is the (\w+)\?", t.prompt).group(1)
            assert [label for label in labels if label.endswith(" " + kind)] == [f"{right} {kind}"]
        elif t.prompt.startswith("Which word"):
            assert right == _record(t)["ocr"]
        seen[t.reference["answer"]] += 1
    assert len(seen) == 4  # the right option is not always in one place


def test_bar_chart_answer_is_the_value_drawn():
    for i in range(8):
        t = tasks.make_bar(0, i)
        png, info = scenes.bar_chart_scene(tasks._rng("charts/bar", 0, i))
        assert png == t.images[0]
        img = tools.decode_png(png)
        heights = []
        for (x1, y1, x2, bottom), colour, value in zip(info["bars"], info["colours"], info["values"]):
            column = np.all(img[:, (x1 + x2) // 2] == sw.COLOURS[colour], axis=-1)
            top, height = np.argmax(column), column.sum()
            assert top == y1 and height == bottom - y1  # one solid run of the bar's colour
            heights.append(height)
            above = img[max(0, y1 - 40):y1, x1:x2]
            assert (above.max(-1) < 100).any()  # the value is written above the bar
        tallest = int(np.argmax(info["values"]))
        read = np.array(heights) * info["values"][tallest] / heights[tallest]  # values read off the heights
        np.testing.assert_allclose(read, info["values"], atol=1.0)
        values = dict(zip(info["labels"], info["values"]))
        m = re.match(r"What is the value of the bar labelled (\w+)\?", t.prompt)
        if m:
            assert t.reference["answer"] == values[m.group(1)]
        else:
            a, b = re.match(r"How much greater is the value of (\w+) than that of (\w+)\?", t.prompt).groups()
            assert t.reference["answer"] == values[a] - values[b] > 0


def test_table_answer_is_the_cell():
    for i in range(8):
        t = tasks.make_table(0, i)
        png, info = scenes.table_scene(tasks._rng("charts/table", 0, i))
        assert png == t.images[0] and tools.decode_png(png).shape[1::-1] == info["size"]
        m = re.match(r"In the table, what is the (\w+) of (\w+)\?", t.prompt)
        if m:
            assert t.reference["answer"] == info["cells"][m.group(2)][m.group(1)]
        else:
            col = re.match(r"In the table, what is the total (\w+)", t.prompt).group(1)
            assert t.reference["answer"] == sum(row[col] for row in info["cells"].values())


# ---------------------------------------------------------------- the tool families' premise

def _model_scale(h: int, w: int, max_patches: int) -> float:
    gh, gw = fit_grid(h, w, patch_size=16, max_patches=max_patches)
    return min(gh * 16 / h, gw * 16 / w)


def _ink_height(img: np.ndarray) -> int:
    """Rows holding dark (text) pixels."""
    rows = np.nonzero((img.max(-1) < 90).any(-1))[0]
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


@pytest.mark.parametrize("index", range(6))
def test_tiny_word_is_unreadable_until_cropped(index):
    t = tasks.make_tiny_word(0, index)
    img = tools.decode_png(t.images[0])
    h, w = img.shape[:2]
    _, info = scenes.tiny_word_scene(tasks._rng("tools/tiny_word", 0, index))
    x0, y0, x1, y1 = info["word_px"]
    ink = _ink_height(img[y0:y1, x0:x1])
    assert 7 <= ink <= 16  # legible at full resolution (7: the x-height of 'corn' in 13 px type)
    budget = tasks.DESIGN_BUDGET["max_patches"]
    assert ink * _model_scale(h, w, budget) < 5  # about 3-4 px tall at the model's input size
    zoom = tools.crop(img, t.reference["word_box"])
    assert _ink_height(zoom) >= 12 * 4  # the crop of its box: tens of pixels tall
    assert _ink_height(zoom) * _model_scale(*zoom.shape[:2], budget) >= 12  # ... and still at the model's input
    # the word box is inside the sign box, which is what the prompt points at
    (a, b, c, d), (e, f, g, k) = t.reference["word_box"], t.reference["sign_box"]
    assert e <= a and f <= b and c <= g and d <= k and t.reference["answer"] in sw.WORDS


@pytest.mark.parametrize("index", range(6))
def test_zoom_count_counts_the_shapes_in_the_region(index):
    t = tasks.make_zoom_count(0, index)
    img = tools.decode_png(t.images[0])
    png, info = scenes.zoom_count_scene(tasks._rng("tools/zoom_count", 0, index))
    assert png == t.images[0] and t.reference["region"] == info["region"]
    x0, y0, x1, y1 = tools.crop_pixels(info["region"], img.shape[1], img.shape[0])
    for o in info["objects"]:  # no shape straddles the region's border
        a, b, c, d = o["box"]
        inside = x0 <= a and c <= x1 and y0 <= b and d <= y1
        outside = c <= x0 or a >= x1 or d <= y0 or b >= y1
        assert inside == o["inside"] and inside != outside
    # count the blobs of the target colour in the crop, from the pixels
    colour = info["colour"]
    assert f"How many {colour} shapes are inside the region " in t.prompt
    crop = tools.crop(img, info["region"], short_side=0)
    _, blobs = ndimage.label(np.all(crop == sw.COLOURS[colour], axis=-1), structure=np.ones((3, 3)))
    assert blobs == t.reference["answer"]
    assert max(o["box"][2] - o["box"][0] for o in info["objects"]) * _model_scale(*img.shape[:2], 256) < 5


def test_find_small_target_is_unique_and_small():
    for i in range(6):
        t = tasks.make_find_small(0, i)
        img = tools.decode_png(t.images[0])
        _, info = scenes.find_small_scene(tasks._rng("tools/find_small", 0, i))
        colour = info["label"].split()[0]
        x0, y0, x1, y1 = info["box_px"]
        assert np.all(img[y0:y1, x0:x1] == sw.COLOURS[colour], axis=-1).sum() >= 20
        assert (x1 - x0) * _model_scale(*img.shape[:2], 256) < 6
        assert t.reference["boxes"] == [info["box"]] and t.tools == ("crop", "draw_boxes")


# ---------------------------------------------------------------- the mixture

def test_mixture_follows_the_weights_and_is_deterministic():
    mix = tasks.TaskMix({"shapes/count": 3, "charts/bar": 1, "shapes/ocr": 0}, seed=5)
    names = [mix.family(i) for i in range(4000)]
    counts = Counter(names)
    assert set(counts) == {"shapes/count", "charts/bar"}
    assert abs(counts["shapes/count"] / 4000 - 0.75) < 0.03
    assert names == [tasks.TaskMix({"charts/bar": 1, "shapes/count": 3}, seed=5).family(i) for i in range(4000)]
    assert names != [tasks.TaskMix({"shapes/count": 3, "charts/bar": 1}, seed=6).family(i) for i in range(4000)]
    assert mix.task(7) == mix.task(7) and mix.task(7).uid == f"{mix.family(7)}/5/7"


def test_default_mixture_uses_every_family_and_uids_are_unique():
    mix = tasks.TaskMix(seed=0)
    assert set(mix.names) == set(tasks.FAMILIES)
    assert abs(sum(mix.weights.values()) - 1) < 1e-9
    it = iter(mix)
    first = [next(it) for _ in range(60)]
    assert [t.uid for t in first] == [mix.task(i).uid for i in range(60)]
    assert len({t.uid for t in first}) == 60
    assert len(set(mix.family(i) for i in range(2000))) == len(tasks.FAMILIES)


@pytest.mark.parametrize("families, message", [
    ({"shapes/count": 1, "shapes/nope": 1}, "unknown task families ['shapes/nope']; known: shapes/count"),
    ({"shapes/count": -1}, "finite and >= 0"),
    ({"shapes/count": float("nan")}, "finite and >= 0"),
    ({"shapes/count": 0}, "every weight is 0"),
])
def test_mixture_errors(families, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        tasks.TaskMix(families)
    assert e.value.field == "families"
