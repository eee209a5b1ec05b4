"""`finetune audit`: possible label errors, near-duplicate pairs (and leakage across folders), outliers.

Steps, each a plain value to the next:

    scan       DIR (labelled), and --val-dir / --test-dir when given            -> one Scan of all images
    features   final-stage features, average pooled, from the feature cache    -> (n, d) float32
    labels     out-of-fold probabilities of a standardised logistic regression
               (stratified k folds on DIR); score = best other class's
               probability - the given class's, in [-1, 1]                    -> label findings
    pairs      cosine similarity of mean-centred, unit-length features; pairs at
               or above `duplicate_similarity` are duplicate pairs, or leakage when
               they lie in different folders                                   -> pair findings
    outliers   mean similarity to the k nearest other images of DIR; robust
               z-score (median - s) / (1.4826 MAD) above `outlier_z`           -> outlier findings
    write      audit.csv (one row per finding) and index.html (thumbnails)     -> summary

Similarities are computed a block of rows at a time, so memory grows with
n * block, not n^2.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from finetune_cli.analysis.units import png_bytes
from finetune_cli.config import AUDIT, FEATURES, SCAN, AuditConfig, ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb, read_image_file
from finetune_cli.data.scan import Scan, scan_folder
from finetune_cli.data.splits import content_groups, distinct_per_class, grouped_folds
from finetune_cli.errors import FolderError
from finetune_cli.features import FeatureCache, extract
from finetune_cli.files import output_folder, shown, writing
from finetune_cli.models.backbones import resolve
from finetune_cli.pages.html import Tile, page, section, tiles, write_page
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.train.logistic import standardised_logistic

KINDS = ("label", "leakage", "duplicate", "outlier")
COLUMNS = ("kind", "path", "other_path", "given_label", "suggested_label", "score")
#: What `audit` writes into its folder, by kind (all that --overwrite replaces there).
FILES = {"csv": "audit.csv", "html": "index.html"}
OUTPUTS = tuple(FILES.values())
BLOCK = 1024


def combined_scan(root, val_dir=None, test_dir=None, config: ScanConfig = SCAN) -> tuple[Scan, list[str], tuple]:
    """(one Scan rooted at "/" with absolute paths, the folder ("train", "val", "test") of each image, DIR's classes).

    Raises:
        FolderError: DIR unusable (see `scan_folder`), or a --val-dir / --test-dir without usable images.
    """
    main = scan_folder(root, labelled=True, config=config)
    scans, splits = [("train", main)], []
    for split, folder in (("val", val_dir), ("test", test_dir)):
        if folder is not None:
            scans.append((split, scan_folder(folder, labelled=None, config=config, for_training=False)))
    records, skipped = [], []
    for split, scan in scans:
        records += [replace(r, path=str(scan.root / r.path)) for r in scan.images]
        skipped += [replace(s, path=str(scan.root / s.path)) for s in scan.skipped]
        splits += [split] * len(scan.images)
    return Scan(Path("/"), True, main.classes, tuple(records), tuple(skipped)), splits, main.classes


def out_of_fold(features: np.ndarray, labels: np.ndarray, settings: AuditConfig = AUDIT, seed: int = 0,
                groups: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold class probabilities (n, k) of a standardised logistic regression, stratified folds.

    labels: int (n,) in 0..k-1, every class at least 2 images (the scan guarantees it).
    groups: int (n,) content groups (`data.splits.content_groups`): identical files share a fold, so a
        copy in another fold cannot vouch for an image's label.
    """
    from sklearn.model_selection import cross_val_predict

    folds = int(max(2, min(settings.folds, distinct_per_class(labels, groups).min())))
    model = standardised_logistic(settings.C, floor=0.0, tol=1e-4, max_iter=2000)  # unfloored, as audit measured
    with one_blas_thread():
        return cross_val_predict(model, features, labels, cv=grouped_folds(labels, groups, folds, seed),
                                 method="predict_proba")


def label_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score (n,) in [-1, 1]: best other class's probability minus the given class's; that other class (n,))."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    suggested = others.argmax(axis=1)
    return others.max(axis=1) - probs[np.arange(len(labels)), labels], suggested


