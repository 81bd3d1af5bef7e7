"""Messages at the field, walked in the browser (issue 14, "What it must do" 1 and 8): a text file named .png in
Edit, in the image-info box and in Inpaint; Inpaint's "Clear mask"; width 17 / 100000, steps 0 and seed -7 on
Generate; a Forge PNG made with a model that is not downloaded; Cancel beside a previous image; one wording for
models not downloaded; a control image left over when Fill is chosen. Plus the EliGen layout file (no "seed": null).

The real engine's demo models, Debian's chromium (tests/browser.py); screenshots go to $FLUX_UI_SHOTS when set.
"""
from __future__ import annotations

import json
import pathlib
import re
import zipfile

import pytest
from PIL import Image, PngImagePlugin

from tests.browser import set_number, upload_to_inpaint

TIMEOUT_MS = 60_000
RAW_ERRORS = ("Could not preprocess", "UnidentifiedImageError", "Traceback", "/tmp/gradio", "less than minimum",
              "greater than maximum")



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("field-inputs")
    (root / "letter.png").write_text("Dear studio,\nthis is not a picture.\n")
    Image.new("RGB", (256, 192), (60, 120, 200)).save(root / "blue.png")
    control = Image.new("RGB", (256, 192), (10, 10, 10))
    control.paste((240, 240, 240), (40, 40, 200, 150))
    control.save(root / "boxes.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a harbour at dawn\nSteps: 12, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, "
                                "Seed: 777, Size: 320x192, Model: flux1-dev-fp8")
    Image.new("RGB", (320, 192), (90, 60, 30)).save(root / "forge.png", pnginfo=info)
    return root


def _no_raw_error(page) -> None:
    text = page.locator("body").inner_text()
    assert not any(w in text for w in RAW_ERRORS), [w for w in RAW_ERRORS if w in text]


def _no_error_badge(page, elem_id: str) -> None:
    badge = page.locator(f"#{elem_id} .error")
    assert badge.count() == 0 or not badge.first.is_visible(), f"#{elem_id} shows an Error badge"


# -------------------------------------------------------------------------------------------- bad uploads
def test_a_text_file_named_png_is_named_at_the_field_in_edit_info_and_inpaint(page, files, shots):
    letter = str(files / "letter.png")
    expected = "letter.png is not an image (it looks like text). Use a PNG, JPEG or WebP file."

    page.locator("#gen-info-accordion button").first.click()
    page.locator("#info-image input[type='file']").set_input_files(letter)
    note = page.locator("#info-image-note")
    note.filter(has_text=expected).wait_for()
    assert note.inner_text().strip() == f"⚠ Drop a PNG: {expected}"
    page.wait_for_timeout(1000)       # the field's other events (the recipe reader) have answered by now
    _no_error_badge(page, "info-recipe")
    assert page.locator("#info-image img").count() == 0       # the file was taken out of the field

    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-input input[type='file']").set_input_files(letter)
    page.locator("#edit-input-note", has_text=f"Image to edit: {expected}").wait_for()
    page.wait_for_timeout(1000)
    assert page.locator("#edit-input img").count() == 0
    assert page.locator("#edit-size-line").inner_text().startswith("Upload or paste an image")
    _no_error_badge(page, "edit-size-line")
    page.locator("#edit-settings").screenshot(path=str(shots / "field-edit-text-file.png"))
    _no_raw_error(page)
    # A real image afterwards clears the note.
    page.locator("#edit-input input[type='file']").set_input_files(str(files / "blue.png"))
    page.wait_for_function("document.querySelector('#edit-size-line')?.innerText?.includes('Output')")
    page.wait_for_function("!document.querySelector('#edit-input-note')?.innerText?.includes('⚠')")

    page.get_by_role("tab", name="Inpaint & Control").click()
    page.locator("#inp-editor canvas").first.wait_for(state="visible")     # the editor is drawn (and wired)
    page.locator("#inp-editor input[type='file']").first.set_input_files(letter)
    page.locator("#inp-editor-note", has_text=expected).wait_for()
    page.locator("#inp-settings").screenshot(path=str(shots / "field-inpaint-text-file.png"))
    _no_raw_error(page)
    upload_to_inpaint(page, files / "blue.png", "256 × 192")
    page.wait_for_function("!document.querySelector('#inp-editor-note')?.innerText?.includes('⚠')")


# -------------------------------------------------------------------------------------------- clear mask
def _preview_src(page) -> str:
    return page.evaluate("() => document.querySelector('#inp-mask-preview img')?.src || ''")


