"""Debian's chromium, headless, for the browser tests (playwright's own browser download is blocked here)."""
import contextlib
import pathlib
import re

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_URL = re.compile(r"^(https?://(127\.0\.0\.1|localhost)(:\d+)?/|data:|blob:)")


VIEWPORT = {"width": 1440, "height": 1000}
_PAGES: dict = {}      # (browser, url) -> the page the last test on that studio left, to load it again


@contextlib.contextmanager
def studio_page(browser, url: str, timeout_ms: int = 30_000):
    """The studio at ``url`` freshly loaded (1440x1000, empty browser storage); afterwards, whatever the test did, it
    must not have asked an outside host for anything.

    A test that passed leaves its page to the next one, which loads the studio again in it: a new browser context
    and page cost ~1.3 s more than loading the studio again (the renderer starts, every script is fetched anew), ~2
    minutes over the suite. Loading again gives the next test a new Gradio session; the storage (the queue's owner
    id lives there) is cleared and the viewport reset first. After a failure the page is closed, never reused."""
    key = (id(browser), url)
    page = _PAGES.pop(key, None)
    if page is None or page.is_closed():
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.requests = []
        page.on("request", lambda req: page.requests.append(req.url))
    else:
        page.evaluate("() => { try { localStorage.clear(); sessionStorage.clear(); } catch (e) {} }")
        page.set_viewport_size(VIEWPORT)
    page.set_default_timeout(timeout_ms)
    page.requests.clear()
    page.goto(url)
    page.wait_for_selector("#gen-generate")
    try:
        yield page
    except BaseException:
        page.context.close()
        raise
    outside = [u for u in page.requests if not LOCAL_URL.match(u)]
    if outside:
        page.context.close()
    assert not outside, f"the page requested outside hosts: {outside}"
    _PAGES[key] = page


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number field's box and commit it (Tab), as a person would."""
    box = page.locator(f"#{elem_id} input[type='number']").first
    box.fill(str(value))
    box.press("Tab")


def upload_to_inpaint(page, path, size_text: str, attempts: int = 3) -> None:
    """Open Inpaint & Control and upload ``path`` into its editor until the size line shows ``size_text``.

    Right after the tab opens, the editor's file input can exist before its upload handler does (a busy machine
    widens that window); a person would simply drop the file again, and so does this."""
    page.get_by_role("tab", name="Inpaint & Control").click()
    page.wait_for_selector("#inp-generate", state="visible")
    page.locator("#inp-editor canvas").first.wait_for(state="visible")
    check = f"document.querySelector('#inp-size-line')?.innerText?.includes({size_text!r})"
    for attempt in range(attempts):
        page.locator("#inp-editor input[type='file']").first.set_input_files(str(path))
        try:
            page.wait_for_function(check, timeout=20_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; the last try re-raises it
            if attempt == attempts - 1:
                raise


def _studio_state(studio) -> tuple:
    """(the engine's job, whether its job lock is held) of an in-process studio; "?" where not known."""
    engine = getattr(studio, "engine", None)
    running = getattr(engine, "_job", "?") if engine is not None else "?"
    locked = engine._lock.locked() if engine is not None and hasattr(engine, "_lock") else "?"
    return running, locked


def _threads_now() -> str:
    """Every thread of this process (the in-process studio's) with its innermost frames: where a wait stands."""
    import sys
    import threading
    import traceback
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)[-3:]
        out.append(f"{names.get(ident, ident)}: " + " <- ".join(f"{pathlib.Path(f.filename).name}:{f.lineno} "
                                                                 f"{f.name}" for f in reversed(stack)))
    return "\n".join(sorted(out))


def wait_for_job(page, condition: str, studio=None, timeout: int = 300_000, button: str | None = None) -> None:
    """Wait for a job's result on the page (``condition``: a JS expression). A job here takes seconds, but on a busy
    2-core machine a run has been seen to start nothing at all: the studio idle and answering (a watchdog probed it
    every 4 s), no job, no message -- the click lost on the page's side. So with ``button`` (the run button's
    selector), after 90 s with the studio idle and no result the button is pressed once more, with a warning that
    says so (and where the page and the studio's threads stood); when the wait runs out the failure says the same."""
    import warnings
    first = min(timeout, 90_000) if button else timeout
    try:
        page.wait_for_function(condition, timeout=first)
        return
    except Exception as exc:  # noqa: BLE001 - playwright's TimeoutError: retried once, or re-raised with the state
        lost = _studio_state(studio) == (None, False)
        if not button or not lost or first >= timeout:
            _fail(page, studio, timeout, exc)
    warnings.warn(f"{button}: no job started in 90 s with the studio idle; pressed again. The studio's threads "
                  f"then:\n{_threads_now()}", stacklevel=2)
    page.locator(button).click()
    try:
        page.wait_for_function(condition, timeout=timeout - first)
    except Exception as exc:  # noqa: BLE001
        _fail(page, studio, timeout, exc)


def _fail(page, studio, timeout: int, exc: Exception) -> None:
    toasts = page.locator(".toast-body").all_inner_texts()
    running, locked = _studio_state(studio)
    raise AssertionError(f"No result after {timeout / 1000:.0f} s. Messages on the page: {toasts}; the studio's "
                         f"job: {running!r}, job lock held: {locked}. Its threads:\n{_threads_now()}") from exc
