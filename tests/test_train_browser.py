"""The Train tab in a real browser (Debian's chromium, headless, playwright) on a studio of its own (demo model):
upload two images, edit a caption in the table, train a tiny LoRA, watch the step text and the loss plot move and
the run finish, then find the LoRA in the Generate tab's LoRA picker.

Screenshots go to /tmp/train_shots/ (or $FLUX_TRAIN_SHOTS).
"""
from __future__ import annotations

import os
import pathlib
import re

import pytest

from tests.browser import set_number, studio_page
from tests.test_app_client import _free_port
from tests.helpers import linked_models
from tests.test_train_jobs import photo

pytestmark = pytest.mark.filterwarnings("ignore")

SHOTS = pathlib.Path(os.environ.get("FLUX_TRAIN_SHOTS", "/tmp/train_shots"))
TIMEOUT_MS = 60_000   # generous: a busy 2-core machine (chromium, the server and the model share it)


@pytest.fixture(scope="module")
def studio(demo_dir, tmp_path_factory):
    """A studio of its own (its own models folder), so its training runs and LoRAs touch no other test."""
    from app.studio import launch_studio
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("train-browser")
    engine = Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs",
                    allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' uploads
    demo = launch_studio(engine, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield engine, demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(studio, browser):
    with studio_page(browser, studio[1], TIMEOUT_MS) as page:
        yield page


_set = set_number


def _options(page, elem: str) -> list[str]:
    """A dropdown's options as shown (it is left open)."""
    page.locator(f"{elem} input").click()
    page.wait_for_selector("ul[role='listbox'] li")
    return [t.replace("✓", "").strip() for t in page.locator("ul[role='listbox'] li").all_inner_texts()]


def _status(page) -> str:
    return page.locator("#train-status").inner_text()


def test_train_a_lora_and_use_it_in_generate(page, studio, tmp_path):
    engine, _url = studio
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-start")
    assert "random-weight demo" in page.locator("#train-base input").input_value()

    # Two images, one with a caption file beside it (and a third uploaded by mistake).
    images = [photo(tmp_path / "my dog 1.png", 1, (96, 80)), photo(tmp_path / "my dog 2.png", 2, (80, 96)),
              photo(tmp_path / "oops.png", 3)]
    (tmp_path / "my dog 1.txt").write_text("a photo of sks dog")
    page.locator("#train-upload input[type='file']").set_input_files([*map(str, images), str(tmp_path / "my dog 1.txt")])
    page.wait_for_selector("#train-captions [data-testid='cell-2-0']:has-text('oops.png')")
    assert page.locator("#train-captions [data-testid='cell-0-1']").inner_text() == "a photo of sks dog"
    assert "2 of 3 images have no caption" in page.locator("#train-dataset-note").inner_text()
    # Write a missing caption in the table.
    page.locator("#train-captions [data-testid='cell-1-1']").dblclick()
    editor = page.locator("#train-captions textarea, #train-captions input[type='text']").first
    editor.fill("sks dog sitting on grass")
    editor.press("Enter")
    page.wait_for_selector("#train-captions [data-testid='cell-1-1']:has-text('sks dog sitting on grass')")
    page.wait_for_function("document.querySelector('#train-dataset-note')?.innerText?.includes('1 of 3 images')")
    # Remove the third upload: the dataset is made again from the two left, the typed caption kept.
    page.locator("#train-upload tr:has(td[aria-label='oops.png']) [aria-label='Remove this file']").click()
    page.wait_for_selector("#train-captions [data-testid='cell-2-0']", state="detached")
    page.wait_for_selector("#train-captions [data-testid='cell-1-1']:has-text('sks dog sitting on grass')")
    assert "2 images in" in page.locator("#train-dataset-note").inner_text()
    assert "no caption" not in page.locator("#train-dataset-note").inner_text()
    page.screenshot(path=str(SHOTS / "01-dataset.png"), full_page=True)

    # A tiny run: 64 px, 30 steps, a sample every 15 steps.
    _set(page, "train-length", 30)
    _set(page, "train-resolution", 64)
    _set(page, "train-rank", 4)
    _set(page, "train-save-every", 15)
    page.locator("#train-prompts textarea").fill("a photo of sks dog")
    _set(page, "train-sample-every", 15)
    _set(page, "train-sample-size", 64)
    _set(page, "train-sample-steps", 2)
    page.locator("#train-run-name textarea").fill("sks dog")
    page.locator("#train-trigger input, #train-trigger textarea").first.fill("sks")
    page.locator("#train-start").click()
    page.wait_for_selector("#train-stop", state="visible")
    page.wait_for_function("document.querySelector('#train-status')?.innerText?.includes('Starting')")
    # The timer shows the steps as they come (several distinct step counts while it trains) and draws the loss.
    seen = set()
    for _ in range(240):
        text = _status(page)
        found = re.search(r"Step (\d+)/30", text)
        if found:
            seen.add(int(found.group(1)))
            if len(seen) == 2:
                page.screenshot(path=str(SHOTS / "02-training.png"), full_page=True)
        if text.startswith("Finished"):
            break
        page.wait_for_timeout(100)
    assert len(seen) >= 2, f"the step text did not move: {seen}"
    assert _status(page).startswith("Finished 'sks-dog': 30 steps.")
    assert "trained/sks-dog.safetensors" in _status(page)
    page.wait_for_selector("#train-start", state="visible")
    assert page.locator("#train-stop").is_hidden()
    # The loss plot has both lines (its legend is drawn only with data); the samples and the log are shown.
    page.wait_for_function("document.querySelector('#train-loss')?.innerText?.includes('average (last 20)')")
    page.wait_for_function("document.querySelectorAll('#train-gallery img').length >= 2")
    assert "Run finished at step 30." in page.locator("#train-log textarea").input_value()
    page.screenshot(path=str(SHOTS / "03-finished.png"), full_page=True)

    # A refused start (learning rate 0) says why once, under the button, and leaves the finished run's view as it
    # was: its status line, both loss lines, the samples and the log, and no "Error" badge anywhere.
    finished_text, log_text = _status(page), page.locator("#train-log textarea").input_value()
    _set(page, "train-lr", 0)
    page.locator("#train-start").click()
    page.wait_for_function("document.querySelector('#train-message')?.innerText?.includes('Could not start training')")
    assert "Learning rate must be above 0" in page.locator("#train-message").inner_text()
    page.wait_for_timeout(500)
    assert _status(page) == finished_text
    assert page.locator("#train-log textarea").input_value() == log_text
    assert "average (last 20)" in page.locator("#train-loss").inner_text()
    assert page.locator("#train-gallery img").count() >= 2
    badges = page.evaluate("[...document.querySelectorAll('#train-top *')].filter(e => e.children.length === 0 "
                           "&& e.textContent.trim() === 'Error').length")
    assert badges == 0
    page.screenshot(path=str(SHOTS / "03b-refused-start.png"), full_page=True)
    _set(page, "train-lr", 0.0001)
    # The edited caption reached the .txt file of the dataset the run trained on (two images: the removed one gone).
    from engine.training.api import load_config
    run = next(r for r in engine.training.runs() if r["name"] == "sks-dog")
    folder = pathlib.Path(load_config(run["run_dir"]).dataset_base_path)
    assert folder.parent == engine.models_dir / "train" / "datasets"
    assert sorted(p.name for p in folder.glob("*.png")) == ["my-dog-1.png", "my-dog-2.png"]
    assert (folder / "my-dog-2.txt").read_text() == "sks dog sitting on grass"
    # The trigger word is in the run's config (not in the caption files) and in the equivalent command.
    assert load_config(run["run_dir"]).trigger_word == "sks"
    page.locator("#train-command-accordion button").first.click()
    page.wait_for_function("document.querySelector('#train-command')?.innerText?.includes('--trigger_word sks')")
    assert (engine.models_dir / "loras" / "trained" / "sks-dog.safetensors").is_file()

    # A grid of samples per saved checkpoint (steps 15 and 30); "Try it in Generate" on the earlier one puts it in
    # the LoRA list, opens the Generate tab and ticks it there at weight 1; the picker lists the final LoRA too.
    page.wait_for_selector("#train-checkpoints img")
    assert [o.split(" · ")[0] for o in _options(page, "#train-checkpoint-pick")] == ["step 30", "step 15"]
    page.locator("ul[role='listbox'] li", has_text="step 15").click()
    page.locator("#train-try").click()
    page.wait_for_selector("#gen-generate", state="visible")
    assert (engine.models_dir / "loras" / "trained" / "sks-dog-step-15.safetensors").is_file()
    page.wait_for_selector("#lora-weight-0", state="visible")
    assert "trained/sks-dog-step-15 · weight" in page.locator("#lora-weight-0").inner_text()
    assert page.locator("#lora-weight-0 input[type='number']").input_value() == "1"
    assert not page.locator("#lora-weight-1").is_visible()
    assert page.locator("#lora-choose").inner_text().count("trained/sks-dog-step-15") == 1     # its chip
    assert "LoRAs · 1 active" in page.locator("#lora-accordion").inner_text()
    page.screenshot(path=str(SHOTS / "04a-try-ticks-the-lora.png"), full_page=True)
    page.wait_for_function("document.querySelector('#lora-hint')?.innerText?.includes('2 LoRA files')")
    page.locator("#lora-choose input").click()
    options = page.locator("ul[role='listbox'] li").all_inner_texts()
    assert any(o.startswith("trained/sks-dog ·") for o in options), options
    assert any("trained/sks-dog-step-15 ·" in o for o in options), options
    final = next(i for i, o in enumerate(options) if o.startswith("trained/sks-dog ·"))
    page.locator("ul[role='listbox'] li").nth(final).click()
    page.wait_for_selector("#lora-weight-1", state="visible")
    page.screenshot(path=str(SHOTS / "04-generate-lora.png"), full_page=True)

    # Trying the run's last save instead unticks the earlier save of the same run (two saves would stack).
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-checkpoint-pick input").click()
    page.locator("ul[role='listbox'] li", has_text="step 30").click()
    page.locator("#train-try").click()
    page.wait_for_selector("#gen-generate", state="visible")
    page.wait_for_function("document.querySelector('#lora-accordion')?.innerText?.includes('LoRAs · 1 active')")
    assert "trained/sks-dog · weight" in page.locator("#lora-weight-0").inner_text()
    assert not page.locator("#lora-weight-1").is_visible()


def test_vram_preset_sets_the_form_and_says_what(page):
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-preset label", has_text="12 GB").click()
    page.wait_for_function("document.querySelector('#train-preset-note')?.innerText?.includes('12 GB: LoRA rank 4')")
    assert page.locator("#train-rank input[type='number']").input_value() == "4"
    assert page.locator("#train-resolution input[type='number']").input_value() == "512"
    page.locator("#train-memory button").first.click()
    for box in ("train-checkpointing", "train-offload", "train-fp8"):
        assert page.locator(f"#{box} input[type='checkbox']").is_checked(), box
    assert page.locator("#train-vram input").input_value() == "12"       # the run is planned for the card
    page.screenshot(path=str(SHOTS / "05-vram-preset.png"), full_page=True)
    # Each setting stays editable after.
    _set(page, "train-rank", 12)
    assert page.locator("#train-rank input[type='number']").input_value() == "12"
    page.locator("#train-preset label", has_text="24 GB").click()
    page.wait_for_function("document.querySelector('#train-preset-note')?.innerText?.includes('24 GB: LoRA rank 16')")
    assert page.locator("#train-resolution input[type='number']").input_value() == "1024"
    assert not page.locator("#train-offload input[type='checkbox']").is_checked()


def test_draft_captions_keep_written_ones_unless_asked(page):
    """The dataset of the first test is still loaded, both captions written by the person."""
    page.get_by_role("tab", name="Train").click()
    cell = page.locator("#train-captions [data-testid='cell-1-1']")
    assert cell.inner_text() == "sks dog sitting on grass"
    page.locator("#train-draft").click()
    page.wait_for_function("document.querySelector('#train-dataset-note')?.innerText?.includes('caption already')")
    assert cell.inner_text() == "sks dog sitting on grass"
    page.locator("#train-redo input[type='checkbox']").check()
    page.locator("#train-draft").click()
    page.wait_for_function("document.querySelector('#train-dataset-note')?.innerText?.includes('Drafted 2 captions')",
                           timeout=120_000)
    assert "gibberish" in page.locator("#train-dataset-note").inner_text()
    assert cell.inner_text().strip() and cell.inner_text() != "sks dog sitting on grass"
    page.locator("#train-draft-row").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "06-drafted-captions.png"), full_page=True)


