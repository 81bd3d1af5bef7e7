"""engine/images.py: the images people hand in for editing (modes, EXIF rotation, sizes, broken files) and the
output size of an edit. Every image here is made by the test."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from engine.images import edit_output_size, image_size, load_user_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_exif_orientation_6_is_turned_upright(tmp_path):
    # A 128x64 picture: left half red, right half blue. Stored rotated, with orientation 6 ("rotate 90 cw to view").
    upright = Image.new("RGB", (128, 64), (255, 0, 0))
    upright.paste((0, 0, 255), (64, 0, 128, 64))
    stored = upright.transpose(Image.Transpose.ROTATE_90)   # 64x128, as a camera would store it
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (64, 128)
    img = load_user_image(path)
    assert img.mode == "RGB"
    assert img.size == image_size(path)
    # Orientation 6 means the viewer rotates 90 degrees clockwise: the result is landscape again.
    assert img.size == (128, 64)
    left, right = img.getpixel((10, 32)), img.getpixel((118, 32))
    # ROTATE_90 is counter-clockwise; undoing it with a clockwise turn gives back red on the left.
    assert left[0] > 200 and left[2] < 60, left
    assert right[2] > 200 and right[0] < 60, right


def test_rgba_is_put_on_white(tmp_path):
    img = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 40, 80))
    out = load_user_image(_save(img, tmp_path / "alpha.png"))
    assert out.mode == "RGB" and out.size == (80, 80)
    assert out.getpixel((10, 10)) == (255, 0, 0)
    assert out.getpixel((70, 10)) == (255, 255, 255)   # transparent -> white, not black
    la = Image.new("LA", (70, 70), (0, 0))
    assert load_user_image(_save(la, tmp_path / "la.png")).getpixel((5, 5)) == (255, 255, 255)


def test_palette_images(tmp_path):
    img = Image.new("RGB", (96, 64), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert img.mode == "P"
    out = load_user_image(_save(img, tmp_path / "pal.png"))
    assert out.mode == "RGB" and out.getpixel((3, 3))[1] > 100
    # A palette with a transparent entry: on white too.
    transparent = Image.new("P", (64, 64), 0)
    transparent.putpalette([0, 0, 0] * 256)
    out = load_user_image(_save(transparent, tmp_path / "pal-t.png", transparency=0))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    out = load_user_image(_save(transparent, tmp_path / "pal-t.gif", transparency=0))
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grey(tmp_path):
    arr = np.zeros((64, 128), dtype=np.uint16)
    arr[:, 64:] = 65535
    arr[:, :64] = 32768
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = load_user_image(_save(img, tmp_path / "deep.png"))
    assert out.mode == "RGB"
    assert out.getpixel((100, 10)) == (255, 255, 255)
    assert 120 <= out.getpixel((10, 10))[0] <= 135      # mid grey, not clipped to white
    i32 = Image.fromarray(arr.astype(np.int32), "I")
    assert load_user_image(i32).getpixel((100, 10)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (64, 64), (0, 255, 255, 0))    # red in CMYK
    out = load_user_image(_save(img, tmp_path / "cmyk.jpg"))
    r, g, b = out.getpixel((30, 30))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_tiny_images_are_refused_with_the_size(tmp_path):
    path = _save(Image.new("RGB", (32, 200)), tmp_path / "tiny.png")
    with pytest.raises(EngineError) as caught:
        load_user_image(path)
    message = str(caught.value)
    assert "tiny.png" in message and "32x200" in message and "64" in message


def test_huge_images_are_downscaled_or_refused(tmp_path):
    wide = Image.new("RGB", (6000, 1000), (10, 20, 30))
    notes: list = []
    out = load_user_image(_save(wide, tmp_path / "wide.png"), notes=notes)
    assert out.size == (4096, 683)
    assert notes and "6000x1000" in notes[0] and "4096x683" in notes[0] and "downscaled" in notes[0]
    # Above 40 MP (checked from the header, before decoding): refused, naming the size and the fix.
    with pytest.raises(EngineError) as caught:
        load_user_image(Image.new("L", (8000, 6000)))
    message = str(caught.value)
    assert "8000x6000" in message and "48.0 MP" in message and "Resize" in message
    with pytest.raises(EngineError) as caught:
        load_user_image(Image.new("L", (9000, 100)))
    assert "9000x100" in str(caught.value)


def test_garbage_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is not a picture at all" * 10)
    with pytest.raises(EngineError) as caught:
        load_user_image(bad)
    assert "holiday.png" in str(caught.value) and "PNG" in str(caught.value)
    # A real PNG cut in half: the header reads, the pixels do not.
    good = _save(Image.effect_noise((256, 256), 50).convert("RGB"), tmp_path / "cut.png")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError) as caught:
        load_user_image(good)
    assert "cut.png" in str(caught.value)
    with pytest.raises(EngineError) as caught:
        load_user_image(tmp_path / "nowhere.jpg")
    assert "nowhere.jpg" in str(caught.value)
    with pytest.raises(EngineError) as caught:
        image_size(bad)
    assert "holiday.png" in str(caught.value)


def test_edit_output_size_follows_the_input():
    w, h, note = edit_output_size((1920, 1080))
    assert (w, h) == (1360, 768) and w % 16 == 0 and h % 16 == 0
    assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.05
    assert "not cropped" in note and "1920x1080" in note
    assert edit_output_size((500, 500))[:2] == (1024, 1024)
    w, h, _ = edit_output_size((1080, 1920), target_pixels=512 * 512)
    assert (w, h) == (384, 688) and h > w
    # Explicit sizes: both as asked (rounded up to 16), or one and the other following the aspect.
    w, h, note = edit_output_size((1920, 1080), width=1000, height=1000)
    assert (w, h) == (1008, 1008) and "aspect differs" in note
    assert edit_output_size((1920, 1080), width=1024)[:2] == (1024, 576)
    assert edit_output_size((1920, 1080), height=720)[:2] == (1280, 720)
    # Extreme aspects stay inside 64..4096.
    w, h, _ = edit_output_size((8000, 100))
    assert w <= 4096 and h >= 64 and w % 16 == 0 and h % 16 == 0


def test_images_module_does_not_import_torch():
    code = "import sys, engine.images\nassert 'torch' not in sys.modules, 'torch imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert result.returncode == 0, result.stderr
