"""Label tables: a CSV, TSV or Parquet file with one row per image (`path`, `label` by default), read
wherever a class-per-subfolder folder is (`data.scan.scan_folder` hands a table path here).

The rows obey the folder scan's guarantees, checked here before any pixel is read:
- a relative path resolves against the table's folder; a row whose image lies outside that folder
  (through `..`, an absolute path or a link) is refused, naming the row, unless `allow_outside`;
- a row with no path, a label holding "/" or a URI is a one-line error naming the row; a table that cannot
  be parsed is one naming the line the parser stopped at;
- a row with an empty label is skipped with its reason (the run's skipped.csv); so are a row inside the
  tool's own output (`data.scan.is_output`, applied by `scan_table`) and a missing or unreadable file (the
  scan's own probe);
- a path listed twice is counted once; listed with two labels, it is skipped with both named;
- a label cell holding the separator (`TableConfig.separator`, `;` by default: `cat;outdoor`) gives the image
  several labels: the table is multi-label (`Rows.multi_label`); the cell is normalised (parts stripped, empty
  parts dropped, repeats merged, sorted, joined by the separator), so `outdoor; cat` and `cat;outdoor` agree.

Which table options apply: `TABLE` (config.py), or those set with `using(...)` around a call (the
command line's --path-column, --label-column and --allow-outside do this).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace
from pathlib import Path

from finetune_cli.config import TABLE, TableConfig
from finetune_cli.errors import FolderError
from finetune_cli.files import shown

_CURRENT: contextvars.ContextVar[TableConfig] = contextvars.ContextVar("table_options", default=TABLE)


@contextlib.contextmanager
def using(options: TableConfig):
    """Read label tables with `options` inside the block (this thread and the tasks it starts)."""
    token = _CURRENT.set(options)
    try:
        yield options
    finally:
        _CURRENT.reset(token)


def current() -> TableConfig:
    """The table options in force (`using`), else `config.TABLE`."""
    return _CURRENT.get()


def is_table(path) -> bool:
    """True for an existing file whose ending (`TableConfig.suffixes`) makes it a label table."""
    path = Path(path)
    return path.suffix.lower() in current().suffixes and path.is_file()


@dataclass(frozen=True)
class Rows:
    """A table's usable rows, before any image is read.

    Attributes:
        root: the table's folder (absolute); records' paths are relative to it (absolute when outside).
        files: (absolute image path, label) per distinct image, in table order; label "" when unlabelled.
        skipped: (path as written, reason) per row not used.
        warnings: table-level notes (repeated rows, conflicting labels).
        labelled: whether the labels were read.
        multi_label: some image carries several labels (its label: the sorted parts joined by `separator`).
        separator: what joins an image's labels.
    """

    root: Path
    files: list[tuple[Path, str]]
    skipped: list[tuple[str, str]]
    warnings: list[str]
    labelled: bool = True
    multi_label: bool = False
    separator: str = ";"


def read_rows(table, labelled: bool | None = True, options: TableConfig | None = None) -> Rows:
    """The rows of `table` (see the module docstring); `labelled` None: labelled if it has the label column.

    Raises:
        FolderError: unreadable or malformed table, a missing column, a row with no path, a URI, a label
            with "/", or (without `allow_outside`) a row outside the table's folder.
    """
    options = options or current()
    table = Path(table).expanduser().absolute()
    frame = _frame(table)
    if labelled is None:
        labelled = options.label_column in frame.columns
    needed = [options.path_column] + ([options.label_column] if labelled else [])
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise FolderError(f"{table} has no column {', '.join(repr(m) for m in missing)} (its columns: "
                          f"{', '.join(map(str, frame.columns))}): name them with --path-column / --label-column")
    paths = frame[options.path_column].tolist()
    labels = frame[options.label_column].tolist() if labelled else [""] * len(paths)
    return _resolve(table, paths, labels, options, labelled)


def _frame(table: Path):
    """The table as strings ("" for empty cells). Raises FolderError naming what could not be parsed."""
    import pandas as pd

    try:
        if table.suffix.lower() == ".parquet":
            frame = pd.read_parquet(table)
        else:
            frame = pd.read_csv(table, dtype=str, keep_default_na=False, encoding="utf-8",
                                sep="\t" if table.suffix.lower() == ".tsv" else ",")
    except UnicodeDecodeError:
        raise FolderError(f"{table} is not UTF-8 text: save the table as UTF-8 CSV") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:  # ParserError names the line it stopped at
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FolderError(f"{table} is not a readable table: {first}: fix the table") from None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame.astype(object).where(frame.notna(), "").astype(str)


def _resolve(table: Path, paths: list, labels: list, options: TableConfig, labelled: bool) -> Rows:
    """Rows -> Rows: each path resolved and checked (module docstring), repeats merged."""
    root, seen, skipped = table.parent, {}, []
    for row, (text, label) in enumerate(zip(paths, labels), start=1):
        where = f"{table.name} row {row} (line {row + 1})"
        text, label = text.strip(), normalised(label, options.separator)
        if not text:
            raise FolderError(f"{where} has no {options.path_column!r}: give each row the image's path")
        if "://" in text:
            raise FolderError(f"{where} is a URI ({shown(text)}): a label table lists local files")
        if "/" in label or "\\" in label:
            raise FolderError(f"{where}: label {label!r} holds a slash; class names are saved as names: rename it")
        path = (root / Path(text).expanduser()).absolute()
        _check_inside(path, root, where, text, options.allow_outside)
        if labelled and not label:
            skipped.append((text, f"no label in {where}"))
        else:
            seen.setdefault(path, []).append((text, label))
    rows = _merged(root, seen, skipped, labelled)
    several = bool(options.separator) and any(options.separator in label for _, label in rows.files)
    return replace(rows, multi_label=several, separator=options.separator)


def normalised(cell: str, separator: str) -> str:
    """A label cell as one label, or (holding `separator`) its distinct stripped non-empty parts, sorted and
    joined by `separator`: "outdoor; cat;" -> "cat;outdoor". "" stays "" (no label)."""
    if not separator or separator not in cell:
        return cell.strip()
    return separator.join(sorted({part.strip() for part in cell.split(separator)} - {""}))


def _check_inside(path: Path, root: Path, where: str, text: str, allow: bool) -> None:
    """Refuse `path` when it (links followed) lies outside `root`, unless `allow`."""
    if allow:
        return
    real, real_root = path.resolve(), root.resolve()
    if real != real_root and real_root not in real.parents:
        raise FolderError(f"{where}: {shown(text)} lies outside the table's folder {real_root}: move the image "
                          "under it, or pass --allow-outside to read it where it is")


def _merged(root: Path, seen: dict, skipped: list, labelled: bool) -> Rows:
    """One file per distinct path: repeats with one label counted once, two labels skipped (both named)."""
    files, warnings, repeats = [], [], 0
    for path, listed in seen.items():
        labels = sorted({label for _, label in listed})
        if len(labels) > 1:
            skipped.append((listed[0][0], f"listed with {len(labels)} labels ({', '.join(labels)}): keep one row"))
            continue
        repeats += len(listed) - 1
        files.append((path, labels[0]))
    conflicts = sum(reason.startswith("listed with") for _, reason in skipped)
    if repeats:
        warnings.append(f"{repeats} row(s) repeat an image already listed with the same label: each counted once")
    if conflicts:
        warnings.append(f"{conflicts} image(s) are listed with two or more labels and were skipped "
                        "(skipped.csv names them)")
    return Rows(root, files, skipped, warnings, labelled)
