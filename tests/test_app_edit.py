"""The Edit tab through the API (/edit, gradio_client), on the real engine's demo models (the browser tests are in
tests/test_app_browser.py).

The studio is the session's one (tests.test_app_client.running_studio): the random-weight FLUX.1-dev demo and the
FLUX.1-Kontext-dev demo variant that uses the same files.
"""
from __future__ import annotations


import pytest
from PIL import Image

from studio import recipes as R
from tests.test_app_client import DEMO, DEMO_LORA

KONTEXT_DEMO = "FLUX.1-Kontext-dev-random-demo"


@pytest.fixture(scope="session")
def client(studio, tmp_path_factory):
    from gradio_client import Client

    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("edit-downloads")))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 320x200 RGBA picture: blue with a yellow square and a transparent strip on the right."""
    img = Image.new("RGBA", (320, 200), (40, 90, 200, 255))
    img.paste((250, 200, 0, 255), (40, 40, 140, 160))
    img.paste((0, 0, 0, 0), (280, 0, 320, 200))
    path = tmp_path_factory.mktemp("edit-inputs") / "street.png"
    img.save(path)
    return path


def _edit(client, image, **overrides):
    from gradio_client import handle_file

    args = {"image": handle_file(str(image)), "variant": KONTEXT_DEMO, "prompt": "make the square red",
            "negative_prompt": "", "num_inference_steps": 2, "embedded_guidance": 2.5, "cfg_scale": 1.0,
            "seed": 7, "megapixels": 0.06, "width": 0, "height": 0, "num_images": 1}
    args.update(overrides)
    return client.predict(*args.values(), api_name="/edit")


# ---------------------------------------------------------------------------------------------------------------
# /edit
# ---------------------------------------------------------------------------------------------------------------

def test_edit_endpoint_on_the_kontext_demo(client, studio, photo):
    images, info, seed = _edit(client, photo)
    assert seed == 7 and len(images) == 1
    path = images[0]["image"]
    with Image.open(path) as im:
        assert im.size == (320, 192)            # the input's 320:200 aspect at about 0.06 MP, multiples of 16
    recipe = R.read_recipe(path)
    assert recipe["variant"] == KONTEXT_DEMO and recipe["prompt"] == "make the square red"
    (ref,) = recipe["kontext_images"]
    assert ref["file"] == "street.png" and len(ref["fingerprint"]) == 16 and ref["size"] == [320, 200]
    assert "Reference images:" in info and "street.png" in info
    # The reference, as the model saw it (RGB, transparency on white), is saved beside the result in outputs/.
    saved = next(p for p in studio.outputs.rglob("*.png") if R.read_recipe(p) == recipe)
    copy = saved.with_name(saved.stem + ref["copy"])
    with Image.open(copy) as im:
        assert im.mode == "RGB" and im.size == (320, 200) and im.getpixel((300, 100)) == (255, 255, 255)
    # Reading the recipe back gives the copy as the image to edit again.
    assert studio.engine.read_recipe(saved)["kontext_images"] == [str(copy)]


def test_edit_endpoint_explicit_size_and_several_images(client, photo):
    images, _, seed = _edit(client, photo, width=96, height=100, seed=3, num_images=2)
    assert seed == 3 and [R.read_recipe(i["image"])["seed"] for i in images] == [3, 4]
    with Image.open(images[0]["image"]) as im:
        assert im.size == (96, 112)
    # LoRAs, as in /generate: recorded in the recipe.
    images, info, _ = _edit(client, photo, seed=3, loras=[[DEMO_LORA, 0.5]])
    entry = R.read_recipe(images[0]["image"])["loras"][0]
    assert entry["file"].endswith(DEMO_LORA) and entry["weight"] == 0.5 and DEMO_LORA in info


def test_edit_endpoint_refuses_bad_input_with_messages(client, photo, tmp_path):
    from gradio_client.exceptions import AppError

    tiny = tmp_path / "icon.png"
    Image.new("RGB", (48, 48)).save(tiny)
    with pytest.raises(AppError) as caught:
        _edit(client, tiny)
    assert "icon.png" in str(caught.value) and "48x48" in str(caught.value)
    junk = tmp_path / "broken.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(AppError) as caught:
        _edit(client, junk)
    assert "broken.png" in str(caught.value)
    with pytest.raises(AppError) as caught:   # a model that does not edit
        _edit(client, photo, variant=DEMO)
    assert DEMO in str(caught.value) and "Traceback" not in str(caught.value)
    images, _, seed = _edit(client, photo, seed=11)   # still usable
    assert seed == 11 and len(images) == 1


def test_edit_endpoint_turns_an_exif_rotated_photo_upright(client, studio, tmp_path):
    # A camera JPEG stored 96 wide x 160 high with orientation 6: upright it is 160 wide x 96 high.
    upright = Image.new("RGB", (160, 96), (220, 30, 30))
    upright.paste((30, 30, 220), (80, 0, 160, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "camera.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    images, info, _ = _edit(client, path, seed=12)
    recipe = R.read_recipe(images[0]["image"])
    assert recipe["kontext_images"][0]["size"] == [160, 96]
    with Image.open(images[0]["image"]) as im:
        assert im.width > im.height                  # the output follows the upright aspect


def test_cancel_stops_an_edit(client, studio, photo):
    import time

    from gradio_client import handle_file

    job = client.submit(handle_file(str(photo)), KONTEXT_DEMO, "a long edit", "", 100, 2.5, 1.0, 3, 0.25, 0, 0, 1,
                        api_name="/edit")
    deadline = time.time() + 60
    while time.time() < deadline:
        status = job.status()
        if status.progress_data and any((u.index or 0) >= 1 and u.unit == "steps" for u in status.progress_data):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the edit never reported a denoising step")
    client.predict(api_name="/edit_cancel")
    images, info, seed = job.result(timeout=30)
    assert images == [] and info == "Cancelled." and seed is None
    images, _, seed = _edit(client, photo, seed=13)
    assert seed == 13 and len(images) == 1


def test_edit_tab_helpers(studio, photo):
    from tabs.edit import editor_choices, size_line

    choices, infos = editor_choices(studio.engine)
    assert KONTEXT_DEMO in [name for _, name in choices] and DEMO not in infos
    # The helpers get what the page holds: an upload or a file in the studio's folders (a test file is copied in).
    inside = studio.outputs / "inputs" / photo.name
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(photo.read_bytes())
    photo = inside
    line = size_line(studio.engine, str(photo), 1.0)
    assert "**1296 × 816**" in line and "not cropped" in line
    assert "**512 × 512**" in size_line(studio.engine, str(photo), 1.0, True, 512, 512)
    assert size_line(studio.engine, None, 1.0).startswith("Upload")
