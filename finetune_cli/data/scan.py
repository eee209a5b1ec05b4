"""Folder scan: which files are usable images, with which label. No TensorFlow.

Rules (documented in the README, tested in tests/test_scan.py):

- Labelled folders are class-per-subfolder: `ROOT/<class>/.../<image>`. Nested
  folders inside a class are merged into that class.
- Image files loose in ROOT beside class folders are refused (their label is
  ambiguous); other loose files (README.txt, labels.csv) are ignored.
- A class folder with no files at all is ignored with a warning naming it; a
  class with files but fewer than `min_per_class` usable images is refused.
- Hidden names (`.DS_Store`, `._photo.jpg`, `.ipynb_checkpoints/`, any name
  starting with a dot) and `Thumbs.db`, `desktop.ini`, `__MACOSX/` are ignored
  and never counted or reported.
- Links to files are followed. Links to folders are followed only when the
  link is a class folder itself; inside a class they are not (no cycles).
- Only regular files (or links to them) are read: FIFOs, devices and sockets
  are skipped with a reason, and so is a file larger than `ScanConfig.max_bytes`.
- Every other file is decoded by content, never by its name, and is either
  kept or skipped with a reason.
- The tool's own output is never data: a folder holding `OUTPUT_MARKER` (every
  run, gallery and export folder, and the default `runs/`) is skipped with a
  warning, wherever it sits; so is a run folder of an older version (one that
  holds model.keras beside labels.json).
- File names need not be UTF-8 (old archives hold Latin-1 bytes); they are
  shown with \\xNN escapes (`files.shown`). Class folder names must be UTF-8,
  since they are saved with the model.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from finetune_cli.config import IGNORED_NAMES, IMAGE_SUFFIXES, OUTPUT_MARKER, SCAN, ScanConfig
from finetune_cli.data import tables
from finetune_cli.data.images import DECODE_ERRORS, UnusableImage, open_checked, read_image_file
from finetune_cli.errors import FolderError, OutputError
from finetune_cli.files import shown

#: progress(done, total): called from the calling thread as files finish.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRecord:
    """One usable image.

    Attributes:
        path: relative to the scanned root, forward slashes.
        label: class folder name; "" for an unlabeled folder.
        digest: 32-hex-digit BLAKE2b hash of the file's bytes.
        width, height: stored pixel size (before EXIF rotation).
        format: Pillow's format name (JPEG, PNG, WEBP, ...).
        mode: Pillow's mode before conversion (RGB, L, RGBA, P, CMYK, I;16, ...).
        n_bytes: file size.
    """

    path: str
    label: str
    digest: str
    width: int
    height: int
    format: str
    mode: str
    n_bytes: int


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why (`reason` is one line for the user)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """The result of scanning a folder: plain data, no pixels.

    Attributes:
        root: the scanned folder (absolute).
        labelled: True for class-per-subfolder, False for a flat/unlabeled one.
        classes: class names in natural order ('2' before '10'); () if unlabeled.
            This order is the label index order saved with every model.
        images: usable images, sorted by path.
        skipped: files that could not be used, with reasons.
        warnings: folder-level warnings (empty class folders, ...).
        source: the label table the scan was read from (`scan_table`); None for a folder.
        multi_label: read from a table where some image carries several labels: a record's `label` is then
            its labels joined by `separator` (sorted), and `classes` the labels (`label_sets`, `label_matrix`).
    """

    root: Path
    labelled: bool
    classes: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    skipped: tuple[Skipped, ...]
    warnings: tuple[str, ...] = field(default=())
    source: Path | None = None
    multi_label: bool = False
    separator: str = ";"

    def paths(self) -> list[Path]:
        """Absolute paths of the usable images, in `images` order."""
        return [self.root / r.path for r in self.images]

    def label_indices(self) -> list[int]:
        """Index into `classes` of each usable image (labelled scans only)."""
        index = {name: i for i, name in enumerate(self.classes)}
        return [index[r.label] for r in self.images]

    def label_set(self, label: str) -> tuple[str, ...]:
        """The labels a record's `label` names: its parts for a multi-label scan, else just it."""
        return tuple(label.split(self.separator)) if self.multi_label and self.separator else (label,)

    def label_matrix(self, records=None, classes=None) -> np.ndarray:
        """Multi-hot labels (n, L) float32 of `records` (default: `images`) over `classes` (default: this
        scan's); a label not among `classes` is left out."""
        classes = list(self.classes if classes is None else classes)
        index = {name: i for i, name in enumerate(classes)}
        records = self.images if records is None else records
        matrix = np.zeros((len(records), len(classes)), np.float32)
        for row, record in enumerate(records):
            for name in self.label_set(record.label):
                if name in index:
                    matrix[row, index[name]] = 1.0
        return matrix