def unit_rows(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Mean-centred rows scaled to unit length (a zero row stays zero)."""
    z = features - centre
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def neighbours_and_pairs(z: np.ndarray, train: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, list]:
    """(mean similarity of each train row to its k most similar other train rows (n_train,),
    [(i, j, similarity)] for i < j at or above `threshold`), a block of rows at a time."""
    knn, pairs = np.zeros(int(train.sum())), []
    where_train = np.flatnonzero(train)
    position = {int(i): p for p, i in enumerate(where_train)}
    k = max(1, min(k, len(where_train) - 1))
    for start in range(0, len(z), BLOCK):
        sims = z[start : start + BLOCK] @ z.T
        for offset, row in enumerate(sims):
            i = start + offset
            close = np.flatnonzero(row[i + 1 :] >= threshold) + i + 1
            pairs += [(i, int(j), float(min(row[j], 1.0))) for j in close]
            if train[i]:
                others = np.delete(row[where_train], position[i])
                knn[position[i]] = np.partition(others, len(others) - k)[-k:].mean()
    return knn, pairs


def robust_z(values: np.ndarray) -> np.ndarray:
    """(median - value) / (1.4826 MAD): how far below the typical value, in robust standard deviations."""
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    return (median - values) / max(spread, 1e-9)


def find(scan: Scan, splits: list[str], classes: tuple, features: np.ndarray, settings: AuditConfig = AUDIT,
         seed: int = 0) -> list[dict]:
    """The findings, each {kind, path, other_path, given_label, suggested_label, score}: label errors (most
    confident first), leakage and duplicate pairs (most similar first), outliers (farthest first)."""
    split = np.array(splits)
    train = split == "train"
    paths = [shown(r.path) for r in scan.images]
    given = [r.label for r in scan.images]
    labels = np.array([classes.index(given[i]) for i in np.flatnonzero(train)])
    groups = content_groups(r.digest for r, t in zip(scan.images, train) if t)
    scores, suggested = label_scores(out_of_fold(features[train], labels, settings, seed, groups), labels)
    rows = [_row("label", paths[i], "", given[i], classes[suggested[p]], scores[p])
            for p, i in enumerate(np.flatnonzero(train)) if scores[p] > settings.label_margin]
    rows.sort(key=lambda r: -r["score"])
    z = unit_rows(features, features[train].mean(axis=0))
    knn, pairs = neighbours_and_pairs(z, train, settings.neighbours, settings.duplicate_similarity)
    pairs.sort(key=lambda p: -p[2])
    for kind in ("leakage", "duplicate"):
        rows += [_row(kind, paths[i], paths[j], given[i], given[j], s) for i, j, s in pairs
                 if (split[i] != split[j]) == (kind == "leakage")]
    far = robust_z(knn)
    order = [p for p in np.argsort(-far, kind="stable") if far[p] > settings.outlier_z]
    rows += [_row("outlier", paths[i], "", given[i], "", far[p]) for p, i in
             ((p, np.flatnonzero(train)[p]) for p in order)]
    return rows


def _row(kind: str, path: str, other: str, given: str, suggested: str, score: float) -> dict:
    return {"kind": kind, "path": path, "other_path": other, "given_label": given, "suggested_label": suggested,
            "score": round(float(score), 6)}


def audit(root, base: str, *, val_dir=None, test_dir=None, out=None, write: bool = True, overwrite: bool = False,
          weights: str = "imagenet", image_size: int | None = None, batch_size: int = FEATURES.batch_size,
          cache_dir=None, use_cache: bool = True, seed: int = 0, config: ScanConfig = SCAN,
          settings: AuditConfig = AUDIT, progress=None) -> dict:
    """Data problems found with `base`'s cached features (`finetune audit`; method: `audit` module).

    Args:
        val_dir, test_dir: also compared with `root` (a near-duplicate across folders is leakage).
        out: the folder for audit.csv and index.html; None: a new `runs/<folder name>-audit-N`.
        write: False returns the findings without writing anything (`inspect --base` uses it).
        overwrite: replace an earlier audit in `out` (refused without it when `out` holds files; a folder
            holding other files than audit.csv and index.html is refused even with it).

    Returns (the `audit --json` contract):
        {"folder", "base", "images": {"train": n[, "val": n][, "test": n]},
         "counts": {"label", "leakage", "duplicate", "outlier": n},
         "findings": [{"kind": label|leakage|duplicate|outlier, "path", "other_path" ("" unless a pair),
                       "given_label", "suggested_label" (label: the class predicted instead; pairs: the other
                       image's label; else ""), "score" (label: margin in (0, 1]; pairs: cosine similarity;
                       outlier: robust z)}], most suspect first within each kind,
         "skipped": [{"path", "reason"}], "settings": {...}, "files": {"csv", "html"} (empty without write)}.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError.
    """
    scan, splits, classes = combined_scan(root, val_dir, test_dir, config)
    ref = resolve(base, weights, image_size)
    if not write:
        return _audited(root, scan, splits, classes, ref, batch_size, cache_dir, use_cache, seed, config, settings,
                        progress)
    target = output_folder(out, f"{Path(root).resolve().name}-audit", command="audit", owned=OUTPUTS,
                           overwrite=overwrite)
    with target.staged() as staging:
        summary = _audited(root, scan, splits, classes, ref, batch_size, cache_dir, use_cache, seed, config,
                           settings, progress)
        write_outputs(staging, summary, settings, config)
        summary["files"] = {kind: str(target.path / name) for kind, name in FILES.items()}
    return summary


def _audited(root, scan: Scan, splits: list[str], classes: tuple, ref, batch_size: int, cache_dir, use_cache: bool,
             seed: int, config: ScanConfig, settings: AuditConfig, progress) -> dict:
    """The audit's summary (see `api.audit`), its "files" empty: features, then the findings."""
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    table = extract(scan, ref, pooling=FEATURES.pooling, batch_size=batch_size, cache=cache, config=config,
                    progress=progress)
    kept = {r.path for r in table.records}
    splits = [s for r, s in zip(scan.images, splits) if r.path in kept]
    scan = replace(scan, images=tuple(table.records))
    if splits.count("train") < 2 * len(classes):
        raise FolderError(f"{root}: too few readable images to audit ({splits.count('train')})")
    findings = find(scan, splits, classes, table.features, settings, seed)
    summary = {
        "folder": str(Path(root).absolute()), "base": ref.label,
        "images": {s: splits.count(s) for s in ("train", "val", "test") if s in splits},
        "counts": {k: sum(f["kind"] == k for f in findings) for k in KINDS},
        "findings": findings,
        "skipped": [{"path": shown(s.path), "reason": s.reason} for s in (*scan.skipped, *table.skipped)],
        "settings": {"folds": settings.folds, "label_margin": settings.label_margin,
                     "duplicate_similarity": settings.duplicate_similarity, "neighbours": settings.neighbours,
                     "outlier_z": settings.outlier_z},
        "files": {},
    }
    return summary


def write_outputs(folder: Path, summary: dict, settings: AuditConfig, config: ScanConfig) -> dict:
    """audit.csv (every finding) and index.html (thumbnails, at most `max_shown` per kind); returns their paths."""
    files = {kind: folder / name for kind, name in FILES.items()}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(summary["findings"])
    with writing(files["csv"]) as tmp:
        tmp.write_text(text.getvalue(), "utf-8")
    write_gallery(files["html"], summary, settings, config)
    return {k: str(v) for k, v in files.items()}


TITLES = {"label": "Possible label errors", "leakage": "Leakage: near-duplicate pairs across folders",
          "duplicate": "Near-duplicate pairs within a folder", "outlier": "Outliers"}


def write_gallery(path: Path, summary: dict, settings: AuditConfig, config: ScanConfig) -> None:
    """The suspects' thumbnails by kind; a pair is one picture, the two images side by side."""
    parts = []
    for kind in KINDS:
        found = [f for f in summary["findings"] if f["kind"] == kind]
        if not found:
            continue
        cells = [Tile(_thumbnail(f, settings.thumb, config), _caption(f), flagged=kind in ("label", "leakage"))
                 for f in found[: settings.max_shown]]
        more = [f"{len(found) - settings.max_shown} more in audit.csv"] if len(found) > settings.max_shown else []
        parts.append(section(f"{TITLES[kind]} ({len(found)})", tiles(cells), notes=more))
    counts = ", ".join(f"{n} {k}" for k, n in summary["counts"].items())
    notes = [f"{summary['folder']} with {summary['base']} features: {counts}.",
             "label: out-of-fold probability of the suggested class minus the given class's; duplicate/leakage: "
             "cosine similarity of mean-centred features; outlier: robust z-score of the mean similarity to the "
             f"{settings.neighbours} nearest images."]
    if not parts:
        parts.append(section("No suspects", notes=["nothing crossed the thresholds"]))
    write_page(path, page("audit", *parts, notes=notes))


def _caption(f: dict) -> str:
    if f["kind"] == "label":
        return f"{Path(f['path']).name}\ngiven {f['given_label']} -> {f['suggested_label']}?\nscore {f['score']:.2f}"
    if f["other_path"]:
        return f"{Path(f['path']).name}\n{Path(f['other_path']).name}\nsimilarity {f['score']:.3f}"
    return f"{Path(f['path']).name} ({f['given_label']})\nz {f['score']:.1f}"


def _thumbnail(f: dict, side: int, config: ScanConfig) -> bytes:
    """PNG of the finding's image, or of both images side by side for a pair (grey where unreadable)."""
    def pixels(path: str) -> np.ndarray:
        try:
            return decode_rgb(read_image_file(Path(path), config.max_bytes), config.max_pixels, config.background,
                              side)
        except (OSError, UnusableImage):
            return np.full((side, side, 3), 128, np.uint8)

    shown_ = [pixels(f["path"])] + ([np.full((side, 4, 3), 255, np.uint8), pixels(f["other_path"])]
                                    if f["other_path"] else [])
    return png_bytes(np.concatenate(shown_, axis=1))