def test_cache_first_run_shows_its_plan_and_lists_its_cache(page, studio):
    """The dataset of the first test, trained "cache first": the memory plan for 12 GB is shown before the run, the
    run encodes the dataset once (the log says so), trains from the cache, and the cache is listed."""
    page.get_by_role("tab", name="Train").click()
    _set(page, "train-length", 4)
    _set(page, "train-resolution", 64)
    _set(page, "train-rank", 4)
    page.locator("#train-method label", has_text="Cache first").click()
    page.wait_for_function("document.querySelector('#train-method-note')?.innerText?.includes('encoded once')")
    assert not page.locator("#train-samples-accordion").is_visible()     # no text encoder while it trains
    if not page.locator("#train-vram").is_visible():
        page.locator("#train-memory button").first.click()
    _set(page, "train-vram", 12)
    page.locator("#train-plan-btn").click()
    page.wait_for_function("document.querySelector('#train-plan')?.innerText?.includes('training plan for 12 GB')")
    assert "predicted peak VRAM" in page.locator("#train-plan").inner_text()
    page.locator("#train-run-name textarea").fill("cached dog")
    page.locator("#train-start").click()
    page.wait_for_function("document.querySelector('#train-status')?.innerText?.startsWith('Finished')",
                           timeout=120_000)
    log = page.locator("#train-log textarea").input_value()
    assert "Dataset encoded into the cache: 2 images." in log and "Run finished at step 4." in log
    page.locator("#train-caches-accordion").get_by_text("Cached datasets").first.click()
    page.wait_for_function("document.querySelector('#train-caches')?.innerText?.includes('FLUX.1')")
    assert len(studio[0].training.caches()) == 1
    page.screenshot(path=str(SHOTS / "07-cache-first.png"), full_page=True)


def test_train_tab_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, tabs.train\n"
            "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    repo = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
