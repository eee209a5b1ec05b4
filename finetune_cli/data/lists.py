"""List files: a text file naming one image (path or URI) per line, accepted wherever inputs are.

`predict`, `extract-features` (both engines) and `explain` read them the same
way: blank lines and lines starting with "#" are skipped, a relative path is
relative to the list file's folder, and a URI (`scheme://...`) is kept as is
(only the Ray engine reads URIs).
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.errors import FolderError
from finetune_cli.files import shown

#: Endings that make a local file a list file rather than an image.
LIST_SUFFIXES = (".txt", ".lst", ".list")


def is_uri(text: str) -> bool:
    """True for `scheme://...` (a location pyarrow's file systems read)."""
    return "://" in str(text)


def expand_lists(inputs) -> list[str]:
    """Inputs with each local list file replaced by its lines, in order.

    Raises:
        FolderError: a list file cannot be read.
    """
    expanded = []
    for entry in map(str, inputs):
        path = Path(entry).expanduser()
        if is_uri(entry) or not (path.is_file() and path.suffix.lower() in LIST_SUFFIXES):
            expanded.append(entry)
            continue
        try:
            lines = [line.strip() for line in path.read_text("utf-8", "surrogateescape").splitlines()]
        except OSError as exc:
            raise FolderError(f"cannot read the list file {shown(entry)}: {exc.strerror or exc}") from None
        expanded += [line if is_uri(line) else str(path.parent / Path(line).expanduser())
                     for line in lines if line and not line.startswith("#")]
    return expanded
