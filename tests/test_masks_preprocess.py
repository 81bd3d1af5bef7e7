"""engine.masks (mask normalising, compositing, outpainting canvases) and engine.preprocess (control images)."""
import io
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from engine import masks, preprocess
from engine.errors import EngineError


def _photo(w=100, h=70, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _arr(img):
    return np.asarray(img).astype(int)


# ------------------------------------------------------------------------------------------------ masks
def test_masks_module_needs_no_torch():
    import subprocess
    code = "import sys, engine.masks, engine.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_painted_layer_alpha_is_the_mask_whatever_the_brush_colour():
    layer = Image.new("RGBA", (100, 70), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 153), (20, 10, 50, 40))          # black brush, 60 % opaque
    mask, note = masks.normalize_mask(layer, (100, 70))
    a = np.asarray(mask)
    assert note == "" and mask.mode == "L" and set(np.unique(a)) == {0, 255}
    assert a[10:40, 20:50].min() == 255 and a.sum() == 255 * 30 * 30


def test_opaque_image_uses_brightness_and_threshold_is_at_128():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((127, 127, 127), (0, 0, 32, 64))
    img.paste((128, 128, 128), (32, 0, 48, 64))
    img.paste((255, 255, 255), (48, 0, 64, 64))
    a = np.asarray(masks.normalize_mask(img, (64, 64))[0])
    assert a[:, :32].max() == 0 and a[:, 32:].min() == 255
    # An opaque RGBA image (alpha all 255) is read by brightness, not alpha.
    b = np.asarray(masks.normalize_mask(img.convert("RGBA"), (64, 64))[0])
    assert np.array_equal(a, b)


def test_other_size_is_resized_with_a_note(tmp_path):
    layer = Image.new("RGBA", (50, 35), (255, 255, 255, 0))
    layer.paste((255, 255, 255, 153), (10, 10, 25, 25))
    layer.save(tmp_path / "layer.png")
    mask, note = masks.mask_from_file(tmp_path / "layer.png", (100, 70))
    assert mask.size == (100, 70) and "50x35" in note and "100x70" in note and "stretched" not in note
    a = np.asarray(mask)
    assert mask.getbbox() == (20, 20, 50, 50)          # each painted cell scales to its 2x2 area, half-alpha or not
    assert set(np.unique(a)) == {0, 255}
    _, note = masks.normalize_mask(Image.new("L", (70, 70), 255), (100, 70))
    assert "stretched" in note


def test_unreadable_mask_file_is_named(tmp_path):
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(EngineError, match="mask.png"):
        masks.mask_from_file(bad, (64, 64))


def test_empty_mask_is_refused_and_invert_flips():
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    with pytest.raises(EngineError, match="(?i)the mask is empty: paint the area to change"):
        masks.check_not_empty(masks.normalize_mask(empty, (64, 64))[0])
    with pytest.raises(EngineError, match="(?i)mask is empty"):
        masks.check_not_empty(Image.new("L", (64, 64), 100))          # below the threshold: nothing painted
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 10, 10))
    masks.check_not_empty(mask)
    inv = np.asarray(masks.invert(mask))
    assert inv[:10, :10].max() == 0 and inv[10:].min() == 255 and inv[:, 10:].min() == 255
    masks.check_not_empty(masks.invert(mask))
    with pytest.raises(EngineError):
        masks.check_not_empty(masks.invert(Image.new("L", (8, 8), 255)))


