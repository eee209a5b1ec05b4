"""The images a command is pointed at: files, folders and list files to predict on (`collect`), a labelled
folder whose classes a model must know (`labelled_test_scan`), and decoded pixels for the commands that
work on pixels (`scan_inputs`, `decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.lists import expand_lists, is_uri
from finetune_cli.data.tables import is_table
from finetune_cli.data.scan import ImageRecord, Scan, Skipped, probe, scan_folder
from finetune_cli.errors import FolderError
from finetune_cli.files import shown


def collect(inputs, config: ScanConfig = SCAN) -> Scan:
    """Files, folders and list files (`data.lists`) to predict on, as one unlabeled scan rooted at "/".

    A folder with no usable image is skipped with its reason, like a bad
    file; only when no input holds a usable image is it an error.

    Raises:
        FolderError: an input does not exist, or nothing usable was found.
    """
    records, skipped = [], []
    entries = expand_lists(inputs)
    remote = [e for e in entries if is_uri(e)]
    if remote:
        raise FolderError(f"{remote[0]} is a URI: the local engine reads local files; use --engine ray for URIs")
    paths = [Path(p).expanduser().absolute() for p in entries]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FolderError(f"not found: {', '.join(missing)}")
    for path in paths:
        if path.is_dir():
            try:
                scan = scan_folder(path, labelled=False, config=config, for_training=False)
            except FolderError as exc:
                skipped.append(Skipped(str(path), str(exc)))
                continue
            records += [replace(r, path=str(path / r.path)) for r in scan.images]
            skipped += [Skipped(str(path / s.path), s.reason) for s in scan.skipped]
        else:
            result = probe(path.parent, path, "", config)
            if isinstance(result, ImageRecord):
                records.append(replace(result, path=str(path)))
            else:
                skipped.append(Skipped(str(path), result.reason))
    if not records:
        first = f" ({shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        raise FolderError("no usable images among the inputs" + first)
    return Scan(Path("/"), False, (), tuple(records), tuple(skipped))


def labelled_test_scan(root, classes: list[str], config: ScanConfig = SCAN, multi_label: bool = False) -> Scan:
    """Scan a labelled test folder whose classes the model must know (one class is enough).

    `multi_label`: the model is multi-label, and a multi-label table is read (else refused).

    Raises:
        FolderError: the folder is unusable or holds a class unknown to the model.
    """
    scan = scan_folder(root, labelled=True, config=config, for_training=False, multi_label=multi_label)
    unknown = [c for c in scan.classes if c not in classes]
    if unknown:
        raise FolderError(f"class folder(s) {', '.join(unknown)} unknown to the model, which knows: {', '.join(classes)}")
    return scan


@dataclass(frozen=True)
class Decoded:
    """Images ready for a model: pixels (n, S, S, 3) float32 in [0, 255], labels (n,) class index or -1,
    the scan records they came from, and the files skipped (unreadable, with reasons)."""

    pixels: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: list[Skipped]


def scan_inputs(inputs, classes: list[str], config: ScanConfig = SCAN) -> Scan:
    """One folder whose subfolders are all class names of the run, or one label table: a labelled scan; anything else:
    an unlabeled scan of the files and folders (`collect`, bad files skipped with reasons).

    Raises:
        FolderError: an input is missing, or nothing usable was found.
    """
    if len(inputs) == 1 and is_table(inputs[0]):
        return labelled_test_scan(inputs[0], classes, config)
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        subfolders = [p.name for p in Path(inputs[0]).iterdir() if p.is_dir() and not p.name.startswith(".")]
        if subfolders and all(name in classes for name in subfolders):
            return labelled_test_scan(inputs[0], classes, config)
    return collect(inputs, config)


def decode(scan: Scan, classes: list[str], size: int, config: ScanConfig = SCAN) -> Decoded:
    """Decode `scan`'s images at `size` (the pipeline every command uses); a file unreadable now is skipped.

    Raises:
        FolderError: no image could be read.
    """
    from finetune_cli.data.pipeline import decoded_arrays

    pixels, ok = decoded_arrays(scan.paths(), size, config)
    labels = np.array([classes.index(r.label) if scan.labelled else -1 for r in scan.images], np.int64)
    paths = [str(p) for p in scan.paths()]
    late = [Skipped(p, "could not be read") for p, good in zip(paths, ok) if not good]
    if not ok.any():
        raise FolderError("none of the images could be read")
    return Decoded(pixels[ok], labels[ok], [p for p, good in zip(paths, ok) if good], list(scan.skipped) + late)