def natural_key(name: str) -> list:
    """Sort key putting '2' before '10' and 'img9' before 'img10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_ignored(name: str) -> bool:
    """True for hidden files/folders and OS litter, which are never counted."""
    return name.startswith(".") or name in IGNORED_NAMES


def scan_folder(
    root: str | os.PathLike,
    *,
    labelled: bool | None = True,
    config: ScanConfig = SCAN,
    progress: Progress | None = None,
    for_training: bool = True,
    multi_label: bool = False,
) -> Scan:
    """Scan a folder for usable images.

    Args:
        root: the folder.
        labelled: True requires class subfolders; False takes every image
            under root unlabeled; None decides: class subfolders if any, else flat.
        config: pixel cap, background, thread count, per-class minimum.
        progress: optional callback, see `Progress`.
        for_training: True requires two classes and `min_per_class` images in
            each; False (evaluate, extract features) accepts one class and
            classes of one image.
        multi_label: accept a multi-label table (`scan_table`); False refuses one.

    Returns a `Scan`; a label table (`data.tables.is_table`) is read by `scan_table`.

    Raises:
        FolderError: missing folder, no class subfolders, loose root images, a class name that is not
            UTF-8, no usable images; for training also a single class or a class with too few usable images.
    """
    if tables.is_table(Path(root).expanduser()):
        return scan_table(root, labelled=labelled, config=config, progress=progress,
                          for_training=for_training, multi_label=multi_label)
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise FolderError(_not_a_folder(root))
    if is_output(root):
        raise FolderError(f"{root} is an output folder of finetune (a run, gallery or export), not images: "
                          "give the folder that holds your images")
    outputs: list[Path] = []
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not is_ignored(p.name) and not _skip_output(p, outputs)),
        key=lambda p: natural_key(p.name),
    )
    if labelled is None:
        labelled = bool(class_dirs)
    if not labelled:
        files = [(p, "") for p in walk_files(root, outputs)]
        return _finish(root, False, (), files, _output_notes(root, outputs), config, progress, for_training)

    check_layout(root, class_dirs)
    files, warnings, classes = [], [], []
    for class_dir in class_dirs:
        found = list(walk_files(class_dir, outputs))
        if not found:
            warnings.append(f"class folder '{class_dir.name}' is empty and was ignored")
            continue
        classes.append(_class_name(class_dir))
        files.extend((p, class_dir.name) for p in found)
    _check_class_count(root, classes, 2 if for_training else 1)
    warnings = _output_notes(root, outputs) + warnings
    return _finish(root, True, tuple(classes), files, warnings, config, progress, for_training)


def _not_a_folder(root: Path) -> str:
    options = tables.current()
    return (f"{root} is not a folder: give the folder that holds your images, or a label table "
            f"({', '.join(options.suffixes)}) with {options.path_column!r} and {options.label_column!r} columns")


def scan_table(table, *, labelled: bool | None = True, config: ScanConfig = SCAN, progress: Progress | None = None,
               for_training: bool = True, multi_label: bool = False) -> Scan:
    """`scan_folder` for a label table (`data.tables`): the same records, checks and skipped reasons, rooted
    at the table's folder, `source` the table. Classes are the labels in natural order (for a multi-label
    table, every label any image carries).

    Raises:
        FolderError: as `tables.read_rows`, and as `scan_folder` (too few classes or images); a multi-label
            table where `multi_label` is False.
    """
    rows = tables.read_rows(table, labelled)
    if rows.multi_label and not multi_label:
        example = next(label for _, label in rows.files if rows.separator in label)
        raise FolderError(f"{table} is multi-label (e.g. '{example}'): this command reads one label per image (train "
                          "and evaluate read several); or pass --label-separator '' to read each cell as one label")
    skipped = [Skipped(path, reason) for path, reason in rows.skipped]
    files, inside = _outside_outputs(rows.root, rows.files)
    skipped += [Skipped(shown(path.as_posix()), OUTPUT_ROW) for path in inside]
    if not files:
        example = f", e.g. '{shown(skipped[0].path)}': {skipped[0].reason}" if skipped else ""
        raise FolderError(f"{table} lists no usable image ({len(skipped)} rows skipped{example})")
    parts = {name for _, label in files for name in (label.split(rows.separator) if rows.multi_label else [label])}
    classes = sorted(parts, key=natural_key) if rows.labelled else []
    if rows.labelled and for_training and len(classes) < 2:
        raise FolderError(f"{table} has only one label ('{classes[0]}'): a classifier needs at least two")
    scan = _finish(rows.root, rows.labelled, tuple(classes), files, rows.warnings, config, progress,
                   for_training, skipped=skipped, multi=(rows.multi_label, rows.separator))
    return replace(scan, source=Path(table).expanduser().absolute())


#: A table row's skip reason when its image sits in the tool's own output.
OUTPUT_ROW = "it lies in finetune's own output (a run, gallery or export), never read as an image"


def _outside_outputs(root: Path, files: list) -> tuple[list, list[Path]]:
    """(files not in an output folder (`is_output`) between `root` and them, the paths of those that are)."""
    kept, inside, seen = [], [], {}

    def output(folder: Path) -> bool:  # each folder is asked once, however many rows sit in it
        if folder not in seen:
            seen[folder] = is_output(folder)
        return seen[folder]

    for path, label in files:
        under = path.is_relative_to(root)
        below = path.parents[:len(path.parents) - len(root.parents)] if under else path.parents
        if any(output(folder) for folder in below):
            inside.append(path.relative_to(root) if under else path)
        else:
            kept.append((path, label))
    return kept, inside


def is_output(folder: Path) -> bool:
    """True for a folder the tool wrote: it holds `OUTPUT_MARKER`, or it is an older run (model.keras + labels.json)."""
    try:
        return (folder / OUTPUT_MARKER).is_file() or ((folder / "model.keras").is_file()
                                                       and (folder / "labels.json").is_file())
    except OSError:
        return False


def _skip_output(folder: Path, outputs: list[Path]) -> bool:
    """True (and `folder` recorded in `outputs`) when `folder` is the tool's own output."""
    if is_output(folder):
        outputs.append(folder)
        return True
    return False