def _tinted_share(page, src: str) -> float:
    """The share of the mask preview's pixels that are not the plain blue picture (the tint of the painted area)."""
    import io

    import numpy as np
    data = page.request.get(src).body()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    return float((np.abs(pixels - np.array([60, 120, 200])).sum(axis=2) > 30).mean())


def test_clear_mask_clears_mask_used_at_once_and_leaves_the_editor_usable(page, files, shots):
    upload_to_inpaint(page, files / "blue.png", "256 × 192")
    page.locator("#inp-mask-preview img").wait_for()          # the preview of the image with nothing painted
    page.wait_for_timeout(500)
    box = page.locator("#inp-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    before = _preview_src(page)
    page.mouse.move(cx - 50, cy)
    page.mouse.down()
    page.mouse.move(cx + 50, cy, steps=12)
    page.mouse.up()
    page.wait_for_function("(b) => { const i = document.querySelector('#inp-mask-preview img');"
                           " return i && i.src && i.src !== b; }", arg=before)
    painted = _preview_src(page)
    assert _tinted_share(page, painted) > 0.02

    page.locator("#inp-clear-mask").click()
    # "Mask used" follows within a second (it used to keep the old strokes), and the editor is not left greyed.
    page.wait_for_function("(b) => { const i = document.querySelector('#inp-mask-preview img');"
                           " return i && i.src && i.src !== b; }", arg=painted, timeout=3000)
    assert _tinted_share(page, _preview_src(page)) < 0.005
    # The editor is never greyed over: a full progress overlay would cover it while the page re-reads it (seconds,
    # on a busy machine); at most the small timer shows in its corner.
    tracker = page.locator("#inp-editor [data-testid='status-tracker']")
    for _ in range(4):
        classes = [tracker.nth(i).get_attribute("class") or "" for i in range(tracker.count())]
        assert all("hide" in c or "full" not in c for c in classes), classes
        page.wait_for_timeout(500)
    page.locator("#inp-settings").screenshot(path=str(shots / "field-clear-mask.png"))


# -------------------------------------------------------------------------------------------- size, steps, seed
def _line(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def test_out_of_range_size_steps_and_seed_say_what_is_used_at_the_field(page, studio, shots):
    page.locator("#gen-prompt textarea").fill("a field test")
    set_number(page, "gen-height", 64)
    set_number(page, "gen-width", 17)
    page.wait_for_function("document.querySelector('#gen-size-line')?.innerText?.includes('64 px will be used')")
    line = _line(page, "gen-size-line")
    assert "Output: 64 × 64" in line and "Width 17 px is below the minimum, 64 px" in line
    # The page has put the box at 64 (it does so when the box loses focus): the note stays beside it.
    assert page.locator("#gen-width input[type='number']").input_value() == "64"
    _no_error_badge(page, "gen-size-line")

    set_number(page, "gen-width", 100000)
    page.wait_for_function("document.querySelector('#gen-size-line')?.innerText?.includes('4096 px will be used')")
    assert "Output: 4096 × 64" in _line(page, "gen-size-line")
    _no_error_badge(page, "gen-size-line")
    page.locator("#gen-settings").screenshot(path=str(shots / "field-width-100000.png"))

    # A width in range drops the note.
    set_number(page, "gen-width", 96)
    page.wait_for_function("document.querySelector('#gen-size-line')?.innerText.startsWith('Output: 96 × 64')")
    assert "will be used" not in _line(page, "gen-size-line")

    set_number(page, "gen-steps", 0)
    page.locator("#gen-steps-note", has_text="Steps 0 is below the minimum, 1: 1 will be used.").wait_for()
    set_number(page, "gen-steps", 2)
    page.wait_for_function("document.querySelector('#gen-steps-note')?.innerText.trim() === ''")

    set_number(page, "gen-seed", -7)
    page.locator("#gen-seed-note", has_text="Seed -7 cannot be used: type -1 for a random seed").wait_for()
    page.locator("#gen-settings").screenshot(path=str(shots / "field-steps-seed.png"))
    page.locator("#gen-generate").click()
    # Generate refuses that seed in the engine's words (not Gradio's "Value -7 is less than minimum value -1").
    page.locator(".toast-body", has_text="Seed must be -1 (random) or a whole number from 0 up").first.wait_for()
    _no_raw_error(page)
    page.wait_for_selector("#gen-generate", state="visible")

    # Width typed as 17 makes what the line said: 64 px.
    set_number(page, "gen-seed", 41)
    page.wait_for_function("document.querySelector('#gen-seed-note')?.innerText.trim() === ''")
    set_number(page, "gen-width", 17)
    page.wait_for_function("document.querySelector('#gen-size-line')?.innerText?.includes('64 px will be used')")
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea')?.value.includes('Seed: 41,')",
                           timeout=120_000)
    assert "Size: 64x64" in page.locator("#selected-info textarea").input_value()


@pytest.mark.parametrize("tab, prefix", [("Edit", "edit"), ("Inpaint & Control", "inp")])
def test_steps_and_seed_notes_in_edit_and_inpaint(page, tab, prefix):
    page.get_by_role("tab", name=tab).click()
    set_number(page, f"{prefix}-steps", 0)
    page.locator(f"#{prefix}-steps-note", has_text="Steps 0 is below the minimum, 1: 1 will be used.").wait_for()
    assert page.locator(f"#{prefix}-steps input[type='number']").input_value() == "1"
    set_number(page, f"{prefix}-seed", -7)
    page.locator(f"#{prefix}-seed-note", has_text="Seed -7 cannot be used").wait_for()
    set_number(page, f"{prefix}-seed", 12)
    page.wait_for_function(f"document.querySelector('#{prefix}-seed-note')?.innerText.trim() === ''")
    _no_raw_error(page)


# -------------------------------------------------------------------------------------------- restore, cancel
def test_a_forge_png_of_a_model_not_downloaded_says_which_model_and_what_was_chosen(page, files):
    page.locator("#gen-info-accordion button").first.click()
    page.locator("#info-image input[type='file']").set_input_files(str(files / "forge.png"))
    page.wait_for_function("document.querySelector('#info-recipe textarea')?.value.includes('Seed: 777')")
    recipe = page.locator("#info-recipe textarea").input_value()
    assert ("Model 'flux1-dev-fp8' is FLUX.1-dev: restoring chooses FLUX.1-dev (not downloaded: fetched on first "
            "use).") in recipe
    page.locator("#info-restore").click()
    toast = page.locator(".toast-body", has_text="made with flux1-dev-fp8 (FLUX.1-dev)")
    toast.first.wait_for()
    assert "the model is now FLUX.1-dev · not downloaded (fetched on first use)" in toast.first.inner_text()
    assert page.locator("#gen-model input").input_value().startswith("FLUX.1-dev · not downloaded")


def test_after_cancel_the_info_describes_the_image_beside_it(page, studio):
    page.locator("#gen-prompt textarea").fill("the image before")
    for elem_id, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", 52)):
        set_number(page, elem_id, value)
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea')?.value.includes('Seed: 52,')",
                           timeout=120_000)
    page.wait_for_selector("#gen-generate", state="visible")
    for elem_id, value in (("gen-width", 512), ("gen-height", 512), ("gen-steps", 100), ("gen-seed", 53)):
        set_number(page, elem_id, value)
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#results-gallery')?.innerText?.includes('step')")
    page.locator("#gen-cancel").click()
    page.locator(".toast-body", has_text="Cancelled").first.wait_for()
    page.wait_for_selector("#gen-generate", state="visible", timeout=15_000)
    page.wait_for_timeout(1000)
    info = page.locator("#selected-info textarea").input_value()
    assert info != "Cancelled." and "Seed: 52," in info and "the image before" in info


