"""The studio on a phone (390 px wide) and from the keyboard: every tab reachable without a "⋯" menu, the results
right under the run button, Train's start button on screen without scrolling past its form, Ctrl+Enter runs a job."""
from __future__ import annotations

import pytest

from tests.browser import set_number, studio_page

TIMEOUT_MS = 60_000


@pytest.fixture
def phone(browser, studio):
    with studio_page(browser, studio.url, TIMEOUT_MS) as page:
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        yield page


def _box(page, selector):
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not shown"
    return box


def test_every_tab_is_reachable_on_a_phone(phone, tmp_path):
    tabs = phone.locator("#studio-tabs [role='tab']")
    names = [t.inner_text() for t in tabs.all()]
    assert {"Generate", "Edit", "Inpaint & Control", "EliGen", "Train"} <= set(names)
    assert all(t.is_visible() for t in tabs.all()), names
    assert phone.locator("#studio-tabs button[aria-label='More tabs']").count() == 0 or \
        not phone.locator("#studio-tabs button[aria-label='More tabs']").is_visible()
    for box in (_box(phone, f"#studio-tabs [role='tab']:has-text('{n}')") for n in names):
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    phone.screenshot(path=str(tmp_path / "phone-generate.png"))


def test_results_come_right_after_the_run_button_on_a_phone(phone):
    for tab, prefix, results, settings in (("Generate", "gen", "#gen-results", "#gen-settings"),
                                           ("Edit", "edit", "#edit-results", "#edit-settings"),
                                           ("Inpaint & Control", "inp", "#inp-results", "#inp-settings")):
        phone.get_by_role("tab", name=tab).click()
        run, shown, form = _box(phone, f"#{prefix}-generate"), _box(phone, results), _box(phone, settings)
        assert run["y"] < shown["y"] < form["y"], (tab, run, shown, form)


def test_start_training_is_on_screen_on_a_phone(phone):
    phone.get_by_role("tab", name="Train").click()
    start = _box(phone, "#train-start")
    assert 0 <= start["y"] and start["y"] + start["height"] <= 844      # in the first screen, no scrolling
    form = _box(phone, "#train-form")
    assert form["y"] + form["height"] > 844                              # ...though the form is longer than it


def test_ctrl_enter_in_the_prompt_runs_the_job(browser, studio):
    with studio_page(browser, studio.url, TIMEOUT_MS) as page:
        for elem, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", 4242)):
            set_number(page, elem, value)
        box = page.locator("#gen-prompt textarea")
        box.fill("a key-pressed house")
        box.press("Control+Enter")
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 4242,')",
                               timeout=90_000)
        assert page.locator("#gen-prompt textarea").input_value() == "a key-pressed house"   # no newline added
