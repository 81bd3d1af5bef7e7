"""A shared studio in the browser (issue 21, item 2): two visitors (two browser contexts) on a demo studio with
sharing on each make one tiny image; each sees only their own in Generate's gallery and in History (after a reload
too), and their images are in their own folders under outputs/visitors/; a visitor cannot open the other's image by
its path; the limits line is beside the Generate button, and a job over a limit is refused with a message naming
the limit and its flag.

Its own studio (not the session's, which is a one-person studio), served on 127.0.0.1 without a public link:
``Sharing(shared=True)`` is what --share, --auth or a Space turn on."""
from __future__ import annotations

import pytest

from tests.browser import CHROMIUM, VIEWPORT, set_number, wait_for_job

TIMEOUT_MS = 60_000
DEMO = "FLUX.1-dev-random-demo"


@pytest.fixture(scope="module")
def shared_studio(tmp_path_factory):
    from app.studio import launch_studio
    from studio.engine import Engine
    from studio.sharing import Limits, Sharing
    from tests.test_app_client import _free_port

    root = tmp_path_factory.mktemp("shared-studio")
    sharing = Sharing(shared=True, limits=Limits(max_pixels=2 ** 20, max_steps=4, max_batch=2), reason="--share")
    engine = Engine(models_dir=root / "models", demo=True, outputs_dir=root / "outputs", sharing=sharing,
                    defer_demo=True)    # the demo's files are written while the pages load (launch_studio)
    demo = launch_studio(engine, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield engine, demo
    demo.close()
    engine.queue.close()


def _visitors(browser, url, count: int = 2) -> list:
    """``count`` visitors (browser contexts: their own storage, so their own browser ids), loading at once."""
    pages = [browser.new_context(viewport=VIEWPORT).new_page() for _ in range(count)]
    for page in pages:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url, wait_until="commit")
    for page in pages:
        page.wait_for_selector("#gen-generate")
    return pages


def _generate(page, prompt: str, width: int = 64, height: int = 64, steps: bool = True) -> None:
    fields = (("gen-width", width), ("gen-height", height)) + ((("gen-steps", 2), ("gen-seed", 5)) if steps else ())
    for elem, value in fields:
        set_number(page, elem, value)
    page.locator("#gen-prompt textarea").fill(prompt)
    page.locator("#gen-generate").click()


def _history_shows_only(page, prompt: str) -> None:
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#hist-page-line')?.innerText?.includes('1 image')")
    page.locator("#hist-gallery .thumbnail-item").first.click()
    page.wait_for_function(f"document.querySelector('#hist-info textarea')?.value?.startsWith({prompt!r})")


def test_two_visitors_each_see_only_their_own_images(browser, shared_studio, shots):
    assert CHROMIUM
    engine, demo = shared_studio
    alice, bob = _visitors(browser, demo.local_url)
    try:
        assert alice.locator("#gen-limits").inner_text() == "This studio allows up to 1 MP, 4 steps, 2 images per job."
        alice.locator("#gen-top").screenshot(path=str(shots / "shared-studio-limits.png"))
        for page, prompt in ((alice, "alice lighthouse"), (bob, "bob harbour")):
            _generate(page, prompt)
            wait_for_job(page, f"document.querySelector('#selected-info textarea')?.value?.startsWith({prompt!r})",
                         timeout=120_000)
            page.locator("#results-gallery img").first.wait_for()
        folders = sorted(p.parent.parent for p in (engine.outputs_dir / "visitors").rglob("*.png"))
        assert len(folders) == 2 and folders[0] != folders[1]       # one folder each
        assert not list(engine.outputs_dir.glob("20*-*-*"))        # nothing in the shared top level

        _history_shows_only(alice, "alice lighthouse")
        _history_shows_only(bob, "bob harbour")
        alice.reload()                               # a reload keeps one's history (the browser's id is kept)
        alice.wait_for_selector("#gen-generate")
        _history_shows_only(alice, "alice lighthouse")

        # Alice cannot open Bob's image by its path (Gradio's file route serves nothing of the outputs folder).
        bob_png = next(p for p in (engine.outputs_dir / "visitors").rglob("*.png")
                       if "bob" in p.read_bytes().decode("latin-1"))
        answer = alice.request.get(f"{demo.local_url}gradio_api/file={bob_png}")
        assert answer.status == 403

        # Over a limit: refused before any work, the message names the limit and its flag. (The Steps and Images
        # sliders end at their limits, so the size is what a person can still ask too much of.)
        assert bob.locator("#gen-steps input[type='range']").get_attribute("max") == "4"
        bob.get_by_role("tab", name="Generate").click()
        _generate(bob, "too large", width=1536, height=1024, steps=False)
        toast = bob.locator(".toast-body", has_text="--max-pixels")
        toast.first.wait_for()
        assert "1536×1024 is 1.5 MP, more than this studio allows: at most 1 MP" in toast.first.inner_text()
    finally:
        alice.context.close()
        bob.context.close()
