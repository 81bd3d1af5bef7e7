"""The studio in a real browser: Debian's chromium, headless, driven by playwright; the real engine's demo model.

Screenshots go to a temporary folder (and to $FLUX_UI_SHOTS when set).
"""
from __future__ import annotations

import pathlib
import re

import pytest
from PIL import Image, PngImagePlugin

from tests.browser import LOCAL_URL, set_number, upload_to_inpaint, wait_for_job

TIMEOUT_MS = 60_000   # generous: a busy 2-core machine (chromium, the server and the model share it)



_set_number = set_number


def _small_job(page, prompt: str, size: int = 64, steps: int = 2, seed=None) -> None:
    page.locator("#gen-prompt textarea").fill(prompt)
    _set_number(page, "gen-width", size)
    _set_number(page, "gen-height", size)
    _set_number(page, "gen-steps", steps)
    if seed is not None:
        _set_number(page, "gen-seed", seed)


def _info_text(page) -> str:
    return page.locator("#selected-info textarea").input_value()


def test_generate_in_the_browser(page, studio, shots):
    _small_job(page, "a small red house", size=64, steps=2)
    page.screenshot(path=str(shots / "01-ready.png"), full_page=True)
    page.locator("#gen-generate").click()
    page.wait_for_selector("#results-gallery img")
    page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: ')")
    info = _info_text(page)
    seed = int(re.search(r"Seed: (\d+)", info).group(1))
    assert "a small red house" in info and "Size: 64x64" in info and "Steps: 2," in info
    # The "seed used" box shows the same seed, and the file named in the info exists with that recipe.
    assert page.locator("#gen-used-seed input").input_value() == str(seed)
    path = re.search(r"File: (.+\.png)", info).group(1)
    assert pathlib.Path(path).is_file() and pathlib.Path(path).is_relative_to(studio.outputs)
    # Back to idle: Generate shown again, Cancel hidden.
    page.wait_for_selector("#gen-generate", state="visible")
    assert page.locator("#gen-cancel").is_hidden()
    page.screenshot(path=str(shots / "02-generated.png"), full_page=True)

    # A second run: the gallery keeps the first image, newest first; "reuse seed" puts the used seed back.
    _set_number(page, "gen-seed", 31337)
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 31337,')")
    page.wait_for_selector("#results-gallery .thumbnails img[title^='seed 31337']")
    titles = [img.get_attribute("title") for img in page.locator("#results-gallery .thumbnails img").all()]
    assert titles == ["seed 31337 · 64×64", f"seed {seed} · 64×64"]
    page.locator("#gen-seed-random").click()
    page.wait_for_function("document.querySelector('#gen-seed input').value === '-1'")
    page.locator("#gen-seed-reuse").click()
    page.wait_for_function("document.querySelector('#gen-seed input').value === '31337'")
    page.screenshot(path=str(shots / "03-two-runs.png"), full_page=True)

    # Selecting the older image shows its recipe; "restore these settings" brings back its prompt and seed.
    page.locator("#gen-prompt textarea").fill("something else")
    page.locator("#results-gallery .thumbnails button").nth(1).click()
    page.wait_for_function(f"document.querySelector('#selected-info textarea').value.includes('Seed: {seed},')")
    page.locator("#restore-selected").click()
    page.wait_for_function(f"document.querySelector('#gen-seed input').value === '{seed}'")
    assert page.locator("#gen-prompt textarea").input_value() == "a small red house"


def test_page_requests_no_outside_host(page):
    # Load, open every panel, run a job, then look at everything the page asked for.
    # (Gradio keeps its heartbeat stream open, so "network idle" never comes: wait a little instead.)
    page.locator("#gen-info-accordion button").first.click()
    page.locator("#gen-model input").click()
    page.keyboard.press("Escape")
    _small_job(page, "no outside requests", size=64, steps=1, seed=2)
    page.locator("#gen-generate").click()
    page.wait_for_selector("#results-gallery img")
    page.wait_for_timeout(1500)
    outside = [url for url in page.requests if not LOCAL_URL.match(url)]
    assert any("/gradio_api/file=" in url for url in page.requests), "the image request was not recorded"
    assert not outside, f"the page requested outside hosts: {outside}"


