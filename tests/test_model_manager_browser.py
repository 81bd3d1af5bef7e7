"""The model manager in a real browser, on the session's demo studio: the table with the demo model installed, Verify
and its result line, and Delete's confirm step (answered "Keep them": the session's demo stays)."""
from __future__ import annotations

DEMO = "FLUX.1-dev-random-demo"
DEMO_ROW = f"#mm-table tr[data-name='{DEMO}']"


def test_model_manager_lists_and_verifies_the_demo(page, studio, shots):
    page.get_by_role("tab", name="Models & memory").click()
    page.locator("#mm-accordion").get_by_text("Model manager").first.click()
    page.wait_for_selector("#mm-table tbody tr")
    if page.locator(f"{DEMO_ROW}[data-status='installed']").count() == 0:   # the demo may still be being written
        page.wait_for_function(f"document.querySelector(\"{DEMO_ROW}\") !== null")
        page.locator("#mm-refresh").click()
    page.wait_for_selector(f"{DEMO_ROW}[data-status='installed']")
    table = page.locator("#mm-table").inner_text()
    assert "FLUX.1-schnell" in table and "Apache-2.0" in table and "FLUX.1 [dev] Non-Commercial License" in table
    assert "not downloaded" in page.locator("#mm-table tr[data-name='FLUX.1-dev'] .mm-status").inner_text()
    assert "used" in page.locator("#mm-disk").inner_text() and "free of" in page.locator("#mm-disk").inner_text()
    assert page.locator("#mm-token input[type='password']").count() == 1

    picker = page.locator("#mm-model input")
    if DEMO not in picker.input_value():
        picker.click()
        picker.fill(DEMO)
        page.locator("ul[role='listbox'] li", has_text=f"{DEMO} · demo model").first.click()
    page.locator("#mm-verify").click()
    page.wait_for_function("document.querySelector('#mm-progress [data-phase=\"done\"]')?.innerText"
                           f".includes('{DEMO}: ')", timeout=30_000)
    line = page.locator("#mm-progress").inner_text()
    assert "file(s) OK" in line and "safetensors file(s) match their headers" in line, line
    page.screenshot(path=str(shots / "model-manager.png"), full_page=True)

    # Delete asks first; "Keep them" leaves every file where it was.
    before = sorted(p for p in studio.engine.models_dir.rglob("*") if p.is_file())
    page.locator("#mm-delete").click()
    page.wait_for_selector("#mm-confirm-text", state="visible")
    assert f"Delete {DEMO}?" in page.locator("#mm-confirm-text").inner_text()
    page.locator("#mm-delete-no").click()
    page.wait_for_selector("#mm-delete-yes", state="hidden")
    assert sorted(p for p in studio.engine.models_dir.rglob("*") if p.is_file()) == before


def test_the_progress_line_while_a_download_runs():
    import time

    from app.model_manager_panel import mm_progress_html
    line = mm_progress_html({"phase": "running", "task": "Downloading", "name": "FLUX.1-schnell", "done": 512 * 2 ** 20,
                             "total": 2 ** 30, "file": "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors",
                             "started": time.time() - 8, "message": ""})
    assert "<progress max='1073741824' value='536870912'>" in line
    assert "Downloading FLUX.1-schnell: 512.0 MB of 1.0 GB (50%) · black-forest-labs/" in line and "MB/s" in line
    assert "data-phase='failed'" in mm_progress_html({"phase": "failed", "message": "no token"})
