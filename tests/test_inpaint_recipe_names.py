"""Inpaint's recipe names the image and the mask honestly (issue 14, smaller items): Gradio's image editor sends the
person's upload as "background.png" and the painted layer as "layer_0.png" (it draws the file in the page and sends
the canvas; the file name never reaches the server), and the tab sends the mask it made from the strokes from its
scratch folder (``<outputs>/.work/``), so those names become what the inputs are; a file sent by its own name (the
API, a restored recipe's copy) keeps it. Through Engine.generate on the FLUX.1-Fill-dev demo."""
from __future__ import annotations

import pytest
from PIL import Image

from app.recipe_text import recipe_text

FILL = "FLUX.1-Fill-dev-random-demo"


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("names-out"),
                  allow_dirs=[tmp_path_factory.getbasetemp()])


def _inputs(folder, image_name: str, mask_name: str):
    """An image and a painted layer as the editor sends them (or under the names given)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (60, 120, 200)).save(folder / image_name)
    layer = Image.new("RGBA", (96, 64), (255, 255, 255, 0))
    layer.paste((255, 255, 255, 255), (20, 20, 50, 40))
    layer.save(folder / mask_name)
    return str(folder / image_name), str(folder / mask_name)


def _recipe(engine, image, mask) -> dict:
    [res] = engine.generate({"variant": FILL, "prompt": "a red ball", "num_inference_steps": 1, "seed": 3,
                             "inpaint_image": image, "inpaint_mask": mask, "mask_feather": 0})
    return res["recipe"]


def test_the_editors_own_file_names_become_what_the_inputs_are(engine, tmp_path):
    # Gradio's upload cache: a folder per file, the editor's names.
    image, mask = _inputs(tmp_path / "gradio" / "3f9a", "background.png", "layer_0.png")
    recipe = _recipe(engine, image, mask)
    assert recipe["inpaint_image"]["file"] == "the image in the editor (96×64)"
    assert recipe["inpaint_mask"]["file"] == "the mask made in the editor"
    text = recipe_text(recipe)
    assert "Image to inpaint: the image in the editor (96×64)" in text
    assert "background.png" not in text and "layer_0.png" not in text


def test_the_mask_the_tab_made_in_its_scratch_folder_is_named_by_what_it_is(engine, tmp_path):
    from studio.features.inpaint_page import mask_preview
    from studio.work_files import WorkFolder
    image, layer = _inputs(tmp_path / "gradio" / "77c1", "background.png", "layer_0.png")
    made = mask_preview(image, layer, None, WorkFolder(tmp_path / "outputs"))
    assert "/.work/" in made["mask"]                    # as the tab sends it: mask-<time>-<random>.png
    recipe = _recipe(engine, image, made["mask"])
    assert recipe["inpaint_mask"]["file"] == "the mask made in the editor"
    assert "mask-" not in recipe_text(recipe)


def test_a_file_sent_by_its_own_name_keeps_it(engine, tmp_path):
    image, mask = _inputs(tmp_path, "harbour at dawn.png", "my-mask.png")
    recipe = _recipe(engine, image, mask)
    assert recipe["inpaint_image"]["file"] == "harbour at dawn.png"
    assert recipe["inpaint_mask"]["file"] == "my-mask.png"
    assert "Image to inpaint: harbour at dawn.png" in recipe_text(recipe)