def test_title_banner_model_labels_and_size_line(page):
    banner = page.locator("#demo-banner").inner_text()
    assert "Random-weight demo model" in banner and "images are noise" in banner and "README" in banner
    assert page.locator("#studio-title").inner_text().startswith("FLUX Studio")
    page.locator("#gen-model input").click()
    options = page.locator("ul[role='listbox'] li").all_inner_texts()
    assert any("random-weight demo" in o for o in options)
    assert any(o.startswith("FLUX.1-dev · not downloaded") for o in options)
    page.keyboard.press("Escape")
    # The live line shows the real output size.
    _set_number(page, "gen-width", 1000)
    page.wait_for_function("document.querySelector('#gen-size-line').innerText.includes('1008 × 256')")
    assert "rounded up" in page.locator("#gen-size-line").inner_text()


def test_drop_a1111_png_and_restore_settings(page, tmp_path, shots):
    text = ("a lighthouse at dusk, oil painting\nNegative prompt: blurry\n"
            "Steps: 12, Sampler: Euler, CFG scale: 2.5, Distilled CFG Scale: 4, Seed: 4242, Size: 320x192, "
            "Model: flux1-dev")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    png = tmp_path / "forge.png"
    Image.new("RGB", (320, 192), (30, 90, 160)).save(png, pnginfo=info)

    page.locator("#gen-info-accordion button").first.click()
    page.locator("#info-image input[type='file']").set_input_files(str(png))
    page.wait_for_function("document.querySelector('#info-recipe textarea').value.includes('Seed: 4242')")
    page.locator("#info-restore").click()
    page.wait_for_function("document.querySelector('#gen-prompt textarea').value === 'a lighthouse at dusk, oil painting'")
    assert page.locator("#gen-negative textarea").input_value() == "blurry"
    assert page.locator("#gen-seed input").input_value() == "4242"
    assert page.locator("#gen-width input[type='number']").input_value() == "320"
    assert page.locator("#gen-height input[type='number']").input_value() == "192"
    assert page.locator("#gen-steps input[type='number']").input_value() == "12"
    assert page.locator("#gen-cfg input[type='number']").input_value() == "2.5"
    assert page.locator("#gen-guidance input[type='number']").input_value() == "4"
    # flux1-dev is a FLUX.1-dev file, which this studio lists (not downloaded): the model is switched to it.
    assert page.locator("#gen-model input").input_value().startswith("FLUX.1-dev · not downloaded")
    page.screenshot(path=str(shots / "04-image-info-restored.png"), full_page=True)


def test_engine_error_shows_a_message_and_the_app_stays_usable(page, monkeypatch, shots):
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")  # FLUX.1-dev is absent: an EngineError, at once
    _small_job(page, "a test", size=64, steps=2, seed=5)
    page.locator("#gen-model input").click()
    page.locator("ul[role='listbox'] li", has_text="FLUX.1-dev · not downloaded").click()
    page.locator("#gen-generate").click()
    toast = page.locator(".toast-body", has_text="flux1-dev.safetensors")
    toast.first.wait_for()
    assert "Traceback" not in toast.first.inner_text()
    page.screenshot(path=str(shots / "05-error.png"), full_page=True)
    page.wait_for_selector("#gen-generate", state="visible")
    # Back to the demo model: generating works.
    page.locator("#gen-model input").click()
    page.locator("ul[role='listbox'] li", has_text="FLUX.1-dev random-weight demo").click()
    _set_number(page, "gen-steps", 2)
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 5,')")


