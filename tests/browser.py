"""Debian's chromium, headless, for the browser tests (playwright's own browser download is blocked here)."""
import contextlib
import re

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_URL = re.compile(r"^(https?://(127\.0\.0\.1|localhost)(:\d+)?/|data:|blob:)")


@contextlib.contextmanager
def studio_page(browser, url: str, timeout_ms: int = 30_000):
    """A fresh page on the studio at ``url`` (1440x1000), loaded; afterwards, whatever the test did, it must not have
    asked an outside host for anything."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    page.requests = []
    page.on("request", lambda req: page.requests.append(req.url))
    page.goto(url)
    page.wait_for_selector("#gen-generate")
    yield page
    context.close()
    outside = [u for u in page.requests if not LOCAL_URL.match(u)]
    assert not outside, f"the page requested outside hosts: {outside}"


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number field's box and commit it (Tab), as a person would."""
    box = page.locator(f"#{elem_id} input[type='number']").first
    box.fill(str(value))
    box.press("Tab")
