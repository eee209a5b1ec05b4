"""Self-contained HTML pages: the run report and the galleries of `explain`, `filters`, `patches`, `audit`, `attack`.

One stylesheet, no JavaScript, no network: images are either inlined as
data URIs (`bytes`) or referenced by a path relative to the page (`str`).
Pages read on a phone-width screen (a fluid grid, images never wider than
the screen). Every piece of text is HTML-escaped here, so callers pass
plain strings.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from finetune_cli.errors import OutputError
from finetune_cli.files import atomic_write_bytes

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:72rem;
padding:1rem;line-height:1.45;color:#1b1b1b;background:#fff}
h1{font-size:1.5rem;margin:.2rem 0 .8rem}h2{font-size:1.2rem;margin:1.6rem 0 .6rem;border-bottom:1px solid #ddd}
p.note{color:#555;margin:.3rem 0}
img{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.7rem}
figure{margin:0;padding:.35rem;border:1px solid #ddd;border-radius:6px;background:#fafafa}
figure.flag{border:2px solid #c62828;background:#fff5f5}
figure img{display:block;width:100%;image-rendering:auto}
figcaption{font-size:.8rem;word-break:break-word;margin-top:.25rem}
.wide img{width:100%;max-width:44rem}
table{border-collapse:collapse;font-size:.9rem;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.85rem}
"""


@dataclass(frozen=True)
class Tile:
    """One picture of a gallery.

    Attributes:
        src: PNG/JPEG bytes (inlined) or a path relative to the page.
        caption: plain text under the picture (may hold newlines).
        flagged: drawn with a red frame (misclassified, suspect...).
    """

    src: bytes | str
    caption: str = ""
    flagged: bool = False


def image_src(src: bytes | str) -> str:
    """An <img> src: a data URI for bytes (PNG, JPEG or GIF sniffed), else the escaped relative path."""
    if isinstance(src, str):
        return html.escape(src, quote=True)
    kind = "jpeg" if src[:3] == b"\xff\xd8\xff" else "gif" if src[:4] == b"GIF8" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(src).decode('ascii')}"


def tiles(items: Iterable[Tile]) -> str:
    """A responsive grid of captioned pictures."""
    cells = []
    for tile in items:
        caption = "<br>".join(html.escape(line) for line in tile.caption.splitlines())
        alt = html.escape(tile.caption.splitlines()[0] if tile.caption else "image", quote=True)
        flag = ' class="flag"' if tile.flagged else ""
        cells.append(f'<figure{flag}><img src="{image_src(tile.src)}" '
                     f'alt="{alt}" loading="eager"><figcaption>{caption}</figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def figure(src: bytes | str, caption: str = "") -> str:
    """One wide picture (a plot) with an optional caption."""
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="wide"><img src="{image_src(src)}" alt="{html.escape(caption or "plot", quote=True)}">' \
           f"{text}</figure>"


def table(rows: Sequence[dict], columns: Sequence[str], digits: int = 3) -> str:
    """An HTML table of `rows` (dicts) in `columns` order; floats rounded to `digits`."""
    def cell(value) -> str:
        return html.escape(f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str, notes: Sequence[str] = ()) -> str:
    """An <h2> section: escaped notes as paragraphs, then the (already HTML) parts."""
    text = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return f"<section><h2>{html.escape(title)}</h2>{text}{''.join(parts)}</section>"


def preformatted(text: str) -> str:
    """Text shown as is (a recipe, a JSON excerpt)."""
    return f"<pre>{html.escape(text)}</pre>"


def page(title: str, *sections: str, notes: Sequence[str] = ()) -> str:
    """A whole HTML document: viewport meta, the stylesheet, the title, notes, sections."""
    text = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{text}{''.join(sections)}</body></html>\n")


def write_page(path: Path, document: str) -> Path:
    """Write an HTML document atomically (an old page stays whole until the rename).

    Raises:
        OutputError: the page cannot be written (a folder in the way, read-only, disk full).
    """
    try:
        atomic_write_bytes(Path(path), document.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; nothing was replaced") from None
    return Path(path)


def write_gallery(path: Path, title: str, groups: Sequence[tuple[str, Sequence[Tile]]],
                  notes: Sequence[str] = ()) -> Path:
    """An `index.html`-style gallery: one titled grid per group, in the order given."""
    return write_page(path, page(title, *(section(name, tiles(items)) for name, items in groups), notes=notes))