def test_cancel_in_the_browser(page, studio, shots):
    before = set(studio.outputs.rglob("*.png"))
    _small_job(page, "a long job", size=512, steps=100, seed=8)
    page.locator("#gen-generate").click()
    cancel = page.locator("#gen-cancel")
    cancel.wait_for(state="visible")
    assert page.locator("#gen-generate").is_hidden()
    page.wait_for_function("document.querySelector('#results-gallery').innerText.includes('step')")
    page.screenshot(path=str(shots / "06-running.png"), full_page=True)
    cancel.click()
    page.wait_for_selector("#gen-generate", state="visible", timeout=15_000)
    page.locator(".toast-body", has_text="Cancelled").first.wait_for()
    assert set(studio.outputs.rglob("*.png")) == before


# -------------------------------------------------------------------------------------------------------- memory

def _open_memory_tab(page):
    page.get_by_role("tab", name="Models & memory").click()
    page.wait_for_selector("#mem-table table.mem-table tbody tr")


def _table(page) -> str:
    return page.locator("#mem-table").inner_text()


def _settled_plan(page, studio) -> dict:
    """The engine's plan once the table the tab drew shows it: the table is drawn when the tab opens, and on a busy
    machine a model may still be loading then (another test file's job on the same studio), so the tab is opened
    again until both agree."""
    rows = page.locator("#mem-table tbody tr")
    for _ in range(10):
        plan = studio.engine.memory_plan()
        if rows.count() == len(plan["components"]):
            return plan
        page.get_by_role("tab", name="Generate").click()
        page.wait_for_timeout(1000)
        _open_memory_tab(page)
    return studio.engine.memory_plan()


def test_memory_tab_shows_the_plan_and_changes_the_limit(page, studio, shots):
    before = studio.engine.vram_limit
    try:
        _open_memory_tab(page)
        plan = _settled_plan(page, studio)
        rows = page.locator("#mem-table tbody tr")
        assert rows.count() == len(plan["components"])
        for comp in plan["components"]:
            assert comp["label"] in _table(page)
        summary = page.locator("#mem-summary").inner_text()
        assert "Predicted peak VRAM" in summary.title() or "PREDICTED PEAK VRAM" in summary.upper()
        assert str(plan["device"]) in summary
        page.screenshot(path=str(shots / "07-memory.png"), full_page=True)
        old_table = page.locator("#mem-table").inner_html()

        # A tight limit: the engine re-plans at once and the table shows the new placement.
        page.locator("#mem-limit input").fill("0.01")
        page.locator("#mem-apply").click()
        page.wait_for_function("document.querySelector('#mem-summary').innerText.includes('0.01 GB')")
        page.wait_for_function("document.querySelector('#studio-title').innerText.includes('VRAM limit 0.01 GB')")
        assert studio.engine.vram_limit == 0.01
        new_plan = studio.engine.memory_plan()
        assert new_plan["vram_limit_gb"] == 0.01
        page.wait_for_function("(old) => document.querySelector('#mem-table').innerHTML !== old", arg=old_table)
        strategies = page.locator("#mem-table tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.strategy)")
        assert strategies == [c["strategy"] for c in new_plan["components"]]
        page.screenshot(path=str(shots / "08-memory-limited.png"), full_page=True)

        # "No limit" goes back; generating works without a restart in between.
        page.locator("#mem-no-limit").click()
        page.wait_for_function("document.querySelector('#mem-summary').innerText.toLowerCase().includes('no limit')")
        assert studio.engine.vram_limit is None
    finally:
        studio.engine.set_vram_limit(before)


# --------------------------------------------------------------------------------------------------------- LoRAs

def _choose_loras(page, *names) -> None:
    page.locator("#lora-choose input").click()
    for name in names:
        page.locator("ul[role='listbox'] li", has_text=name).first.click()
    page.locator("#gen-prompt textarea").click()  # closes the list


