"""Open a written HTML page in a real headless Chromium and report what a reader would see.

Driven by Playwright's Python package with the system's Chromium (Debian's
`chromium` package; `.ci/run` installs both). `requires_browser` skips a
test, naming what is missing, where either is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def chromium_path() -> str | None:
    """The Chromium executable: $FINETUNE_CHROMIUM, else the first of chromium / chromium-browser on PATH."""
    named = os.environ.get("FINETUNE_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the Python package playwright is not installed (pip install playwright)"
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set FINETUNE_CHROMIUM)"
    return None


requires_browser = pytest.mark.skipif(_missing() is not None, reason=f"browser test skipped: {_missing()}")


@dataclass
class PageView:
    """What the browser saw.

    Attributes:
        widths: naturalWidth of every <img>, in document order (0: failed to load).
        console_errors: console messages of type error, uncaught page errors, failed requests.
        text: the page's visible text (document.body.innerText).
        scroll_width: the document's scrollWidth at the viewport's width (> width: sideways scrolling).
    """

    widths: list[int]
    console_errors: list[str] = field(default_factory=list)
    text: str = ""
    scroll_width: int = 0


def view(page_path: Path, screenshot: Path | None = None, width: int = 1200, height: int = 900) -> PageView:
    """Load `page_path` (file://) at `width` x `height` CSS px, wait for the load event, read the images.

    A full-page PNG screenshot goes to `screenshot` when given.
    """
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:120]}"))
            page.goto(Path(page_path).absolute().as_uri(), wait_until="load")
            widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            seen = PageView(widths, errors, page.evaluate("document.body.innerText"),
                            page.evaluate("document.documentElement.scrollWidth"))
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def assert_page_reads(page_path: Path, least_images: int = 1, **options) -> PageView:
    """View the page; assert at least `least_images` images, all loaded, and no console errors."""
    seen = view(page_path, **options)
    assert len(seen.widths) >= least_images, f"{page_path}: {len(seen.widths)} images, expected >= {least_images}"
    assert all(w > 0 for w in seen.widths), f"{page_path}: images that did not load: {seen.widths}"
    assert seen.console_errors == [], f"{page_path}: console errors: {seen.console_errors}"
    return seen
