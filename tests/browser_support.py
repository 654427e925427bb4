"""Debian's Chromium for browser tests (Playwright's own browser download is not reachable here)."""

from contextlib import contextmanager

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextmanager
def chromium_page(*, width: int = 1280, height: int = 900, timeout_ms: int = 20_000, **page_options):
    """A page of headless Debian Chromium with a `width` × `height` viewport and Playwright's default timeout of
    `timeout_ms`; `page_options` go to ``new_page`` (e.g. ``accept_downloads=True``). Closed after."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height}, **page_options)
        page.set_default_timeout(timeout_ms)
        try:
            yield page
        finally:
            browser.close()


def sign_in(page, url: str, username: str, password: str) -> None:
    """Fill the sign-in form at `url` (the login page, or a page that sends there) and submit it."""
    page.goto(url)
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