def test_lora_picker_generate_and_restore(page, studio, shots):
    from tests.test_app_client import DEMO_LORA, write_demo_lora

    loras = pathlib.Path(studio.engine.models_dir) / "loras"
    extra = write_demo_lora(loras / "style" / "ink.safetensors", seed=3)
    try:
        # The file added after the page loaded appears after ↻.
        page.locator("#lora-refresh").click()
        page.locator("#lora-choose input").click()
        page.wait_for_selector("ul[role='listbox'] li:has-text('style/ink')")
        page.locator("#gen-prompt textarea").click()
        _choose_loras(page, "demo-style", "style/ink")
        page.wait_for_selector("#lora-weight-1", state="visible")
        assert page.locator("#lora-weight-0").inner_text().startswith("demo-style · weight")
        assert page.locator("#lora-weight-1").inner_text().startswith("style/ink · weight")
        assert page.locator("#lora-weight-2").is_hidden()
        _set_number(page, "lora-weight-1", -0.5)
        _small_job(page, "a house with a LoRA", size=64, steps=2, seed=606)
        page.screenshot(path=str(shots / "09-lora-picked.png"), full_page=True)
        page.locator("#gen-generate").click()
        # The first job of a session also loads the model and the LoRAs: a longer wait on a busy machine.
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 606,')",
                               timeout=90_000)
        info = _info_text(page)
        assert "LoRAs:" in info and DEMO_LORA in info and "style/ink.safetensors" in info
        assert "weight 1 " in info + " " and "weight -0.5" in info
        page.screenshot(path=str(shots / "10-lora-generated.png"), full_page=True)

        # Clear the selection, then restore it from the image.
        page.locator("#lora-choose .token-remove, #lora-choose [aria-label^='Remove']").first.click()
        page.wait_for_selector("#lora-weight-1", state="hidden")
        page.locator("#restore-selected").click()
        page.wait_for_selector("#lora-weight-1", state="visible")
        assert page.locator("#lora-weight-1 input[type='number']").input_value() == "-0.5"
        chips = page.locator("#lora-choose").inner_text()
        assert "demo-style" in chips and "style/ink" in chips

        # A LoRA that is no longer in the folder: named in a message, the others restored.
        extra.unlink()
        page.locator("#restore-selected").click()
        toast = page.locator(".toast-body", has_text="Not in the LoRA folder").first
        toast.wait_for()
        assert "style/ink.safetensors" in toast.inner_text() and "loras" in toast.inner_text()
        page.wait_for_selector("#lora-weight-1", state="hidden")
        assert page.locator("#lora-weight-0").inner_text().startswith("demo-style")
        page.wait_for_timeout(500)  # the message's fade-in, for the screenshot
        page.screenshot(path=str(shots / "11-lora-missing.png"), full_page=True)
    finally:
        extra.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The Edit tab
# ---------------------------------------------------------------------------------------------------------------

