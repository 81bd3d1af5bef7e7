"""The engine's editing plumbing: reference images validated (clear errors), the variant must take them, the
output size of an edit (Engine.edit_size), and — on the demo Kontext model — the references passed to the
pipeline, recorded in the recipe and copied next to the result."""
from __future__ import annotations

import pathlib

import pytest
from PIL import Image

from engine import EngineError
from engine import registry
from studio.engine import Engine

SMALL = {"num_inference_steps": 2}
KONTEXT_DEMO = "FLUX.1-Kontext-dev-random-demo"


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("edit-outputs"),
                  allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' input images


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 160x96 RGBA picture (transparent right third): the engine must put it on white."""
    img = Image.new("RGBA", (160, 96), (200, 40, 40, 255))
    img.paste((0, 0, 0, 0), (110, 0, 160, 96))
    path = tmp_path_factory.mktemp("refs") / "photo.png"
    img.save(path)
    return path


def test_a_variant_that_takes_no_reference_is_refused_by_name(engine, photo):
    with pytest.raises(EngineError) as caught:
        engine.generate({**SMALL, "variant": "FLUX.1-dev-random-demo", "kontext_images": [str(photo)]})
    message = str(caught.value)
    assert "FLUX.1-dev-random-demo" in message and "kontext_images" in message and "no reference images" in message
    with pytest.raises(EngineError) as caught:
        engine.generate({**SMALL, "variant": "FLUX.1-dev-random-demo", "step1x_reference_image": str(photo)})
    assert "step1x_reference_image" in str(caught.value)
    # The engine is fine afterwards.
    assert engine.generate({**SMALL, "width": 64, "height": 64, "seed": 1})[0]["seed"] == 1


def test_edit_size_follows_the_input(engine, photo, tmp_path):
    size = engine.edit_size(str(photo))
    assert (size["width"], size["height"]) == (1328, 800)      # 160:96 at about 1 MP, multiples of 16
    assert "not cropped" in size["note"]
    assert engine.edit_size(str(photo), megapixels=0.25)[("width")] == 656
    assert engine.edit_size(str(photo), width=512, height=512)["width"] == 512
    assert engine.edit_size(str(photo), width=640) == {**engine.edit_size(str(photo), width=640), "height": 384}
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (40, 40)).save(tiny)
    with pytest.raises(EngineError) as caught:
        engine.edit_size(str(tiny))
    assert "tiny.png" in str(caught.value) and "40x40" in str(caught.value)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(EngineError) as caught:
        engine.edit_size(str(junk))
    assert "junk.jpg" in str(caught.value)


def test_variants_list_their_extra_inputs(engine):
    listed = {v["name"]: v for v in engine.variants()}
    assert listed["FLUX.1-dev-random-demo"]["extra_inputs"] == []
    for v in registry.VARIANTS:
        if v.name in listed:
            assert listed[v.name]["extra_inputs"] == list(v.extra_inputs)


def test_edit_tab_does_not_import_torch():
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys, app.studio, tabs.edit, engine.images\n"
            "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr


def test_kontext_demo_edits_with_the_reference(engine, photo, tmp_path, monkeypatch):
    import numpy as np
    from engine import images as engine_images      # the Edit feature imports edit_output_size from here per job

    names = {v["name"]: v for v in engine.variants()}
    assert KONTEXT_DEMO in names and names[KONTEXT_DEMO]["extra_inputs"] == ["kontext_images"]
    # No width/height asked: the engine picks the input's 160:96 aspect at about 1 MP (1328x800). Decoding that
    # size alone takes ~10 s on the CPU, so the job runs at a quarter of the size the engine picked: the pick is
    # recorded (and must be 1328x800), and the image must come out at the size handed back.
    picked, real = [], engine_images.edit_output_size

    def quarter(size, *args, **kwargs):
        w, h, note = real(size, *args, **kwargs)
        picked.append((tuple(size), args, kwargs, (w, h)))
        return w // 4 // 16 * 16, h // 4 // 16 * 16, note

    monkeypatch.setattr(engine_images, "edit_output_size", quarter)
    calls = []
    result = engine.generate({**SMALL, "variant": KONTEXT_DEMO, "prompt": "make it red", "seed": 9,
                              "kontext_images": [str(photo)]}, progress=lambda d, t, m: calls.append(d))
    monkeypatch.undo()
    (made,) = result
    assert len(picked) == 1 and picked[0][0] == (160, 96) and picked[0][3] == (1328, 800)
    assert not picked[0][1] and not any(picked[0][2].values())        # no size asked
    assert (made["width"], made["height"]) == (320, 192)
    with Image.open(made["path"]) as im:
        assert im.size == (320, 192)
    assert max(calls) == 2
    ref = made["recipe"]["kontext_images"][0]
    assert ref["file"] == "photo.png" and len(ref["fingerprint"]) == 16 and ref["size"] == [160, 96]
    out = pathlib.Path(made["path"])
    copy = out.with_name(out.stem + ".ref0.png")
    with Image.open(copy) as im:
        assert im.mode == "RGB" and im.size == (160, 96) and im.getpixel((150, 50)) == (255, 255, 255)
    assert engine.read_recipe(out)["kontext_images"] == [str(copy)]
    # The reference really reaches the model: another reference, same seed and prompt, another image.
    other = tmp_path / "other.png"
    Image.new("RGB", (160, 96), (0, 200, 0)).save(other)
    small = {**SMALL, "variant": KONTEXT_DEMO, "prompt": "make it red", "seed": 9, "width": 64, "height": 64}
    a = engine.generate({**small, "kontext_images": [str(photo)]})[0]
    b = engine.generate({**small, "kontext_images": [str(other)]})[0]
    again = engine.generate({**small, "kontext_images": [str(photo)]})[0]
    pix = lambda r: np.asarray(Image.open(r["path"]), dtype=np.int16)  # noqa: E731
    assert not np.array_equal(pix(a), pix(b))
    assert np.array_equal(pix(a), pix(again))
    # Several reference images: each recorded and copied.
    two = engine.generate({**small, "kontext_images": [str(photo), str(other)]})[0]
    assert [r["file"] for r in two["recipe"]["kontext_images"]] == ["photo.png", "other.png"]
    path = pathlib.Path(two["path"])
    assert path.with_name(path.stem + ".ref1.png").is_file()


def test_a_large_reference_is_used_at_about_the_output_area(engine, tmp_path, monkeypatch):
    """The attack: a 2048x2048 reference beside a 0.06 MP output took 49 s and 2.9 GB (its tokens join the sequence).
    The model now gets it at about the output's area, said in a note; the copy beside the result keeps its size."""
    from engine.pipeline import FluxImagePipeline
    big = tmp_path / "big.png"
    Image.new("RGB", (2048, 1536), (20, 160, 90)).save(big)
    seen = []
    original = FluxImagePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append([im.size for im in kwargs.get("kontext_images") or []])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxImagePipeline, "__call__", spy)
    [result] = engine.generate({**SMALL, "variant": KONTEXT_DEMO, "kontext_images": [str(big)], "width": 128,
                                "height": 96, "seed": 3})
    (w, h), = seen[0]
    assert w * h <= 128 * 96 * 1.1 and abs(w / h - 2048 / 1536) < 0.05
    assert any("downscaled to" in n and "2048x1536" in n for n in result["notes"])
    assert result["recipe"]["kontext_images"][0]["size"] == [2048, 1536]
    with Image.open(pathlib.Path(result["path"]).with_name(pathlib.Path(result["path"]).stem + ".ref0.png")) as ref:
        assert ref.size == (2048, 1536)
