"""`finetune suggest`: which unlabeled images to label next, ranked on cached features.

Steps, each a plain value to the next:

    scan       DIR (labelled) and RAW (--unlabeled; class subfolders or flat: any labels there are ignored);
               RAW images whose content is also in DIR are left out                -> two Scans
    features   final-stage features, average pooled, from the feature cache       -> (n, d), (m, d)
    head       the linear head `train` fits (`train.linear.fit_linear`, C by cross-validation, classes
               weighted when imbalanced 3x or more) on DIR                         -> probabilities (m, k)
    choose     `analysis.acquisition.choose`: cluster-margin by default, or badge, margin, random
    write      suggest.csv (rank, path, score, predicted, probability, margin, why), index.html (the
               images), and with --copy-to the images copied into a folder to label
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np

from finetune_cli.analysis.acquisition import METHODS, choose, margins
from finetune_cli.analysis.units import png_bytes
from finetune_cli.config import FEATURES, REPORT, SCAN, SUGGEST, ScanConfig, SuggestConfig
from finetune_cli.data.scan import Scan, scan_folder
from finetune_cli.errors import FolderError, ModelFileError, OutputError, SettingsError
from finetune_cli.features import FeatureCache, extract
from finetune_cli.files import output_folder, shown, writing
from finetune_cli.models.backbones import resolve
from finetune_cli.pages.html import Tile, page, section, tiles, write_page
from finetune_cli.runs.report_page import thumbnail
from finetune_cli.runs.run import Run, resolve_run
from finetune_cli.train.linear import folder_head

COLUMNS = ("rank", "path", "score", "predicted", "probability", "margin", "why")
FILES = {"csv": "suggest.csv", "html": "index.html"}
OUTPUTS = tuple(FILES.values())


def suggest(root, base: str | None = None, *, unlabeled, n: int = SUGGEST.n, method: str = SUGGEST.method,
            model=None, out=None, overwrite: bool = False, copy_to=None, weights: str = "imagenet",
            image_size: int | None = None, batch_size: int = FEATURES.batch_size, cache_dir=None,
            use_cache: bool = True, seed: int = 0, config: ScanConfig = SCAN, settings: SuggestConfig = SUGGEST,
            progress=None) -> dict:
    """Rank RAW's images by how much labelling them should help a linear head on DIR (method: module docstring).

    Args:
        base: the backbone whose features are ranked on; None with `model`: the run's base, weights and size.
        n: images to suggest (>= 1; fewer when RAW holds fewer). method: one of `analysis.acquisition.METHODS`.
        out: the folder for suggest.csv and index.html; None: a new `runs/<RAW name>-suggest-N`.
        copy_to: also copy the suggested images into this folder (new, or empty), to label.

    Returns (the `suggest --json` contract):
        {"folder", "unlabeled", "base", "method", "n_labelled", "n_pool", "n_left_out" (RAW images also in DIR),
         "suggestions": [{"rank", "path", "score" (0-1, higher picked for a stronger reason), "predicted",
         "probability", "margin", "why"}], "skipped": [{"path", "reason"}], "files": {"csv", "html"},
         "copied_to": folder or None}.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, ModelFileError, SettingsError, OutputError.
    """
    checked_request(n, method, copy_to)
    ref = resolve(*run_base(model, base, weights, image_size))
    labelled = scan_folder(root, labelled=True, config=config)
    pool = scan_folder(unlabeled, labelled=None, config=config, for_training=False)
    target = output_folder(out, f"{Path(unlabeled).resolve().name}-suggest", command="suggest", owned=OUTPUTS,
                           overwrite=overwrite)
    with target.staged() as staging:
        summary, sources = ranked(root, unlabeled, labelled, pool, ref, n, method, seed, batch_size, cache_dir,
                                  use_cache, config, progress)
        write_outputs(staging, summary, settings)
        summary["files"] = {kind: str(target.path / name) for kind, name in FILES.items()}
    summary["copied_to"] = copied(summary, sources, copy_to) if copy_to is not None else None
    return summary


def checked_request(n: int, method: str, copy_to) -> None:
    """Refuse, before any work, a count below 1, an unknown method, or a --copy-to folder that holds files."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SettingsError(f"--n must be a whole number of images, 1 or more; got {n!r}")
    if method not in METHODS:
        raise SettingsError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if copy_to is not None:
        folder = Path(copy_to).expanduser()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise OutputError(f"--copy-to {folder} already holds files: give a new or empty folder, so that "
                              "the images to label are not mixed with others")


def run_base(model, base: str | None, weights: str, image_size: int | None) -> tuple[str, str, int | None]:
    """(base, weights, image size) to rank with: `base`'s, or with --model the run's plan.json's."""
    if model is None:
        if base is None:
            raise SettingsError("suggest needs --base (a backbone) or --model RUN (a run to take it from)")
        return base, weights, image_size
    plan = Run.load(resolve_run(model)).plan
    if not plan or "base" not in plan:
        raise ModelFileError(f"{model}: the run has no plan.json naming its base; give --base instead")
    return plan["base"], plan.get("weights", "imagenet"), plan.get("image_size")