KONTEXT_DEMO = "FLUX.1-Kontext-dev-random-demo"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 320x200 RGBA picture: blue with a yellow square and a transparent strip on the right."""
    img = Image.new("RGBA", (320, 200), (40, 90, 200, 255))
    img.paste((250, 200, 0, 255), (40, 40, 140, 160))
    img.paste((0, 0, 0, 0), (280, 0, 320, 200))
    path = tmp_path_factory.mktemp("edit-inputs") / "street.png"
    img.save(path)
    return path


def _open_edit(page):
    page.get_by_role("tab", name="Edit").click()
    page.wait_for_selector("#edit-generate", state="visible")


def _input_src(page) -> str:
    return page.locator("#edit-input img").first.get_attribute("src") or ""


def test_edit_tab_in_the_browser(page, studio, photo, shots):
    _open_edit(page)
    page.locator("#edit-input input[type=file]").set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('Output:')")
    _set_number(page, "edit-megapixels", 0.06)
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('320 × 192')")
    assert "not cropped" in page.locator("#edit-size-line").inner_text()
    page.locator("#edit-prompt textarea").fill("make the square red")
    _set_number(page, "edit-steps", 2)
    _set_number(page, "edit-seed", 5)
    page.screenshot(path=str(shots / "edit-01-ready.png"), full_page=True)
    page.locator("#edit-generate").click()
    page.wait_for_selector("#edit-results-gallery img")
    page.wait_for_function("document.querySelector('#edit-selected-info textarea').value.includes('Seed: 5,')")
    page.wait_for_function("document.querySelectorAll('#edit-compare img').length >= 2")
    info = page.locator("#edit-selected-info textarea").input_value()
    assert "make the square red" in info and "Size: 320x192" in info and "street.png" in info
    page.wait_for_selector("#edit-generate", state="visible")
    page.screenshot(path=str(shots / "edit-02-before-after.png"), full_page=True)

    # Use the result as the next input: the image box now shows the result, and the size follows it.
    before = _input_src(page)
    page.locator("#edit-use-result").click()
    page.wait_for_function(f"(document.querySelector('#edit-input img') || {{}}).src !== {before!r}")
    assert re.search(r"\d{5}-5", _input_src(page))
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('(320x192)')")
    _set_number(page, "edit-seed", 6)
    page.locator("#edit-generate").click()
    page.wait_for_function("document.querySelector('#edit-selected-info textarea').value.includes('Seed: 6,')")
    page.wait_for_selector("#edit-results-gallery .thumbnails img[title^='seed 6']")
    titles = [img.get_attribute("title") for img in page.locator("#edit-results-gallery .thumbnails img").all()]
    assert titles == ["seed 6 · 320×192", "seed 5 · 320×192"]
    page.screenshot(path=str(shots / "edit-03-iterated.png"), full_page=True)


def test_bad_image_in_the_browser_says_why(page, tmp_path, shots):
    _open_edit(page)
    tiny = tmp_path / "thumb.png"
    Image.new("P", (40, 30)).save(tiny)
    page.locator("#edit-input input[type=file]").set_input_files(str(tiny))
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('40x30')")
    assert "at least 64" in page.locator("#edit-size-line").inner_text()
    page.screenshot(path=str(shots / "edit-04-too-small.png"), full_page=True)


def test_send_to_edit_from_generate(page, shots):
    page.locator("#gen-prompt textarea").fill("a lighthouse")
    for elem_id, value in (("gen-width", 128), ("gen-height", 96), ("gen-steps", 2)):
        _set_number(page, elem_id, value)
    page.locator("#gen-generate").click()
    page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('a lighthouse')")
    page.locator("#gen-send-to-edit").click()
    page.wait_for_selector("#edit-input img")
    assert page.locator("#edit-generate").is_visible()
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('(128x96)')")
    page.screenshot(path=str(shots / "edit-05-sent-from-generate.png"), full_page=True)


def _paste_png(page, studio, size=(200, 120), colour=(30, 160, 90)) -> None:
    """Put a PNG on the system clipboard (as a screenshot tool does) and press the image box's paste button."""
    import base64
    import io
    origin = re.match(r"^https?://[^/]+", studio.url).group(0)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        await navigator.clipboard.write([new ClipboardItem({'image/png': new Blob([bytes], {type: 'image/png'})})]);
    }""", base64.b64encode(buf.getvalue()).decode())
    page.locator("#edit-input button[aria-label='Paste from clipboard']").click()


def test_paste_edit_with_step1x_and_restore_the_input(page, studio, shots):
    _open_edit(page)
    _paste_png(page, studio)
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('(200x120)')")
    # Step1X-Edit's demo: choosing it sets its usual CFG (6) and says what it does.
    page.locator("#edit-model input").click()
    page.locator("ul[role='listbox'] li", has_text="Step1X-Edit random-weight demo").first.click()
    page.wait_for_function("document.querySelector('#edit-cfg input[type=number]').value === '6'")
    assert "Qwen2.5-VL" in page.locator("#edit-model-note").inner_text()
    _set_number(page, "edit-megapixels", 0.02)
    page.locator("#edit-prompt textarea").fill("make it purple")
    page.locator("#edit-negative textarea").fill("blurry")
    _set_number(page, "edit-steps", 2)
    _set_number(page, "edit-seed", 21)
    page.locator("#edit-generate").click()
    page.wait_for_function("document.querySelector('#edit-selected-info textarea').value.includes('Seed: 21,')",
                           timeout=120_000)
    info = page.locator("#edit-selected-info textarea").input_value()
    assert "make it purple" in info and "Step1X-Edit-random-demo" in info and "CFG scale: 6" in info
    assert "Distilled CFG" not in info                   # no guidance embedder: no guidance value recorded
    assert not page.locator("#edit-guidance").is_visible()
    page.wait_for_function("document.querySelectorAll('#edit-compare img').length >= 2")
    page.screenshot(path=str(shots / "edit-06-step1x-pasted.png"), full_page=True)

    # Clear the image and the instruction, then restore both from the result.
    page.locator("#edit-input button[aria-label='Remove Image']").first.click()
    page.wait_for_function("!document.querySelector('#edit-input img')")
    page.locator("#edit-prompt textarea").fill("")
    page.locator("#edit-restore-selected").click()
    page.wait_for_selector("#edit-input img")
    assert ".ref0.png" in _input_src(page) or "ref0" in _input_src(page)
    page.wait_for_function("document.querySelector('#edit-prompt textarea').value === 'make it purple'")
    page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('(200x120)')")
    page.screenshot(path=str(shots / "edit-07-restored.png"), full_page=True)


# ------------------------------------------------------------------------------------------- Inpaint & Control

@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 320x200 picture: blue with a yellow box in the middle; and a control picture (a white box on black)."""
    root = tmp_path_factory.mktemp("inpaint-inputs")
    img = Image.new("RGB", (320, 200), (40, 90, 200))
    img.paste((240, 200, 40), (100, 60, 220, 140))
    img.save(root / "scene.png")
    ctl = Image.new("RGB", (320, 200), (10, 10, 10))
    ctl.paste((240, 240, 240), (50, 40, 270, 160))
    ctl.save(root / "boxes.png")
    return root


