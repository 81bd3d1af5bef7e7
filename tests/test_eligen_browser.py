"""The EliGen tab in a real browser (headless chromium, the demo model): paint two entities in their colours
(picked by clicking each entity's swatch), write their prompts, generate; the masks used are where they were
painted; save the layout, clear, load it back and get the same image; resize the canvas and keep the masks.
"""
from __future__ import annotations

import pathlib
import time
import zipfile

import numpy as np
from PIL import Image

from tests.test_app_browser import _set_number


def _open(page):
    page.get_by_role("tab", name="EliGen").click()
    page.wait_for_selector("#eli-generate", state="visible")


def _paint(page, entity, x0, y0, x1, y1):
    """Pick the entity's colour by its swatch, then drag a stroke (coordinates are fractions of the canvas box)."""
    page.locator("#eli-editor").scroll_into_view_if_needed()
    page.locator(f"#eli-swatch-{entity} button").click()
    page.wait_for_timeout(500)
    page.locator("#eli-editor").scroll_into_view_if_needed()
    box = page.locator("#eli-editor canvas").first.bounding_box()
    px = lambda f: box["x"] + box["width"] * f   # noqa: E731
    py = lambda f: box["y"] + box["height"] * f  # noqa: E731
    page.mouse.move(px(x0), py(y0))
    page.mouse.down()
    # 3 moves, closer together than the brush is wide, still paint one unbroken stroke; each move costs ~0.3 s here
    # (the editor redraws its canvas in software), so 15 of them cost 4 s a stroke.
    page.mouse.move(px(x1), py(y1), steps=3)
    page.mouse.up()


def _preview_src(page) -> str:
    return page.evaluate("() => document.querySelector('#eli-preview img')?.src || ''")


def _wait_new_preview(page, before: str):
    """Until the preview shows a picture other than ``before`` (each refresh writes a new file): a refresh ends each
    chain of events that changes the canvas, so the chain's other outputs have landed by then."""
    page.wait_for_function("(before) => { const src = document.querySelector('#eli-preview img')?.src;"
                           " return !!src && src !== before; }", arg=before, timeout=30_000)


# The editor's zoom label ("140%"): it changes when the editor has drawn a background of another size.
ZOOM_JS = ("[...(document.querySelector('#eli-editor')?.querySelectorAll('*') || [])]"
           ".filter(e => !e.children.length && /^\\d+%$/.test(e.textContent.trim()))"
           ".map(e => e.textContent.trim()).join(' ')")


def _wait_seed(page, seed):
    from tests.browser import wait_for_job
    wait_for_job(page, f"document.querySelector('#eli-selected-info textarea').value.includes('Seed: {seed},')")


def _result(studio, seed):
    return sorted(studio.outputs.rglob(f"*-{seed}.png"), key=lambda p: p.stat().st_mtime)[-1]


