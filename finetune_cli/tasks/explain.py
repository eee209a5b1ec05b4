"""`finetune explain`: heat maps of a run's decisions over images, a gallery, and the sanity check.

Steps: load the run -> scan the images (a labelled folder keeps its labels)
-> decode -> predict -> maps of the target class (`saliency`) -> optional
randomised-head check -> overlay PNGs + index.html + explain.json, written
into a staging folder and moved into --out only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from finetune_cli.analysis import saliency
from finetune_cli.config import EXPLAIN, SCAN, ExplainConfig, ScanConfig
from finetune_cli.data.inputs import Decoded, decode, scan_inputs
from finetune_cli.data.scan import Scan, Skipped
from finetune_cli.errors import FolderError, SettingsError
from finetune_cli.files import output_folder, shown, writing
from finetune_cli.pages.figures import overlay_png
from finetune_cli.pages.html import Tile, write_gallery
from finetune_cli.runs.run import Run


def class_index(name: str | None, classes: list[str]) -> int | None:
    """The index of --class `name` among the run's classes (None: each image's predicted class).

    Raises:
        SettingsError: a name the run does not know.
    """
    if name is None:
        return None
    if name not in classes:
        raise SettingsError(f"--class {name!r} is not one of the run's classes: {', '.join(classes)}")
    return classes.index(name)


#: What `explain` writes into its folder (all that --overwrite replaces there).
OUTPUTS = ("maps", "index.html", "explain.json")


def explain(run, images, *, method: str = "occlusion", class_name: str | None = None, sanity: bool = False,
            out=None, overwrite: bool = False, config: ExplainConfig = EXPLAIN, scan_config: ScanConfig = SCAN) -> dict:
    """Heat maps of a run's decisions (occlusion or Grad-CAM) over image files or a folder, with a gallery.

    Args:
        run: a run folder, its model.keras, or `last`.
        images: files and folders; one folder of the run's class subfolders is read as labelled
            (misclassified images first in the gallery).
        class_name: map this class instead of each image's predicted one.
        sanity: also map with the head randomised; a map that barely changes is flagged.
        out: the folder for maps/, index.html, explain.json; None: a new `runs/<run>-explain-<N>`.
        overwrite: replace an earlier gallery in `out` as a whole (refused without it when `out` holds files).

        config, scan_config: `config.ExplainConfig` and the scan's settings.

    The gallery is built in a staging folder inside `out` and moved in place when complete: a failure,
    Ctrl-C or SIGTERM leaves no partial maps (and no `out` this call created).

    Returns:
        {"out", "page", "method", "target", "images": [{path, map, predicted, probability, label,
        correct, target, rho, flagged}], "skipped": [{path, reason}], "flagged": count}.

    Raises:
        ModelFileError, FolderError, SettingsError (method, --class), OutputError.
    """
    if method not in saliency.METHODS:
        raise SettingsError(f"--method must be one of {', '.join(saliency.METHODS)}. Received: method={method!r}")
    run = Run.load(run)
    fixed = class_index(class_name, run.classes)
    scan = scan_inputs(list(images), run.classes, scan_config)
    target = output_folder(out, f"{run.path.name}-explain", command="explain", owned=OUTPUTS, overwrite=overwrite)
    with target.staged() as staging:
        rows, skipped = _explain_all(run, scan, fixed, method, sanity, staging, config, scan_config)
        _write_page(staging, rows, method, run, sanity, config)
        summary = {"out": str(target.path), "page": str(target.path / "index.html"), "method": method,
                   "target": class_name or "predicted", "images": rows,
                   "skipped": [{"path": shown(s.path), "reason": s.reason} for s in skipped],
                   "flagged": sum(bool(r["flagged"]) for r in rows)}
        with writing(staging / "explain.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False), "utf-8")
    return summary


def _explain_all(run: Run, scan: Scan, fixed: int | None, method: str, sanity: bool, folder: Path,
                 config: ExplainConfig, scan_config: ScanConfig) -> tuple[list[dict], list[Skipped]]:
    """(rows, skipped files): the maps of every image, a chunk at a time in memory, written under folder/maps.

    Raises:
        FolderError: none of the images could be read.
    """
    rows, skipped = [], list(scan.skipped)
    for start in range(0, len(scan.images), config.chunk):
        part = dataclasses.replace(scan, images=scan.images[start:start + config.chunk], skipped=())
        try:
            images = decode(part, run.classes, run.image_size, scan_config)
        except FolderError:  # none of this chunk could be read now
            skipped += [Skipped(str(path), "could not be read") for path in part.paths()]
            continue
        rows += _explain_chunk(run, images, fixed, method, sanity, folder, len(rows), config)
        skipped += images.skipped
    if not rows:
        raise FolderError("none of the images could be read")
    return rows, skipped


def _explain_chunk(run: Run, images: Decoded, fixed: int | None, method: str, sanity: bool, folder: Path,
                   first: int, config: ExplainConfig) -> list[dict]:
    """Maps of one chunk of decoded images, written under folder/maps; their rows (numbered from `first`)."""
    probs = np.concatenate([saliency.call(run.model, images.pixels[s:s + config.batch_size]).numpy()
                            for s in range(0, len(images.pixels), config.batch_size)])
    targets = np.full(len(probs), fixed) if fixed is not None else probs.argmax(1)
    maps = saliency.heat_maps(run.model, images.pixels, targets, method, config)
    checks = saliency.sanity(run.model, images.pixels, targets, maps, method, config) if sanity else None
    rows = _rows(images, probs, targets, checks, run.classes, first)
    _write_maps(folder, images, maps, rows, config)
    return rows


def _rows(images: Decoded, probs: np.ndarray, targets: np.ndarray, checks, classes: list[str],
          first: int = 0) -> list[dict]:
    rows = []
    for i, path in enumerate(images.paths):
        label = int(images.labels[i])
        rows.append({
            "path": shown(path), "map": f"maps/{first + i:04d}-{_safe_stem(path)}.png",
            "predicted": classes[int(probs[i].argmax())], "probability": round(float(probs[i].max()), 4),
            "label": classes[label] if label >= 0 else None,
            "correct": None if label < 0 else bool(probs[i].argmax() == label),
            "target": classes[int(targets[i])],
            "rho": None if checks is None or np.isnan(checks[i].rho) else round(checks[i].rho, 3),
            "flagged": None if checks is None else checks[i].flagged,
        })
    return rows


def _safe_stem(path: str) -> str:
    """A file name's stem usable in a relative URL: runs of other characters than letters, digits, . - _
    (spaces, #, ?, bytes that are not UTF-8) become one _; at most 40 characters."""
    return re.sub(r"[^\w.-]+", "_", Path(path).stem)[:40]


def _write_maps(folder: Path, images: Decoded, maps: np.ndarray, rows: list[dict], config: ExplainConfig) -> None:
    (folder / "maps").mkdir(exist_ok=True)
    for image, heat, row in zip(images.pixels, maps, rows):
        with writing(folder / row["map"]) as tmp:
            tmp.write_bytes(overlay_png(image, heat, config))


def _write_page(folder: Path, rows: list[dict], method: str, run: Run, checked: bool, config: ExplainConfig) -> Path:
    def tile(row: dict) -> Tile:
        lines = [Path(row["path"]).name, f"predicted {row['predicted']} ({row['probability']:.0%})",
                 f"map of: {row['target']}"]
        if row["label"] is not None:
            lines.insert(1, f"label {row['label']}")
        if checked:
            rho = "n/a (flat map)" if row["rho"] is None else f"{row['rho']:.2f}"
            lines.append(f"randomised head: rho {rho}" + (" - NOT explaining the model" if row["flagged"] else ""))
        return Tile(row["map"], "\n".join(lines), bool(row["flagged"]) or row["correct"] is False)

    wrong = [r for r in rows if r["correct"] is False]
    right = [r for r in rows if r["correct"] is not False]
    groups = ([("misclassified", [tile(r) for r in wrong])] if wrong else []) + \
             [("correct" if wrong or any(r["correct"] for r in rows) else "images", [tile(r) for r in right])]
    notes = [f"{method} maps of run {run.path.name}; red frame: misclassified"
             + (f", or a map that barely changes when the head is randomised (rho > {config.sanity_threshold})"
                if checked else "")]
    return write_gallery(folder / "index.html", f"finetune explain: {method}", [g for g in groups if g[1]], notes)
