"""FLUX.2 multi-reference editing in the studio (issue 16, item 3): the request's ``edit_images`` (several reference
images) on the random-weight klein 4B demo through the Edit feature, every reference recorded in the recipe with its
copy beside the result and restored; and the Edit tab with a second reference in a real browser.

Both use the session's studio (``studio`` in tests/conftest.py) and give its models back at the end.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from studio.features.edit import EditFeature
from tests.browser import set_number

FLUX2 = "FLUX.2-klein-4B-random-demo"
KONTEXT = "FLUX.1-Kontext-dev-random-demo"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def references(studio):
    """Three small reference photos of different sizes (the first sets the output's aspect), in a folder the studio
    may read (its models folder: a request may name files there)."""
    folder = pathlib.Path(studio.engine.models_dir) / "flux2-edit-refs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(21)
    paths = []
    for name, (w, h) in (("room.png", (96, 64)), ("lamp.png", (64, 80)), ("chair.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_flux2_edits_with_two_references_records_and_restores_them(studio, references):
    engine, references = studio.engine, references[:2]
    try:
        request = {"variant": FLUX2, "prompt": "put the lamp in the room", "width": 64, "height": 64,
                   "num_inference_steps": 2, "seed": 5, "edit_images": [str(p) for p in references]}
        made = engine.generate(dict(request))[0]
        recipe = made["recipe"]
        entries = recipe["edit_images"]
        assert [e["file"] for e in entries] == ["room.png", "lamp.png"]
        assert [e["copy"] for e in entries] == [".ref0.png", ".ref1.png"]
        assert [e["size"] for e in entries] == [[96, 64], [64, 80]]
        result = pathlib.Path(made["path"])
        for i, ref in enumerate(references):          # each reference kept whole beside the result
            copy = result.with_name(result.stem + f".ref{i}.png")
            assert np.array_equal(_pixels(copy), _pixels(ref))
        lines = "\n".join(EditFeature().describe(recipe))         # what the image info shows (app.recipe_text)
        assert "FLUX.2 reference 1: room.png" in lines and "FLUX.2 reference 2: lamp.png" in lines
        # The references count: one reference alone makes another image with the same seed.
        one = engine.generate(dict(request, edit_images=[str(references[0])]))[0]
        assert np.abs(_pixels(one["path"]) - _pixels(made["path"])).mean() > 0.5
        from studio.history import tab_of
        assert tab_of(recipe) == "edit"                         # History sends it back to the Edit tab
        # Restore: the request points at both copies, in order, and makes the same image again.
        again = engine.read_recipe(made["path"])
        assert [pathlib.Path(p).name for p in again["edit_images"]] == [result.stem + ".ref0.png",
                                                                        result.stem + ".ref1.png"]
        assert np.array_equal(_pixels(engine.generate(again)[0]["path"]), _pixels(made["path"]))
        # FLUX.2 takes edit_images, not Kontext's key; a FLUX.1 model does not take edit_images.
        with pytest.raises(EngineError, match="edit_images"):
            engine.generate(dict(request, edit_images=[], kontext_images=[str(references[0])]))
        with pytest.raises(EngineError, match=FLUX2):
            engine.generate(dict(request, variant=KONTEXT))
    finally:
        engine.release_models()      # the other tests start from the FLUX.1 demo again


def _thumbs(page) -> str:
    """The file names of the "More reference images" thumbnails, in order (the upload copies keep the name)."""
    return page.evaluate("() => [...document.querySelectorAll('#edit-more-refs img')]"
                         ".map(img => decodeURIComponent(img.src).split('/').pop()).join(' ')")


def test_flux2_in_the_edit_tab_with_more_references_reordered(page, studio, references, shots):
    """Two more references added, the last moved first, the edit records all three in that order; one removed;
    restore brings both back."""
    room, lamp, chair = references
    try:
        page.get_by_role("tab", name="Edit", exact=True).click()
        page.locator("#edit-model input").click()
        page.locator("ul[role='listbox'] li", has_text="FLUX.2 [klein] 4B random-weight demo").click()
        page.locator("#edit-more-refs").wait_for(state="visible")
        page.locator("#edit-input input[type='file']").set_input_files(str(room))
        page.wait_for_function("document.querySelector('#edit-size-line')?.innerText?.includes('Output:')")
        page.locator("#edit-more-refs input[type='file']").set_input_files([str(lamp), str(chair)])
        page.wait_for_function("document.querySelectorAll('#edit-more-refs img').length === 2")
        assert _thumbs(page).index("lamp") < _thumbs(page).index("chair")
        page.locator("#edit-more-refs img").nth(1).click()          # the chair ...
        page.locator("#edit-more-refs-earlier").click()             # ... goes first
        page.wait_for_function("(() => { const s = [...document.querySelectorAll('#edit-more-refs img')]"
                               ".map(i => i?.src || ''); return s.length === 2 && s[0].includes('chair'); })()")
        set_number(page, "edit-megapixels", 0.01)
        page.wait_for_function("document.querySelector('#edit-size-line')?.innerText?.includes('128 × 80')")
        set_number(page, "edit-steps", 2)
        set_number(page, "edit-seed", 777)
        page.locator("#edit-prompt textarea").fill("put the lamp and the chair in the room")
        page.locator("#edit-generate").click()
        page.wait_for_function("document.querySelector('#edit-selected-info textarea')?.value?.includes('Seed: 777')")
        info = page.locator("#edit-selected-info textarea").input_value()
        assert f"Variant: {FLUX2}" in info and "Steps: 2," in info
        assert ("FLUX.2 reference 1: room.png" in info and "FLUX.2 reference 2: chair.png" in info
                and "FLUX.2 reference 3: lamp.png" in info), info
        page.screenshot(path=str(shots / "flux2-edit.png"), full_page=True)
        # Remove the selected (first) one: the lamp is left.
        page.locator("#edit-more-refs-remove").click()
        page.wait_for_function("document.querySelectorAll('#edit-more-refs img').length === 1")
        assert "lamp" in _thumbs(page) and "chair" not in _thumbs(page)
        # Restore brings both back into the gallery from their copies beside the result, in the recorded order.
        page.locator("#edit-restore-selected").click()
        page.wait_for_function("(() => { const s = [...document.querySelectorAll('#edit-more-refs img')]"
                               ".map(i => i?.src || ''); return s.length === 2 && s[0].includes('.ref1.png') "
                               "&& s[1].includes('.ref2.png'); })()")
    finally:
        studio.engine.release_models()


def test_reference_order_moves_and_removes_within_the_list():
    from app.reference_order import moved, removed
    assert moved(["a", "b", "c"], 2, -1) == (["a", "c", "b"], 1)
    assert moved(["a", "b", "c"], 0, -1) == (["a", "b", "c"], 0)          # the first stays first
    assert moved(["a", "b", "c"], 1, 1) == (["a", "c", "b"], 2)
    assert moved(["a"], None, 1) == (["a"], None)
    assert removed(["a", "b", "c"], 2) == (["a", "b"], 1)
    assert removed(["a"], 0) == ([], None)


def test_the_edit_tab_offers_flux2_with_more_references(studio):
    from app.uploads import gallery_paths
    from tabs.edit import editor_choices, takes_several
    _, infos = editor_choices(studio.engine)
    assert FLUX2 in infos and "FLUX.2-klein-4B" in infos and "FLUX.2-dev" in infos
    assert takes_several(infos[FLUX2]) and takes_several(infos[KONTEXT])
    assert not takes_several(infos["Step1X-Edit"])          # one reference: no gallery
    # A gallery's value, whatever the item shape, gives its files in order.
    assert gallery_paths([("/a.png", None), "/b.png", {"image": {"path": "/c.png"}}, None]) == ["/a.png", "/b.png",
                                                                                               "/c.png"]