def _wait_new_result(page, studio, seed, previous, timeout_s=120):
    """The next result with this seed (the info box already says the seed: wait for the file and its info)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        newest = _result(studio, seed)
        if newest != previous and str(newest) in page.locator("#eli-selected-info textarea").input_value():
            return newest
        page.wait_for_timeout(300)
    raise AssertionError("the second job did not finish")


def _mask(result, k):
    return np.asarray(Image.open(result.with_name(result.stem + f".ent{k}.png")).convert("L")) > 127


def test_eligen_paint_generate_save_load_in_the_browser(page, studio, shots, tmp_path):
    _open(page)
    _paint(page, 0, 0.35, 0.4, 0.35, 0.6)          # entity 1 (red): a vertical stroke left of centre
    _paint(page, 1, 0.65, 0.4, 0.65, 0.6)          # entity 2 (green): right of centre
    page.locator("#eli-entity-0-prompt textarea").fill("a black cat")
    page.locator("#eli-entity-1-prompt textarea").fill("a brown dog")
    page.locator("#eli-prompt textarea").fill("a cat and a dog on a sofa")
    _set_number(page, "eli-steps", 2)
    _set_number(page, "eli-seed", 51)
    page.wait_for_selector("#eli-preview img")
    page.screenshot(path=str(shots / "eligen-01-painted.png"), full_page=True)
    page.locator("#eli-generate").click()
    _wait_seed(page, 51)
    info = page.locator("#eli-selected-info textarea").input_value()
    assert "1: a black cat" in info and "2: a brown dog" in info and "Size: 256x256" in info
    page.screenshot(path=str(shots / "eligen-02-result.png"), full_page=True)

    # The masks used: canvas-sized, where each colour was painted, apart.
    first = _result(studio, 51)
    m0, m1 = _mask(first, 0), _mask(first, 1)
    assert m0.shape == m1.shape == (256, 256)
    assert 0.01 < m0.mean() < 0.3 and 0.01 < m1.mean() < 0.3
    assert np.nonzero(m0)[1].mean() < 128 < np.nonzero(m1)[1].mean()
    assert not (m0 & m1).any()

    # Save the layout, clear the masks, load the layout back: the same job gives the same image.
    page.locator("#eli-layout").click()
    page.locator("#eli-save").click()
    page.wait_for_selector("#eli-saved a")
    saved = sorted((studio.outputs / "layouts").glob("eligen-*.zip"))[-1]
    with zipfile.ZipFile(saved) as z:
        assert {"0.png", "1.png", "prompts.json"} <= set(z.namelist())
    painted = _preview_src(page)
    page.locator("#eli-clear").click()
    _wait_new_preview(page, painted)                 # the clearing has landed before the layout is loaded
    page.locator("#eli-entity-0-prompt textarea").fill("")
    page.locator("#eli-entity-1-prompt textarea").fill("")
    page.wait_for_function("document.querySelector('#eli-entity-1-prompt textarea')?.value === ''")
    cleared = _preview_src(page)
    page.locator("#eli-load input[type=file]").set_input_files(str(saved))
    page.wait_for_function("document.querySelector('#eli-entity-1-prompt textarea')?.value === 'a brown dog'")
    _wait_new_preview(page, cleared)                 # ... and its preview drawn
    page.screenshot(path=str(shots / "eligen-03-loaded.png"), full_page=True)
    _set_number(page, "eli-seed", 51)
    page.locator("#eli-generate").click()
    again = _wait_new_result(page, studio, 51, first)
    assert np.array_equal(_mask(again, 0), m0) and np.array_equal(_mask(again, 1), m1)
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))

    # A new canvas size: the masks follow (stretched onto it) and the preview shows them at the new size.
    _set_number(page, "eli-width", 320)
    _set_number(page, "eli-height", 192)
    page.locator("#eli-resize").click()
    page.wait_for_function("document.querySelector('#eli-preview img') && "
                           "document.querySelector('#eli-preview img').naturalWidth === 320", timeout=30_000)
    page.screenshot(path=str(shots / "eligen-04-resized.png"), full_page=True)
    src = page.locator("#eli-preview img").get_attribute("src")
    assert "file=" in src
    arr = np.asarray(Image.open(pathlib.Path(src.split("file=", 1)[1])).convert("RGB")).astype(int)
    assert arr.shape == (192, 320, 3)
    for mask, (strong, weak) in ((m0, (0, 1)), (m1, (1, 0))):      # red-ish where entity 1 was, green-ish for 2
        ys, xs = np.nonzero(mask)
        pixel = arr[int(ys.mean() * 192 / 256), int(xs.mean() * 320 / 256)]
        assert pixel[strong] > pixel[weak] + 40, pixel


def test_eligen_inpaint_restore_in_the_browser(page, studio, shots, tmp_path):
    """Inpaint mode: the input image becomes the canvas (its own size), one entity is repainted; restoring the result
    brings back the mode, the input and the mask, and the same seed gives the same image."""
    photo = tmp_path / "room.png"
    Image.fromarray((np.random.RandomState(5).rand(72, 100, 3) * 255).astype("uint8")).save(photo)
    _open(page)
    page.locator("#eli-inpaint").click()
    page.locator("#eli-input-image input[type=file]").set_input_files(str(photo))
    # The upload has landed (its chain ends with a preview of the 256x256 canvas) before inpainting is switched on.
    page.wait_for_selector("#eli-input-image img")
    page.wait_for_function("document.querySelector('#eli-preview img')?.naturalWidth === 256")
    zoom = page.evaluate(f"() => {ZOOM_JS}")
    assert zoom, "the editor's zoom label was not found"
    page.locator("#eli-inpaint-on input").check()
    page.wait_for_function("document.querySelector('#eli-width input')?.value === '100'")
    # The new canvas lands before the first stroke: the editor has fitted the 100x72 picture (its zoom changed) and
    # the preview of the new canvas is drawn (the last event of the chain).
    page.wait_for_function(f"(zoom) => {{ const z = {ZOOM_JS}; return !!z && z !== zoom; }}", arg=zoom)
    page.wait_for_function("document.querySelector('#eli-preview img')?.naturalWidth === 100")
    _paint(page, 0, 0.45, 0.4, 0.45, 0.6)
    page.locator("#eli-entity-0-prompt textarea").fill("a lamp")
    _set_number(page, "eli-steps", 2)
    _set_number(page, "eli-seed", 61)
    page.locator("#eli-generate").click()
    _wait_seed(page, 61)
    first = _result(studio, 61)
    assert Image.open(first).size == (100, 72)
    assert "inpainted into the input" in page.locator("#eli-selected-info textarea").input_value()
    # Turn inpainting off and clear the masks, then restore: mode, input and mask come back.
    # Each chain is waited for to its end (a slow machine must not let a late chain land after the restore's).
    shown = page.locator("#eli-preview img").get_attribute("src")
    page.locator("#eli-inpaint-on input").uncheck()
    page.wait_for_function("document.querySelector('#eli-width input')?.value === '112'")   # a plain canvas
    _wait_new_preview(page, shown)
    shown = page.locator("#eli-preview img").get_attribute("src")
    page.locator("#eli-clear").click()
    _wait_new_preview(page, shown)
    page.locator("#eli-restore-selected").click()
    page.wait_for_function("document.querySelector('#eli-inpaint-on input').checked")
    page.wait_for_function("document.querySelector('#eli-width input').value === '100'")
    page.wait_for_function("document.querySelector('#eli-preview img')?.naturalWidth === 100")
    page.wait_for_timeout(1000)      # the restored mode's and input's own canvas chains (the same canvas again)
    page.screenshot(path=str(shots / "eligen-05-inpaint-restored.png"), full_page=True)
    page.locator("#eli-generate").click()
    again = _wait_new_result(page, studio, 61, first)
    assert np.array_equal(_mask(again, 0), _mask(first, 0))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))