def ranked(root, unlabeled, labelled: Scan, pool: Scan, ref, n: int, method: str, seed: int, batch_size: int,
           cache_dir, use_cache: bool, config: ScanConfig, progress) -> dict:
    """(the summary (see `suggest`), "files" empty; the suggested images' paths): features of both folders, the
    head, the choice."""
    known = {r.digest for r in labelled.images}
    left_out = [r for r in pool.images if r.digest in known]
    pool = Scan(pool.root, False, pool.classes, tuple(r for r in pool.images if r.digest not in known), pool.skipped)
    if not pool.images:
        raise FolderError(f"{unlabeled}: no unlabeled images to rank ({len(left_out)} are already in {root}); "
                          "give --unlabeled a folder of images you have not labelled")
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    known_table, labels, head, _ = folder_head(labelled, ref, cache=cache, batch_size=batch_size, config=config,
                                               seed=seed, progress=progress)
    tables = [known_table, extract(pool, ref, pooling=FEATURES.pooling, batch_size=batch_size, cache=cache,
                                   config=config, progress=progress)]
    probs = head.probabilities(tables[1].features)
    rows, scores = choose(method, probs, tables[1].features, n, seed)
    records = tables[1].records
    sources = [pool.root / records[i].path for i in rows]
    suggestions = [suggestion(rank + 1, str(path), float(s), probs[i], labelled.classes, method)
                   for rank, (path, i, s) in enumerate(zip(sources, rows, scores))]
    return {"folder": str(Path(root).absolute()), "unlabeled": str(Path(unlabeled).absolute()), "base": ref.label,
            "method": method, "n_labelled": len(labels), "n_pool": len(records), "n_left_out": len(left_out),
            "suggestions": suggestions, "skipped": [{"path": shown(s.path), "reason": s.reason} for s in
                                                    (*pool.skipped, *tables[0].skipped, *tables[1].skipped)],
            "files": {}}, sources


def suggestion(rank: int, path: str, score: float, probs: np.ndarray, classes, method: str) -> dict:
    """One row of suggest.csv: the image, its score, the head's guess and why it was chosen."""
    top = np.argsort(probs)[::-1][:2]
    gap = float(margins(probs[None])[0])
    doubt = (f"torn between `{classes[top[0]]}` and `{classes[top[1]]}` (margin {gap:.2f})" if gap < 0.5 else
             f"`{classes[top[0]]}` at {probs[top[0]]:.0%} (margin {gap:.2f}: fairly sure)")
    why = {"cluster-margin": f"{doubt}; the least sure of its group of similar images",
           "badge": f"{doubt}; a large gradient unlike the others chosen (score {score:.2f})",
           "margin": doubt, "random": "drawn at random (the baseline)"}[method]
    return {"rank": rank, "path": shown(path), "score": round(score, 6), "predicted": classes[top[0]],
            "probability": round(float(probs[top[0]]), 6), "margin": round(gap, 6), "why": why}


def write_outputs(folder: Path, summary: dict, settings: SuggestConfig = SUGGEST) -> None:
    """suggest.csv (every suggestion) and index.html (their thumbnails, at most `max_shown`)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(summary["suggestions"])
    with writing(folder / FILES["csv"]) as tmp:
        tmp.write_text(text.getvalue(), "utf-8")
    shown_rows = summary["suggestions"][:settings.max_shown]
    side = REPORT.thumbnail_px
    grey = png_bytes(np.full((side, side, 3), 128, np.uint8))  # an unreadable image's thumbnail
    cells = [Tile(thumbnail(r["path"], REPORT) or grey, f"{r['rank']}. {Path(r['path']).name}\n{r['why']}")
             for r in shown_rows]
    notes = [f"{len(summary['suggestions'])} of {summary['n_pool']} unlabeled images in {summary['unlabeled']}, "
             f"ranked by {summary['method']} on {summary['base']} features and a linear head fitted on the "
             f"{summary['n_labelled']} labelled images of {summary['folder']}; label them first."]
    write_page(folder / FILES["html"], page("suggest", section("Label these next", tiles(cells)), notes=notes))


def copied(summary: dict, sources: list[Path], copy_to) -> str:
    """Copy the suggested images (`sources`, in rank order) into `copy_to` (created), named `<rank>-<name>`;
    returns its absolute path."""
    folder = Path(copy_to).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for row, source in zip(summary["suggestions"], sources):
            shutil.copy2(source, folder / f"{row['rank']:04d}-{source.name}")
    except OSError as exc:
        raise OutputError(f"--copy-to {folder}: {exc.strerror or exc}; suggest.csv is saved") from None
    return str(folder)