# -------------------------------------------------------------------------------------------- inpaint wording
def _choose(page, elem_id: str, text: str) -> None:
    """Pick a dropdown option as a person does; once more if the list was redrawn under the click."""
    for attempt in range(2):
        page.locator(f"#{elem_id} input").click()
        try:
            page.locator("ul[role='listbox'] li", has_text=text).first.click(timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - the options were redrawn (a busy machine): open the list again
            if attempt:
                raise
            page.keyboard.press("Escape")


def test_inpaint_model_lists_share_one_wording_and_a_leftover_control_is_dropped_for_fill(page, files, shots):
    page.get_by_role("tab", name="Inpaint & Control").click()
    page.locator("#inp-model input").click()
    page.locator("ul[role='listbox'] li").first.wait_for()
    options = page.locator("ul[role='listbox'] li").all_inner_texts()
    assert not any("(download)" in o for o in options), options
    assert any(o.startswith("FLUX.1-Fill-dev · not downloaded (fetched on first use)") for o in options), options

    # FLUX.1-dev (demo) takes control images through ControlNets: short labels, the inputs each reads in the hint.
    page.locator("ul[role='listbox'] li", has_text="FLUX.1-dev random-weight demo").click()
    page.locator("#inp-controls button").first.click()
    net = page.locator("#inp-control-0-net input")
    page.wait_for_function("document.querySelector('#inp-control-0-net input')?.value?.startsWith('InstantX')")
    assert net.input_value() == "InstantX Union-alpha (random-weight demo)"
    assert "canny" in page.locator("#inp-control-0-net").inner_text()
    page.locator("#inp-control-0-image input[type='file']").set_input_files(str(files / "boxes.png"))
    page.locator("#inp-control-0-preview img").wait_for()

    # Fill takes none: choosing it drops the control image and says so beside the slots.
    _choose(page, "inp-model", "FLUX.1-Fill-dev random-weight demo")
    page.locator("#inp-controls-note", has_text="takes no control images, so the control image was removed").wait_for()
    page.wait_for_function("!document.querySelector('#inp-control-0-image img')")
    page.locator("#inp-settings").screenshot(path=str(shots / "field-fill-controls.png"))


def test_eligen_model_list_uses_the_same_wording(page):
    page.get_by_role("tab", name="EliGen").click()
    page.locator("#eli-model input").click()
    page.locator("ul[role='listbox'] li").first.wait_for()
    options = page.locator("ul[role='listbox'] li").all_inner_texts()
    assert not any("(download)" in o for o in options), options
    assert any(o.startswith("FLUX.1-dev · not downloaded (fetched on first use)") for o in options), options


# -------------------------------------------------------------------------------------------- EliGen layout
def test_an_eligen_layout_saved_without_a_seed_writes_no_seed(tmp_path):
    from studio.eligen_layout import save_layout_zip
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    path = save_layout_zip(tmp_path / "layout.zip", 64, 64, "a garden", ["a red flower"], [mask])
    with zipfile.ZipFile(path) as z:
        data = json.loads(z.read("prompts.json"))
    assert "seed" not in data and data["mask_prompts"] == ["a red flower"]


def test_no_reference_project_words_in_the_ui_strings():
    """The studio's own words never say "the seed" for DiffSynth-Studio (beside the seed fields it confuses)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    found = []
    for path in [*root.glob("app/*.py"), *root.glob("tabs/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bthe seed's\b|\(the seed\b", code):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, found


# -------------------------------------------------------------------------------------------- Edit without an image
def test_edit_without_an_image_says_so_at_the_field_with_no_error_badge(page, shots):
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-generate").click()
    # Either the plain message at the image field, or (the bug) red "Error" badges on the results.
    page.wait_for_function("document.querySelector('#edit-input .validation-error')?.innerText?.includes('image')"
                           " || [...document.querySelectorAll('#edit-results .error')].some(e => e.offsetParent)")
    page.wait_for_timeout(1000)          # anything else the click set off has answered by now
    assert page.locator("#edit-input .validation-error").inner_text().strip() == \
        "Upload or paste an image to edit first."
    badges = page.locator(".error")
    visible = [badges.nth(i).inner_text() for i in range(badges.count()) if badges.nth(i).is_visible()]
    assert not visible, f"Error badges or toasts are visible: {visible}"
    assert page.locator("#edit-generate").is_visible()        # nothing ran: Edit is back, not Cancel
    assert not page.locator("#edit-cancel").is_visible()
    page.screenshot(path=str(shots / "field-edit-no-image.png"))
    _no_raw_error(page)


def test_the_size_line_reads_a_refused_upload_as_no_image(tmp_path):
    """The Edit tab's size line reads the image as sent (it may run before the field's own check empties a refused
    file): a text file named .png is no image to it -- never an error of its own -- and a real image is its path."""
    from PIL import Image as PILImage

    from app.uploads import checked_path
    from tabs.edit import size_line
    text, good = tmp_path / "letter.png", tmp_path / "photo.png"
    text.write_text("Dear studio,\nthis is not a picture.\n")
    PILImage.new("RGB", (96, 64)).save(good)
    assert checked_path({"path": str(text), "orig_name": "letter.png"}) is None and checked_path(None) is None
    assert checked_path({"path": str(good), "orig_name": "photo.png"}) == str(good)
    assert size_line(None, checked_path({"path": str(text)}), 1.0).startswith("Upload or paste an image")