def _output_notes(root: Path, outputs: list[Path]) -> list[str]:
    """One warning per skipped output folder, relative to `root`."""
    return [f"skipped '{shown(p.relative_to(root).as_posix())}': it holds finetune's own output (a run, "
            "gallery or export), never read as images" for p in outputs]


def check_out_outside(out, root, option: str = "--out") -> None:
    """Refuse an output folder inside the data folder `root` (its files would be scanned as images next time).

    Raises:
        OutputError: `out` is `root` or lies under it.
    """
    if out is None:
        return
    out_path, root_path = Path(out).expanduser().resolve(), Path(root).expanduser().resolve()
    if out_path == root_path or root_path in out_path.parents:
        raise OutputError(f"{option} {out_path} is inside the data folder {root_path}: its files would be read as "
                          f"images by the next run; choose an {option} outside {root_path}")


def _class_name(class_dir: Path) -> str:
    """The folder's name as a class name, which must be text (it is saved with the model)."""
    try:
        class_dir.name.encode("utf-8")
    except UnicodeEncodeError:
        raise FolderError(
            f"class folder '{shown(class_dir.name)}' has a name that is not valid UTF-8: rename it "
            "(class names are saved with the model)"
        ) from None
    return class_dir.name


def check_layout(root: Path, class_dirs: list[Path]) -> None:
    """Refuse a labelled folder without class folders or with loose root images."""
    loose = [
        p.name
        for p in root.iterdir()
        if p.is_file() and not is_ignored(p.name) and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not class_dirs:
        hint = f" ({len(loose)} images sit directly in it)" if loose else ""
        raise FolderError(
            f"no class subfolders in {root}{hint}: put each class's images in a "
            f"subfolder named after the class, e.g. {root.name}/cat/1.jpg, {root.name}/dog/2.jpg"
        )
    if loose:
        raise FolderError(
            f"{len(loose)} image(s) sit in {root} beside the class folders "
            f"(e.g. '{sorted(loose)[0]}'): move them into a class folder or delete them"
        )


def _check_class_count(root: Path, classes: list[str], least: int) -> None:
    if not classes:
        raise FolderError(f"{root} has no class folder with files: put each class's images in a subfolder")
    if len(classes) < least:
        raise FolderError(
            f"{root} has fewer than two class folders (only '{classes[0]}'): a classifier "
            "needs at least two, one subfolder per class"
        )


def walk_files(top: Path, outputs: list[Path]) -> Iterable[Path]:
    """Every non-ignored file under `top`, in a stable order; folder links not followed.

    Folders of the tool's own output are not entered; they are appended to `outputs`.
    """
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d) and not _skip_output(Path(dirpath, d), outputs))
        for name in sorted(filenames):
            if not is_ignored(name):
                yield Path(dirpath, name)


