"""The queue in the browser (issue 14, "What it must do" 3): a prompt list queued from Generate, shown in order with
positions, one job moved and one cancelled while they wait, the rest run in the new order and their images arrive
in Generate's gallery; Ctrl+Enter queues; a reloaded page still lists its jobs. The session's demo studio; the
engine's job slot is held by the test so that the jobs wait while they are moved."""
from __future__ import annotations

import contextlib
import re

from PIL import Image

from tests.browser import set_number, studio_page

TIMEOUT_MS = 60_000


@contextlib.contextmanager
def engine_held(engine):
    """The engine's one job slot taken, as by a long job: queued jobs wait (the first shows as running)."""
    assert engine._lock.acquire(timeout=60), "the studio's engine stayed busy"
    try:
        yield
    finally:
        engine._lock.release()


def _items(page) -> list[str]:
    return [t.strip() for t in page.locator("#queue-panel .queue-item").all_inner_texts()]


def _wait_items(page, count: int, *words: str) -> None:
    words_js = "[" + ",".join(repr(w) for w in words) + "]"
    page.wait_for_function(
        "() => { const items = [...document.querySelectorAll('#queue-panel .queue-item')].map(e => e.innerText);"
        f" return items.length === {count} && {words_js}.every(w => items.join('|').includes(w)); }}")
    page.wait_for_timeout(500)     # the redrawn list's buttons are wired a moment after they appear


def _item_button(page, text: str, kind: str):
    """The ↑ / ↓ / ✕ button (kind: up, down, cancel) of the queue item whose line holds ``text``."""
    item = page.locator("#queue-panel .queue-item", has_text=text).first
    qid = re.sub(r"^queue-item-", "", item.get_attribute("id"))
    return page.locator(f"#queue-{kind}-{qid}")


def _prompts_made_since(outputs, before: set) -> list[str]:
    new = sorted((p for p in outputs.rglob("*.png") if p not in before and ".ref" not in p.name),
                 key=lambda p: p.stat().st_mtime_ns)
    return [Image.open(p).text["parameters"].split("\n")[0] for p in new]


def test_a_prompt_list_is_queued_moved_cancelled_and_run_in_order(browser, studio, shots):
    before = set(studio.outputs.rglob("*.png"))
    with studio_page(browser, studio.url, TIMEOUT_MS) as page:
        for elem, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", 700)):
            set_number(page, elem, value)
        page.locator("#gen-prompt textarea").fill("first lighthouse\nsecond harbour\nthird boat")
        page.get_by_role("button", name="Toggle Sidebar").click()
        page.locator("#queue-each-line input").check()
        with engine_held(studio.engine):
            page.locator("#gen-queue").click()
            _wait_items(page, 3, "▶ running", "#1", "#2")
            assert [t.split("\n")[0][:22] for t in _items(page)] == [
                "▶ running “first light", "#1 “second harbour” · ", "#2 “third boat” · FLUX"]
            _item_button(page, "third boat", "up").click()              # third before second
            _wait_items(page, 3, "#1 “third boat", "#2 “second harbour")
            _item_button(page, "second harbour", "cancel").click()     # second never runs
            _wait_items(page, 3, "✕ cancelled “second harbour", "#1 “third boat")
            page.locator("#queue-panel").screenshot(path=str(shots / "queue-moved-and-cancelled.png"))
        # The slot is free: first, then third run; their images arrive in Generate's gallery, newest first.
        _wait_items(page, 3, "✓ done “first lighthouse", "✓ done “third boat", "✕ cancelled")
        page.wait_for_function("document.querySelector('#selected-info textarea')?.value?.startsWith('third boat')")
        assert _prompts_made_since(studio.outputs, before) == ["first lighthouse", "third boat"]
        assert page.locator("#results-gallery .thumbnail-item").count() >= 2
        page.screenshot(path=str(shots / "queue-done.png"))

        # Ctrl+Enter in the prompt queues (one line, one job) and its image arrives too.
        page.locator("#queue-each-line input").uncheck()
        box = page.locator("#gen-prompt textarea")
        box.fill("fourth castle")
        box.press("Control+Enter")
        _wait_items(page, 4, "✓ done “fourth castle")
        page.wait_for_function("document.querySelector('#selected-info textarea')?.value?.startsWith('fourth')")
        assert box.input_value() == "fourth castle"

        # A reload keeps this browser's jobs (its id is kept in the browser); "Clear finished" empties the list.
        page.reload()
        page.wait_for_selector("#gen-generate")
        page.get_by_role("button", name="Toggle Sidebar").click()
        _wait_items(page, 4, "fourth castle", "first lighthouse")
        page.locator("#queue-clear").click()
        page.locator("#queue-empty").wait_for()


def test_edit_queues_too_and_says_what_is_missing(page, studio, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (30, 140, 90)).save(photo)
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-prompt textarea").fill("make it red")
    page.locator("#edit-queue").click()
    page.locator("#edit-input .validation-error", has_text="Upload or paste an image to edit first.").wait_for()
    assert page.locator("#edit-settings .error").count() == 0 and not _items(page)
    page.locator("#edit-input input[type='file']").set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#edit-size-line')?.innerText?.includes('Output')")
    set_number(page, "edit-steps", 2)
    page.locator("#edit-queue").click()
    _wait_items(page, 1, "✓ done “make it red", "in the Edit tab")
    page.wait_for_function("document.querySelector('#edit-selected-info textarea')?.value?.startsWith('make it red')")
