"""The browser tests' toolkit: Debian's Chromium through Playwright (its own browser download is
not used), and screenshots. Tests that need it are marked ``needs_chromium``; the ``browser``
fixture (conftest.py) starts one."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from helpers import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts" / "screenshots"  # git-ignored: for a person to look at
DOCS_IMG = ROOT / "docs" / "img"                 # the docs' screenshots, retaken on request

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@contextlib.asynccontextmanager
async def chromium():
    """Chromium, headless."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            await browser.close()


async def shot(page, name: str, *, for_docs: bool = False) -> None:
    """A full-page screenshot in SHOTS; with ``for_docs``, also in docs/img when
    CALLGATE_DOCS_SCREENSHOTS=1 (so a test run does not change tracked images)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if for_docs and os.environ.get("CALLGATE_DOCS_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(DOCS_IMG / f"{name}.png"), full_page=True)