def _finish(root, labelled, classes, files, warnings, config, progress, for_training=True, skipped=(),
            multi=(False, ";")) -> Scan:
    """Probe every file in parallel, then apply the per-class checks (`skipped`: files already refused)."""
    images, skipped = [], list(skipped)
    total = len(files)
    with ThreadPoolExecutor(max_workers=config.n_workers()) as pool:
        results = pool.map(lambda item: probe(root, item[0], item[1], config), files)
        for done, result in enumerate(results, 1):
            (images if isinstance(result, ImageRecord) else skipped).append(result)
            if progress:
                progress(done, total)
    images.sort(key=lambda r: natural_key(r.path))
    skipped.sort(key=lambda s: natural_key(s.path))
    scan = Scan(root, labelled, classes, tuple(images), tuple(skipped), tuple(warnings), None, *multi)
    _check_usable(scan, config, for_training)
    return scan


def probe(root: Path, path: Path, label: str, config: ScanConfig) -> ImageRecord | Skipped:
    """Read, hash and fully decode one file (truncation only shows on decode)."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    try:
        data = read_image_file(path, config.max_bytes)
    except UnusableImage as exc:
        return Skipped(rel, str(exc))
    except OSError as exc:
        return Skipped(rel, f"cannot read: {exc.strerror or exc}")
    try:
        image = open_checked(data, config.max_pixels)
        fmt, mode, (width, height) = image.format or "?", image.mode, image.size
        if fmt == "JPEG":
            # Decode at 1/8 scale: every coefficient is still entropy-decoded, so a
            # truncated or corrupt file fails as it would at full size, ~5x sooner.
            image.draft(mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
    except UnusableImage as exc:
        return Skipped(rel, str(exc))
    except DECODE_ERRORS as exc:
        return Skipped(rel, f"corrupt or truncated image: {exc}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return ImageRecord(rel, label, digest, width, height, fmt, mode, len(data))


def _check_usable(scan: Scan, config: ScanConfig, for_training: bool = True) -> None:
    """Refuse a scan with no usable image, or (for training) a class below the per-class minimum."""
    if not scan.images:
        example = f", e.g. '{shown(scan.skipped[0].path)}': {scan.skipped[0].reason}" if scan.skipped else ""
        raise FolderError(
            f"no usable images in {scan.root} ({len(scan.skipped)} files skipped{example})"
        )
    if not scan.labelled or not for_training:
        return
    counts = dict(zip(scan.classes, scan.label_matrix().sum(0).astype(int).tolist()))
    short = [f"'{n}' ({c})" for n, c in counts.items() if c < config.min_per_class]
    if short:
        raise FolderError(
            f"class(es) {', '.join(short)} have fewer than {config.min_per_class} usable "
            "images: add images to them or remove those folders"
        )
    everywhere = [name for name, c in counts.items() if c == len(scan.images)]
    if scan.multi_label and everywhere:
        raise FolderError(f"label '{everywhere[0]}' is on every usable image ({len(scan.images)}): it tells the "
                          "images apart from nothing; drop it from the table, or add images without it")
