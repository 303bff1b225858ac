"""A real headless browser for tests of pages people look at (Debian's `chromium`, driven by Playwright).

`make test` installs Debian's chromium when it is missing; Playwright only drives it (no browser download).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# Chromium's background services try the network at start; this machine has none, so switch them off.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    return os.environ.get("PIPELINE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """Yield a Playwright page in headless Chromium; skip the test (with the reason) if no chromium is installed."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