def test_composite_keeps_unpainted_pixels_exactly_and_feathers_inwards():
    orig, gen = _photo(seed=1), _photo(seed=2)
    mask = Image.new("L", orig.size, 0)
    mask.paste(255, (20, 10, 80, 60))
    inside = np.asarray(mask) > 0
    for px in (0, 3, 8):
        out = _arr(masks.composite(orig, gen, mask, px))
        assert np.array_equal(out[~inside], _arr(orig)[~inside]), px          # outside: the original exactly
        assert np.array_equal(out[30:40, 40:60], _arr(gen)[30:40, 40:60]), px   # deep inside: generated exactly
    hard = _arr(masks.composite(orig, gen, mask, 0))
    assert np.array_equal(hard[inside], _arr(gen)[inside])
    # Feathered: the band just inside the edge is a blend, not yet the generated image.
    soft = _arr(masks.composite(orig, gen, mask, 8))
    assert not np.array_equal(soft[10:13, 20:80], _arr(gen)[10:13, 20:80])
    alpha = np.asarray(masks.feather_mask(mask, 8)).astype(int)
    assert alpha[~inside].max() == 0 and alpha[35, 50] == 255
    row = alpha[35, 20:40]                                           # rises from the left edge inwards
    assert row[0] < 80 and np.all(np.diff(row) >= 0) and row[10] > 240
    # A mask of another size is fitted to the image (not an error); a generated image of another size is.
    small = mask.resize((50, 35), Image.NEAREST)
    assert np.array_equal(_arr(masks.composite(orig, gen, small, 0))[~inside], _arr(orig)[~inside])
    with pytest.raises(ValueError):
        masks.composite(orig, gen.resize((64, 64)), mask, 0)


def test_extend_canvas_edge_and_colour_with_overlap_mask():
    img = _photo(96, 64)
    new, mask, note = masks.extend_canvas(img, left=32, bottom=16, fill="edge", overlap=8)
    assert new.size == (128, 80) and mask.size == (128, 80) and note == ""
    a, m, src = _arr(new), np.asarray(mask), _arr(img)
    assert np.array_equal(a[0:64, 32:128], src)                         # the original, moved by (left, top)
    assert np.array_equal(a[:64, 0], src[:, 0])                         # edge-stretched to the left
    assert np.array_equal(a[70, 32:], src[63])                          # and downwards
    assert m[:, :40].min() == 255 and m[56:].min() == 255               # new area + 8 px overlap
    assert m[:56, 40:].max() == 0                                       # the rest of the original is kept
    assert masks.extend_canvas(img, right=16, fill="color", color=(10, 20, 30))[0].getpixel((100, 5)) == (10, 20, 30)
    new, mask, _ = masks.extend_canvas(img, right=16, fill="color")
    assert new.getpixel((110, 30)) == masks.NEUTRAL
    assert np.array_equal(_arr(new)[:, :96], src)
    m = np.asarray(mask)
    assert m[:, 88:].min() == 255 and m[:, :88].max() == 0              # only the extended side overlaps


def test_extend_canvas_rounds_to_multiples_of_16_with_a_note():
    img = _photo(100, 70)
    new, mask, note = masks.extend_canvas(img, left=30, top=0, right=0, bottom=0)
    assert new.size == (144, 80) and new.width % 16 == 0 and new.height % 16 == 0
    assert "144x80" in note and "left by 44 px (30 asked)" in note and "bottom by 10 px (0 asked)" in note
    assert np.array_equal(_arr(new)[:70, 44:144], _arr(img))
    m = np.asarray(mask)
    assert m[70:].min() == 255 and m[:62, 52:].max() == 0
    plan = masks.plan_extension((100, 70), left=30, right=10)
    assert plan["left"] == 30 and plan["right"] == 14                  # extra on the right when both grow
    with pytest.raises(EngineError, match="at least one side"):
        masks.extend_canvas(_photo(96, 64))
    with pytest.raises(EngineError, match="at most"):
        masks.extend_canvas(img, right=5000)
    with pytest.raises(EngineError, match="0 or more"):
        masks.extend_canvas(img, left=-4)
    with pytest.raises(EngineError, match="fill"):
        masks.extend_canvas(img, left=16, fill="mirror")


# ------------------------------------------------------------------------------------------------ preprocessors
def _shapes():
    img = Image.new("RGB", (96, 64), (30, 30, 30))
    d = ImageDraw.Draw(img)
    d.rectangle((20, 16, 60, 48), fill=(220, 40, 40))
    d.ellipse((66, 10, 90, 34), fill=(40, 200, 60))
    return img