def _paint_stroke(page, dx=60, dy=20):
    """A brush stroke through the middle of the editor's canvas (the image is centred in it)."""
    box = page.locator("#inp-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - dx, cy - dy)
    page.mouse.down()
    # 3 moves, closer together than the brush is wide, still paint one unbroken stroke; each move costs ~0.3 s here
    # (the editor redraws its canvas in software), so 15 of them cost 4 s a stroke.
    page.mouse.move(cx + dx, cy + dy, steps=3)
    page.mouse.up()


def _copy(result_path, suffix):
    p = pathlib.Path(result_path)
    return p.with_name(p.stem + suffix)


def test_inpaint_a_painted_mask_in_the_browser(page, studio, scene, shots):
    import numpy as np
    upload_to_inpaint(page, scene / "scene.png", "320 × 200")
    assert "FLUX.1-Fill-dev random-weight demo" in page.locator("#inp-model input").input_value()
    _paint_stroke(page)
    page.locator("#inp-prompt textarea").fill("a red ball")
    _set_number(page, "inp-steps", 2)
    _set_number(page, "inp-seed", 31)
    _set_number(page, "inp-feather", 0)
    page.screenshot(path=str(shots / "inpaint-01-painted.png"), full_page=True)
    page.locator("#inp-generate").click()
    wait_for_job(page, "document.querySelector('#inp-selected-info textarea').value.includes('Seed: 31,')", studio,
                 button="#inp-generate")
    info = page.locator("#inp-selected-info textarea").input_value()
    assert "Size: 320x200" in info and "Image to inpaint:" in info and "Mask:" in info
    page.screenshot(path=str(shots / "inpaint-02-result.png"), full_page=True)

    # The mask used is the one painted: image-sized, around the middle; outside it the image is untouched.
    result = sorted(studio.outputs.rglob("*-31.png"))[-1]
    mask = np.asarray(Image.open(_copy(result, ".ref1.png")).convert("L")) > 127
    assert mask.shape == (200, 320) and 0.02 < mask.mean() < 0.6
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 160) < 40 and abs(ys.mean() - 100) < 30
    src = np.asarray(Image.open(scene / "scene.png").convert("RGB")).astype(int)
    out = np.asarray(Image.open(result).convert("RGB")).astype(int)
    assert out.shape == src.shape
    assert np.array_equal(out[~mask], src[~mask])
    assert np.abs(out[mask] - src[mask]).mean() > 5

    # Restore brings back the image and its mask (shown in the mask preview); generating again uses that mask.
    # The clearing lands (editor, kept mask and a new, empty "Mask used" come back together) before the next click.
    page.wait_for_selector("#inp-mask-preview img")          # the painted mask, shown since the stroke
    painted = page.evaluate("() => document.querySelector('#inp-mask-preview img')?.src")
    page.locator("#inp-clear-mask").click()
    page.wait_for_function("(painted) => (document.querySelector('#inp-mask-preview img')?.src || painted)"
                           " !== painted", arg=painted)
    _set_number(page, "inp-seed", 7)                         # the restore must bring back 31 ...
    _set_number(page, "inp-feather", 5)                      # ... and 0
    cleared = page.evaluate("() => document.querySelector('#inp-mask-preview img')?.src")
    page.locator("#inp-restore-selected").click()
    # The restore has landed when the seed box (one event) and the feather (the event that also brings back the
    # image and its mask) show the restored values; setting the seed before that would be overwritten.
    page.wait_for_function("document.querySelector('#inp-seed input')?.value === '31'", timeout=60_000)
    page.wait_for_function("document.querySelector(\"#inp-feather input[type='number']\")?.value === '0'",
                           timeout=60_000)
    # (and, for the screenshot, the restored mask in "Mask used": the last event of the chain)
    page.wait_for_function("(cleared) => (document.querySelector('#inp-mask-preview img')?.src || cleared)"
                           " !== cleared", arg=cleared, timeout=60_000)
    _set_number(page, "inp-seed", 33)
    page.screenshot(path=str(shots / "inpaint-03-restored.png"), full_page=True)
    page.locator("#inp-generate").click()
    page.wait_for_function("document.querySelector('#inp-selected-info textarea').value.includes('Seed: 33,')",
                           timeout=120_000)
    again = sorted(studio.outputs.rglob("*-33.png"))[-1]
    assert np.array_equal(np.asarray(Image.open(_copy(again, ".ref1.png")).convert("L")) > 127, mask)


