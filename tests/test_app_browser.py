"""The studio in a real browser: Debian's chromium, headless, driven by playwright; the real engine's demo model.

Screenshots go to a temporary folder (and to $FLUX_UI_SHOTS when set).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest
from PIL import Image, PngImagePlugin

from tests.test_app_client import running_studio

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_URL = re.compile(r"^(https?://(127\.0\.0\.1|localhost)(:\d+)?/|data:|blob:)")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="session")
def studio(tmp_path_factory, request):
    return running_studio(tmp_path_factory, request)


@pytest.fixture(scope="session")
def browser():
    assert pathlib.Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    extra = os.environ.get("FLUX_UI_SHOTS")
    if extra:
        pathlib.Path(extra).mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy(shot, pathlib.Path(extra) / shot.name)


@pytest.fixture
def page(browser, studio):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requests = []
    page.on("request", lambda req: page.requests.append(req.url))
    page.goto(studio.url)
    page.wait_for_selector("#gen-generate")
    yield page
    context.close()
    # Whatever a test did, the page never asked an outside host for anything.
    outside = [url for url in page.requests if not LOCAL_URL.match(url)]
    assert not outside, f"the page requested outside hosts: {outside}"


def _set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number field's box and commit it (Tab), as a person would."""
    box = page.locator(f"#{elem_id} input[type='number']").first
    box.fill(str(value))
    box.press("Tab")


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
    page.locator("ul[role='listbox'] li", has_text="random-weight demo").click()
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