def test_table_lists_the_union_modes_by_diffsynth_names():
    assert [p["name"] for p in preprocess.describe()][:1] == ["canny"]
    modes = {p["name"]: p["mode"] for p in preprocess.describe()}
    assert modes == {"canny": "canny", "tile": "tile", "depth": "depth", "blur": "blur", "pose": "pose",
                     "gray": "gray", "lq": "lq", "none": None}
    assert preprocess.UNION_MODES == {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
    assert preprocess.union_mode("canny") == "canny" and preprocess.union_mode(None) is None
    info = {p["name"]: p for p in preprocess.describe()}
    assert info["depth"]["takes_map"] and info["pose"]["takes_map"] and "upload" in info["depth"]["label"].lower()
    assert info["canny"]["params"]["low_threshold"]["default"] == 100
    assert all(p["label"] for p in preprocess.describe())


def test_canny_matches_opencv_and_follows_its_thresholds():
    import cv2
    img = _shapes()
    out = preprocess.preprocess("canny", img)
    assert out.mode == "RGB" and out.size == img.size
    expected = cv2.Canny(np.asarray(img), 100, 200)
    assert np.array_equal(np.asarray(out)[..., 0], expected) and expected.max() == 255
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(out)[..., 2])
    # The thresholds really reach OpenCV: on a soft image, high thresholds drop its weak edges.
    soft = img.filter(ImageFilter.GaussianBlur(3))
    counts = []
    for low, high in ((100, 200), (300, 900)):
        out = np.asarray(preprocess.preprocess("canny", soft, low_threshold=low, high_threshold=high))[..., 0]
        assert np.array_equal(out, cv2.Canny(np.asarray(soft), low, high))
        counts.append(int((out > 0).sum()))
    assert counts[0] > 100 and counts[1] == 0, counts
    with pytest.raises(EngineError, match="low threshold"):
        preprocess.preprocess("canny", img, low_threshold=300, high_threshold=100)
    with pytest.raises(EngineError, match="no parameter radius"):
        preprocess.preprocess("canny", img, radius=3)
    with pytest.raises(EngineError, match="between"):
        preprocess.preprocess("canny", img, high_threshold=5000)


def test_gray_blur_tile_lq_and_passthrough():
    img = _shapes()
    gray = np.asarray(preprocess.preprocess("gray", img))
    assert np.array_equal(gray[..., 0], np.asarray(img.convert("L"))) and np.array_equal(gray[..., 0], gray[..., 1])
    blur = _arr(preprocess.preprocess("blur", img, radius=4))
    assert blur.shape == _arr(img).shape and np.abs(blur - _arr(img)).max() > 50
    assert np.abs(np.diff(blur[32, :, 0])).max() < np.abs(np.diff(_arr(img)[32, :, 0])).max()
    assert np.array_equal(_arr(preprocess.preprocess("blur", img, radius=0)), _arr(img))
    for name in ("tile", "lq"):
        out = preprocess.preprocess(name, img, factor=8)
        assert out.size == img.size and out.mode == "RGB"
        diff = np.abs(_arr(out) - _arr(img))
        assert diff.max() > 30 and diff.mean() < 40, name           # degraded but still the same picture
    # tile: an image constant over each 8x8 cell survives the downscale (box) exactly, up to the bicubic upscale.
    big = Image.fromarray(np.kron(np.random.RandomState(0).randint(0, 255, (8, 12, 3)), np.ones((8, 8, 1)))
                          .astype("uint8"))
    assert np.array_equal(_arr(big.resize((12, 8), Image.BOX).resize(big.size, Image.BICUBIC)),
                          _arr(preprocess.preprocess("tile", big, factor=8)))
    for name in ("depth", "pose", "none", None):
        assert np.array_equal(_arr(preprocess.preprocess(name, img)), _arr(img))
    rgba = img.convert("RGBA")
    assert preprocess.preprocess("none", rgba).mode == "RGB"


def test_unknown_preprocessor_names_the_choices():
    with pytest.raises(EngineError, match="canny"):
        preprocess.preprocess("hed", _shapes())
    with pytest.raises(EngineError, match="not an image"):
        preprocess.preprocess("gray", io.BytesIO(b""))