def test_outpaint_and_control_preview_in_the_browser(page, studio, scene, shots):
    import numpy as np
    upload_to_inpaint(page, scene / "scene.png", "320 × 200")
    page.locator("#inp-outpaint").click()
    _set_number(page, "inp-pad-right", 64)
    page.wait_for_function("document.querySelector('#inp-pad-right input[type=number]')?.value === '64'")
    page.locator("#inp-extend").click()
    page.wait_for_function("document.querySelector('#inp-size-line').innerText.includes('384 × 200')",
                           timeout=120_000)
    page.wait_for_selector("#inp-mask-preview img")
    # Flex.2 with a canny control image: the preview shows the edges before generating.
    page.locator("#inp-model input").click()
    page.locator("ul[role='listbox'] li", has_text="Flex.2-preview random-weight demo").first.click()
    page.locator("#inp-controls").click()
    page.locator("#inp-control-0-image input[type=file]").set_input_files(str(scene / "boxes.png"))
    page.wait_for_selector("#inp-control-0-preview img")
    page.locator("#inp-prompt textarea").fill("a wider street")
    _set_number(page, "inp-steps", 2)
    _set_number(page, "inp-seed", 32)
    page.locator("#inp-generate").click()
    page.wait_for_function("document.querySelector('#inp-selected-info textarea').value.includes('Seed: 32,')",
                           timeout=120_000)
    info = page.locator("#inp-selected-info textarea").input_value()
    assert "Size: 384x200" in info and "Control 1: boxes.png · canny" in info
    page.screenshot(path=str(shots / "inpaint-04-outpaint-control.png"), full_page=True)
    result = sorted(studio.outputs.rglob("*-32.png"))[-1]
    out = np.asarray(Image.open(result).convert("RGB")).astype(int)
    src = np.asarray(Image.open(scene / "scene.png").convert("RGB")).astype(int)
    assert out.shape == (200, 384, 3)
    assert np.array_equal(out[:, :300], src[:, :300])            # the old image, short of the 8 px overlap + feather
