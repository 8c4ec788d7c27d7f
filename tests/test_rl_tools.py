"""On-image tools (`glm5v_jax.rl.tools`): crop geometry against NumPy slicing, what drawing changes, and
the tool-call syntax -- valid calls, and every kind of malformed call as an observation naming the fault."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from glm5v_jax.rl import tools


def _coded(h: int, w: int) -> np.ndarray:
    """An image whose pixels say where they are: R = x % 256, G = y % 256, B = (x // 256) * 16 + y // 256."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], -1).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    return tools.encode_png(arr)


def _call(name: str, **args: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args.items())
    return f"<tool_call>{name}\n{pairs}</tool_call>"


# ---------------------------------------------------------------- crop

def test_crop_is_the_numpy_slice_of_the_box():
    img = _coded(200, 300)  # H=200, W=300: x_px = x * 0.3, y_px = y * 0.2
    box = [100, 250, 500, 750]
    assert tools.crop_pixels(box, 300, 200) == (30, 50, 150, 150)
    np.testing.assert_array_equal(tools.crop(img, box, short_side=0), img[50:150, 30:150])
    # default: upsampled (bicubic, aspect kept) so the short side is ZOOM_SHORT_SIDE
    out = tools.crop(img, box)
    assert out.shape == (tools.ZOOM_SHORT_SIDE, round(120 * tools.ZOOM_SHORT_SIDE / 100), 3)
    want = np.asarray(Image.fromarray(img[50:150, 30:150]).resize(out.shape[1::-1], Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, want)
    # a crop already large enough is returned as is
    np.testing.assert_array_equal(tools.crop(img, [0, 0, 1000, 1000], short_side=100), img)


def test_crop_covers_a_box_that_is_not_on_pixel_edges():
    img = _coded(97, 131)
    x0, y0, x1, y1 = tools.crop_pixels([333, 111, 667, 889], 131, 97)
    assert (x0, y0, x1, y1) == (43, 10, 88, 87)  # floor / ceil of 43.6, 10.8, 87.4, 86.2: it covers the box
    np.testing.assert_array_equal(tools.crop(img, [333, 111, 667, 889], short_side=0), img[y0:y1, x0:x1])


@pytest.mark.parametrize("box, want", [
    ([0, 0, 10, 10], (0, 0, 28, 28)),  # a tiny box in a corner: enlarged to 28 px, kept inside
    ([995, 995, 1000, 1000], (272, 172, 300, 200)),  # the opposite corner
    ([500, 500, 500, 500], (136, 86, 164, 114)),  # a point: 28 x 28 around it
    ([-50, -20, 2000, 500], (0, 0, 300, 100)),  # out-of-range coordinates are clamped (direct calls)
    ([480, 0, 520, 1000], (136, 0, 164, 200)),  # only the narrow side grows
])
def test_crop_clamps_and_enforces_the_minimum_size(box, want):
    img = _coded(200, 300)
    assert tools.crop_pixels(box, 300, 200) == want
    x0, y0, x1, y1 = want
    np.testing.assert_array_equal(tools.crop(img, box, short_side=0), img[y0:y1, x0:x1])
    assert min(tools.crop(img, box).shape[:2]) == tools.ZOOM_SHORT_SIDE


def test_crop_of_an_image_smaller_than_the_minimum_is_the_whole_side():
    img = _coded(16, 20)
    np.testing.assert_array_equal(tools.crop(img, [400, 400, 450, 450], short_side=0), img)


def test_crop_long_side_is_capped():
    img = _coded(30, 2000)
    out = tools.crop(img, [0, 0, 1000, 1000])
    assert max(out.shape[:2]) <= tools.MAX_SIDE and out.shape[0] >= 30


# ---------------------------------------------------------------- draw_boxes and mark_points

def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=-1)


def test_draw_boxes_outlines_just_outside_the_box():
    img = np.full((100, 200, 3), 128, np.uint8)
    out = tools.draw_boxes(img, [[250, 200, 750, 800]])  # pixels x 50..150, y 20..80
    lw = tools.line_width(200, 100)
    assert lw == 2 and (img == 128).all()  # the input is not modified
    changed = _changed(img, out)
    ring = np.zeros_like(changed)
    ring[20 - lw:80 + lw, 50 - lw:150 + lw] = True
    ring[20:80, 50:150] = False
    np.testing.assert_array_equal(changed, ring)  # exactly the ring, the box's content untouched
    assert (out[ring] == tools.MARK_COLOURS[0]).all()
    labelled = tools.draw_boxes(img, [[250, 200, 750, 800], [0, 0, 100, 100]], ["cat", "x"])
    extra = _changed(img, labelled) & ~ring
    assert extra[:20 - lw].any()  # the label sits above the box
    assert (labelled[extra] == tools.MARK_COLOURS[1]).all(axis=-1).any()  # the second box's colour


def test_mark_points_changes_a_disc_around_each_point():
    img = np.full((120, 160, 3), 128, np.uint8)
    out = tools.mark_points(img, [[250, 500], [1000, 1000]])  # (40, 60) and the far corner (159, 119)
    r = 2 * tools.line_width(160, 120)
    changed = _changed(img, out)
    yy, xx = np.mgrid[:120, :160]
    near = ((xx - 40) ** 2 + (yy - 60) ** 2 <= (r + 1) ** 2) | ((xx - 159) ** 2 + (yy - 119) ** 2 <= (r + 1) ** 2)
    assert changed.any() and not (changed & ~near).any()
    assert tuple(out[60, 40]) == tools.MARK_COLOURS[0] and tuple(out[119, 159]) == tools.MARK_COLOURS[1]
    assert changed[60 - r + 1:60 + r, 40].all()


# ---------------------------------------------------------------- the call syntax

def test_no_tool_call_is_a_final_answer():
    assert tools.call_tools("The word is cat.", [_png(_coded(50, 50))], ("crop",)) is None
    assert tools.call_tools("", [], ("crop",)) is None


def test_a_valid_crop_call_adds_the_cropped_image():
    a, b = _coded(200, 300), _coded(90, 60)
    text = "Let me zoom in.\n" + _call("crop", box="[100,250,500,750]")
    obs = tools.call_tools(text, [_png(a), _png(b)], ("crop",))
    assert obs.error is None and len(obs.images) == 1 and obs.text.startswith("Image 2:")
    got = tools.decode_png(obs.images[0])
    np.testing.assert_array_equal(got, tools.crop(b, [100, 250, 500, 750]))  # default: the latest image
    obs = tools.call_tools(_call("crop", box="[100, 250, 500, 750]", image="0"), [_png(a), _png(b)], ("crop",))
    np.testing.assert_array_equal(tools.decode_png(obs.images[0]), tools.crop(a, [100, 250, 500, 750]))
    assert "from image 0" in obs.text


def test_valid_draw_and_mark_calls():
    img = np.full((100, 200, 3), 128, np.uint8)
    obs = tools.call_tools(_call("draw_boxes", boxes="[[250,200,750,800]]", labels='["cat"]'), [_png(img)],
                           ("crop", "draw_boxes"))
    assert obs.error is None
    want = tools.draw_boxes(img, [[250, 200, 750, 800]], ["cat"])
    np.testing.assert_array_equal(tools.decode_png(obs.images[0]), want)
    one = tools.call_tools(_call("draw_boxes", boxes="[250,200,750,800]"), [_png(img)], ("draw_boxes",))
    np.testing.assert_array_equal(tools.decode_png(one.images[0]), tools.draw_boxes(img, [[250, 200, 750, 800]]))
    obs = tools.call_tools(_call("mark_points", points="[[10,20],[500,500]]"), [_png(img)], ("mark_points",))
    assert obs.error is None and "2 points marked" in obs.text
    # a call on one line, raw (non-JSON) string values, whitespace around the pairs
    obs = tools.call_tools("<tool_call>draw_boxes<arg_key>boxes</arg_key><arg_value> [[0,0,10,10]] </arg_value>"
                           "<arg_key>labels</arg_key><arg_value>[\"a\"]</arg_value></tool_call>", [_png(img)],
                           ("draw_boxes",))
    assert obs.error is None


MALFORMED = [
    (_call("zoom", box="[1,2,3,4]"), ("crop",), "unknown tool 'zoom'"),
    (_call("draw_boxes", boxes="[[1,2,3,4]]"), ("crop",), "not available in this task: 'draw_boxes'"),
    (_call("crop", box="[1,2,3,4]"), (), "no tools are available"),
    (_call("crop", box="[100,200,400"), ("crop",), "not valid JSON"),
    (_call("crop", box="big"), ("crop",), "box must be a JSON list of 4 integers"),
    (_call("crop"), ("crop",), "missing argument 'box'"),
    (_call("crop", box="[1,2,3,4]", zoom="2"), ("crop",), "unknown argument 'zoom'"),
    (_call("crop", box="[0,0,1200,500]"), ("crop",), "outside [0, 1000]: [1200]"),
    (_call("crop", box="[0,-1,10,500]"), ("crop",), "outside [0, 1000]: [-1]"),
    (_call("crop", box="[400,200,100,500]"), ("crop",), "reversed"),
    (_call("crop", box="[1.5,2,3,4]"), ("crop",), "integers"),
    (_call("crop", box="[1,2,3]"), ("crop",), "list of 4 integers"),
    (_call("crop", box="[1,2,3,4]", image="5"), ("crop",), "image index 5 out of range"),
    (_call("crop", box="[1,2,3,4]", image="-1"), ("crop",), "image index -1 out of range"),
    (_call("crop", box="[1,2,3,4]", image='"first"'), ("crop",), "image must be an integer"),
    (_call("crop", box="[1,2,3,4]") + _call("crop", box="[1,2,3,4]"), ("crop",), "found 2 tool calls"),
    ("<tool_call>crop\n<arg_key>box</arg_key><arg_value>[1,2,3,4]</arg_value>", ("crop",), "unterminated"),
    ("<tool_call>\n<arg_key>box</arg_key><arg_value>[1,2,3,4]</arg_value></tool_call>", ("crop",),
     "missing tool name"),
    ("<tool_call>crop\n<arg_key>box</arg_key><arg_value>[1,2,3,4]</arg_value>"
     "<arg_key>box</arg_key><arg_value>[1,2,3,4]</arg_value></tool_call>", ("crop",), "'box' given twice"),
    ("<tool_call>crop\nbox=[1,2,3,4]</tool_call>", ("crop",), "unexpected text in the crop call: 'box=[1,2,3,4]'"),
    (_call("draw_boxes", boxes="[[1,2,3,4]]", labels='["a","b"]'), ("draw_boxes",), "2 labels for 1 boxes"),
    (_call("draw_boxes", boxes="[]"), ("draw_boxes",), "non-empty JSON list"),
    (_call("draw_boxes", boxes=str([[0, 0, 1, 1]] * 33)), ("draw_boxes",), "at most 32"),
    (_call("draw_boxes", boxes="[[1,2,3,4],[5,6,3,8]]"), ("draw_boxes",), "boxes[1] [5, 6, 3, 8] is reversed"),
    (_call("mark_points", points="[[1,2,3]]"), ("mark_points",), "points[0] must be a JSON list of 2 integers"),
    (_call("mark_points", points="[[1,2]]", labels='"a"'), ("mark_points",), "labels must be a JSON list"),
]


@pytest.mark.parametrize("text, allowed, message", MALFORMED)
def test_malformed_calls_are_observations_that_name_the_fault(text, allowed, message):
    obs = tools.call_tools(text, [_png(_coded(40, 60))], allowed)
    assert obs is not None and obs.images == ()
    assert obs.error is not None and message in obs.error, obs.error
    assert obs.text == f"Error: {obs.error}"


def test_call_without_images_or_with_a_broken_image():
    obs = tools.call_tools(_call("crop", box="[1,2,3,4]"), [], ("crop",))
    assert "no image" in obs.error
    obs = tools.call_tools(_call("crop", box="[1,2,3,4]"), [b"not a png"], ("crop",))
    assert "image 0 could not be decoded" in obs.error


def test_every_prefix_of_a_call_is_handled_without_an_exception():
    img = [_png(_coded(40, 60))]
    text = _call("draw_boxes", boxes="[[100,200,300,400]]", labels='["a"]', image="0")
    for i in range(len(text) + 1):
        obs = tools.call_tools(text[:i], img, ("draw_boxes",))
        assert obs is None or isinstance(obs, tools.Observation)
    assert tools.call_tools(text, img, ("draw_boxes",)).error is None


def test_registry_and_prompt():
    assert set(tools.TOOLS) == {"crop", "draw_boxes", "mark_points"}
    for tool in tools.TOOLS.values():
        assert "image" in [a.name for a in tool.args] and tool.args[0].required
        example = _call(tool.name, **{tool.args[0].name: tool.example})
        assert tools.call_tools(example, [_png(_coded(64, 64))], (tool.name,)).error is None
    prompt = tools.describe_tools(("crop", "draw_boxes"))
    assert "0 to 1000" in prompt and "- crop:" in prompt and "- draw_boxes:" in prompt and "mark_points" not in prompt
    assert tools.describe_tools(()) == ""
    with pytest.raises(KeyError, match="known"):
        tools.describe_tools(("zoom",))


def test_png_round_trip_of_rgba_and_grey():
    grey = Image.new("L", (8, 6), 77)
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    assert tools.decode_png(buf.getvalue()).shape == (6, 8, 3)
