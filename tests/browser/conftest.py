"""Playwright driving Debian's Chromium (``/usr/bin/chromium``) against the live server.

Playwright never downloads a browser here. Where no Chromium exists the
browser tests skip, except in CI (``CI`` set), where they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = Path(os.environ.get("MAILGOV_CHROMIUM", "/usr/bin/chromium"))

# Playwright's sync API runs an event loop in this thread; Django would then
# refuse the ORM calls the tests make between browser steps.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


# Per module, not per session: Playwright's sync API keeps an event loop
# running in the main thread while it is open, and the async views tested
# after the browser tests (django-health-check's) cannot run beside it.
@pytest.fixture(scope="module")
def chromium() -> Iterator:
    if not CHROMIUM.exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()
