"""The shared HTML pieces, read by a real headless Chromium."""

from __future__ import annotations

import io

from PIL import Image

from finetune_cli.pages.html import Tile, figure, page, section, table, write_gallery, write_page
from tests.browser import assert_page_reads, requires_browser, view


def png(side=24, colour=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(out, "PNG")
    return out.getvalue()


def test_text_is_escaped_and_bytes_are_inlined(tmp_path):
    target = write_gallery(tmp_path / "index.html", "a <b> & c", [("x<y", [Tile(png(), "cat <script>")])])
    text = target.read_text()
    assert "<script>" not in text and "cat &lt;script&gt;" in text and "a &lt;b&gt; &amp; c" in text
    assert "data:image/png;base64," in text


@requires_browser
def test_gallery_loads_every_image_at_phone_width(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "one.png").write_bytes(png(colour=(0, 90, 200)))
    target = write_gallery(tmp_path / "index.html", "gallery",
                           [("inline", [Tile(png(), "a", flagged=True)]), ("files", [Tile("pics/one.png", "b")])])
    seen = assert_page_reads(target, least_images=2, width=390)
    assert seen.widths == [24, 24] and "gallery" in seen.text
    assert seen.scroll_width <= 390, "the page scrolls sideways on a phone-width screen"


@requires_browser
def test_a_missing_picture_is_seen(tmp_path):
    target = write_page(tmp_path / "p.html", page("t", section("s", figure("nowhere.png"), table([{"a": 1.0}], ["a"]))))
    seen = view(target)
    assert seen.widths == [0] and seen.console_errors, "the browser check must catch a broken image"
