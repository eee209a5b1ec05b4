"""The run report on real photos: train, rebuild report.html, open it in Chromium, save README screenshots.

Usage: python benchmarks/report_page.py [--per-class 20] [--out-dir docs/images]

Data: ../shared/datasets/sign_language_digits, `per-class` training photos and
10 test photos per class (or, without it, sample_data/signs); the default
base (efficientnet_lite0, embedded weights). Prints the page's size and the
time `finetune report` takes against the training run measured in the same
invocation (both whole processes), then writes report.png (1200 px wide) and
report-phone.png (390 px), the first 1800 / 1600 CSS px of the page, each < 300 KB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, SIGNS, finetune_cmd, measure, small_png
from PIL import Image

sys.path.insert(0, str(REPO))
from tests.browser import requires_browser, view  # noqa: E402  (the tests' own Chromium driver)

#: README pictures stay below this many bytes.
MAX_BYTES = 300_000


def data(root: Path, per_class: int, seed: int = 0) -> tuple[Path, Path | None]:
    """(training folder, test folder or None): sign photos split per class, or sample_data/signs as is."""
    if not SIGNS.is_dir():
        print(f"{SIGNS} not found: using sample_data/signs (no test folder)")
        return REPO / "sample_data" / "signs", None
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        picked = rng.permutation(len(files))
        for part, idx in (("train", picked[:per_class]), ("test", picked[per_class:per_class + 10])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                (root / part / folder.name / files[i].name).write_bytes(files[i].read_bytes())
    return root / "train", root / "test"


def screenshot(page: Path, target: Path, width: int, height: int = 1600) -> dict:
    """Open `page` at `width` CSS px; save its first `height` px as a PNG under MAX_BYTES (fewer colours if
    needed). Returns what the browser saw."""
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.png"
        seen = view(page, screenshot=full, width=width)
        image = Image.open(full).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, height)))
    data, colours = small_png(image, MAX_BYTES)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return {"images": len(seen.widths), "broken": sum(w == 0 for w in seen.widths), "errors": seen.console_errors,
            "scroll_width": seen.scroll_width, "bytes": len(data), "colours": colours or "all"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    if requires_browser.args[0]:
        sys.exit(f"skipped: {requires_browser.kwargs['reason']}")
    with tempfile.TemporaryDirectory() as tmp:
        train, test = data(Path(tmp) / "data", args.per_class)
        run = Path(tmp) / "signs-run"
        extra = ["--test-dir", test] if test else []
        trained = measure(finetune_cmd("train", train, "--out", run, "--no-cache", *extra))
        page = run / "report.html"
        page.unlink()
        rebuilt = measure(finetune_cmd("report", run))
        size = page.stat().st_size
        wrong = page.read_text("utf-8").count('<figure class="flag">')
        print(f"train (default base, {sum(1 for _ in train.rglob('*.*'))} photos): {trained['wall']:.1f} s; "
              f"`finetune report` alone: {rebuilt['wall']:.1f} s ({rebuilt['wall'] / trained['wall']:.2f}x the "
              f"training run); page {size / 1024:.0f} KB with {wrong} misclassified thumbnails")
        for name, width, height in (("report.png", 1200, 1800), ("report-phone.png", 390, 1600)):
            facts = screenshot(page, args.out_dir / name, width, height)
            print(f"{name}: {facts}")
            if facts["broken"] or facts["errors"] or facts["scroll_width"] > width:
                sys.exit(f"{name}: the page does not read at {width} px: {facts}")


if __name__ == "__main__":
    main()
