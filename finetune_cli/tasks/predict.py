"""Using a trained run: predict labels for files and folders, evaluate on a labelled folder."""

from __future__ import annotations

import dataclasses

import numpy as np

from finetune_cli.analysis.conformal import calibrate, checked_coverage, prediction_sets
from finetune_cli.analysis.multilabel import label_sets, multilabel_scores
from finetune_cli.analysis.scores import scores
from finetune_cli.config import PREDICT, SCALE, SCAN, ScanConfig, checked_tta
from finetune_cli.data.inputs import collect, labelled_test_scan
from finetune_cli.data.scan import Progress, Skipped
from finetune_cli.errors import SettingsError
from finetune_cli.files import check_output_file, shown, writing
from finetune_cli.models.inference import prediction_frame, probabilities
from finetune_cli.runs.run import Run, trained_on, training_overlap
from finetune_cli.scale import ray_data
from finetune_cli.scale.backend import ray_requested


def predict(inputs, model, *, top_k: int = 1, out=None, overwrite: bool = False, tta: int | str = PREDICT.tta,
            engine: str = SCALE.engine, address: str | None = None, workers: int = SCALE.workers,
            progress: Progress | None = None, coverage: float | None = None, abstain: bool = False,
            empty_sets: bool = False, config: ScanConfig = SCAN):
    """(frame of predictions, skipped files) for image files and folders.

    The frame: path, predicted, probability, top-k labels, one column per class (p_NAME), then tta.

    `out`: also write the frame there as CSV (refused if it exists, unless `overwrite`).
    `tta`: test-time augmentation, the probabilities averaged over this many
    deterministic views per image (1-16, or its text; 1 is off); the frame's `tta` column records it.
    `engine`: `local`, or `ray`: the same rows as Parquet shards + manifest.json in the folder (or URI)
    `out`, by `workers` model actors (0: one per CPU) on the cluster at `address` or on a Ray started
    here; inputs may also be list files and URIs (see `scale.ray_data`). Returns (manifest dict, skipped).
    `model`: a run folder, its model.keras, or `last`.
    `coverage` (0-1): also each image's prediction set, the smallest set of classes holding the true one
    with that probability (`analysis.conformal`, calibrated on the run's validation images): columns
    `set` (names joined by ";") and `set_size`; with `abstain`, also `abstain` (the set has more than one
    class: no single answer at that coverage).

    Raises:
        OutputError, ModelFileError (no validation probabilities), FolderError, SettingsError (tta out of
        range, engine, coverage out of (0, 1), too few validation images for it).
    """
    tta = checked_tta(tta)
    needs_coverage(coverage, abstain=abstain, empty_sets=empty_sets)
    if ray_requested(engine, address):
        if coverage is not None:
            raise SettingsError("--coverage runs with the local engine: drop --engine ray")
        if out is None:
            raise SettingsError("--engine ray writes Parquet shards: give --out FOLDER (or a URI)")
        return ray_data.predict(inputs, model, out=str(out), overwrite=overwrite, top_k=top_k, tta=tta,
                                address=address, settings=dataclasses.replace(SCALE, workers=workers),
                                progress=progress)
    out = check_output_file(out, overwrite=overwrite) if out is not None else None
    run = Run.load(model, multi_label=True)
    model, classes, size = run.model, run.classes, run.image_size
    if run.multi_label and coverage is not None:
        raise SettingsError("--coverage makes prediction sets of one class; this run is multi-label, and its "
                            "`labels` column is already a set per image (per-label thresholds): drop --coverage")
    sets = conformal_sets(run, coverage, tta, empty_sets) if coverage is not None else None
    scan = collect(inputs, config)
    probs, ok = probabilities(model, scan, size, config=config, tta=tta)
    paths = [shown(r.path) for r in scan.images]
    frame = multi_label_frame(run, paths, probs, tta) if run.multi_label else \
        prediction_frame(paths, probs, classes, top_k, tta)
    facts = with_sets(frame, sets(probs), classes, abstain) if sets is not None else None
    late = [Skipped(r.path, "could not be read") for r, good in zip(scan.images, ok) if not good]
    frame = frame[ok].reset_index(drop=True)
    if facts is not None:  # what the sets promise, for the caller to say (`analysis.conformal.calibrate`'s facts)
        frame.attrs["coverage"] = facts
    if out is not None:
        with writing(out) as tmp:
            frame.to_csv(tmp, index=False)
    return frame, list(scan.skipped) + late


def evaluate(root, model, *, tta: int = PREDICT.tta, config: ScanConfig = SCAN, html=None,
             overwrite: bool = False, coverage: float | None = None, empty_sets: bool = False) -> dict:
    """Accuracy, ECE and NLL, per-class metrics and confusion matrix of a run on a labelled folder.

    `tta`: as for `predict` (1-16), recorded as result["tta"].
    `html`: also write a self-contained page there (confusion matrix, per-class scores, the misclassified
    images as thumbnails; see `runs.report_page.write_evaluation`), checked before any work, refused if it
    exists unless `overwrite`; result["html"] is its path.
    `coverage` (0-1): also the prediction sets of `predict --coverage`, scored: result["coverage"] (the
    share of images whose set holds the true class), "mean_set_size", "coverage_target", "n_calibration".

    Raises:
        FolderError, ModelFileError, SettingsError (tta out of range), OutputError (html).
    """
    tta = checked_tta(tta)
    page = check_output_file(html, overwrite=overwrite, suffixes=(".html", ".htm"), option="--html") if html else None
    run = Run.load(model, multi_label=True)
    if run.multi_label:
        return evaluate_multi_label(root, run, tta, config, page, coverage)
    needs_coverage(coverage, empty_sets=empty_sets)
    sets = conformal_sets(run, coverage, tta, empty_sets) if coverage is not None else None
    scan = labelled_test_scan(root, run.classes, config)
    probs, ok = probabilities(run.model, scan, run.image_size, config=config, tta=tta)
    result = {**scores(probs, ok, scan, run.classes, tta=tta), **training_overlap(run, scan, probs, ok)}
    if sets is not None:
        chosen, facts = sets(probs[ok])
        truth = [run.classes.index(r.label) for r, good in zip(scan.images, ok) if good]
        result.update(coverage=float(np.mean([y in s for y, s in zip(truth, chosen)])),
                      mean_set_size=float(np.mean([len(s) for s in chosen])),
                      empty_share=float(np.mean([len(s) == 0 for s in chosen])), **facts)
    if page is not None:
        from finetune_cli.runs.report_page import write_evaluation

        result["html"] = str(write_evaluation(page, run, scan, probs, ok, result))
    return result


def multi_label_frame(run: Run, paths: list[str], probs: np.ndarray, tta: int):
    """`predict`'s frame for a multi-label run: path, labels (those at or above their threshold, joined by the
    run's separator; "" for none), n_labels, one p_LABEL column per label, tta."""
    import pandas as pd

    chosen = label_sets(probs, np.array(run.thresholds), run.classes, run.separator)
    frame = pd.DataFrame({"path": paths, "labels": chosen,
                          "n_labels": (probs >= np.array(run.thresholds)).sum(1).astype(int)})
    for j, name in enumerate(run.classes):
        frame[f"p_{name}"] = probs[:, j].round(6)
    frame["tta"] = tta
    return frame


def evaluate_multi_label(root, run: Run, tta: int, config: ScanConfig, page, coverage) -> dict:
    """`evaluate` for a multi-label run: `analysis.multilabel.multilabel_scores` at the run's thresholds, on a
    table of label sets (or a class folder: one label per image), with how many images trained the run.

    Raises:
        SettingsError: --html or --coverage (single-label only); FolderError: as `labelled_test_scan`.
    """
    if page is not None or coverage is not None:
        raise SettingsError(f"{'--html' if page is not None else '--coverage'} is built for single-label runs; "
                            "this run is multi-label: drop it (the scores are printed, and --json has them all)")
    scan = labelled_test_scan(root, run.classes, config, multi_label=True)
    probs, ok = probabilities(run.model, scan, run.image_size, config=config, tta=tta)
    records = [r for r, good in zip(scan.images, ok) if good]
    result = multilabel_scores(scan.label_matrix(records, run.classes), probs[ok], np.array(run.thresholds),
                               run.classes)
    trained = trained_on(run.path)
    seen = sum(r.digest in trained for r in records) if trained is not None else 0
    return {"task": "multi-label", **result, "tta": tta, "n_skipped": int((~ok).sum()) + len(scan.skipped),
            **({"n_training_images": seen} if seen else {})}


def needs_coverage(coverage, **flags: bool) -> None:
    """Refuse, in one line, a prediction-set flag (abstain, empty_sets) given without --coverage.

    Raises:
        SettingsError: the first flag set while `coverage` is None.
    """
    given = [name for name, on in flags.items() if on]
    if given and coverage is None:
        raise SettingsError(f"--{given[0].replace('_', '-')} is about the prediction sets of --coverage: "
                            "give --coverage")


def with_sets(frame, sets: tuple, classes: list[str], abstain: bool) -> dict:
    """Add `predict --coverage`'s columns to `frame` in place: set (class names joined by ";", most probable
    first), set_size and, with `abstain`, abstain (not one class: several, or none with --empty-sets);
    returns the calibration's facts."""
    chosen, facts = sets
    frame["set"] = [";".join(classes[i] for i in s) for s in chosen]
    frame["set_size"] = [len(s) for s in chosen]
    if abstain:
        frame["abstain"] = frame["set_size"] != 1
    return facts


def conformal_sets(run: Run, coverage: float, tta: int, empty: bool = False):
    """probabilities (m, k) -> (prediction sets, facts) at `coverage`, calibrated on `run`'s validation
    images; checked here, before any image is read (`analysis.conformal`).

    Raises:
        SettingsError: coverage out of (0, 1), too few validation images, or test-time views (the
            validation probabilities have none: the guarantee would not hold).
        ModelFileError: the run keeps no validation probabilities.
    """
    coverage = checked_coverage(coverage)
    if tta > 1:
        raise SettingsError("--coverage calibrates on validation probabilities computed without test-time views: "
                            "use --tta 1 with --coverage")
    q, facts = calibrate(*run.validation(), coverage)  # too few images: refused now
    facts = {**facts, "empty_sets": empty}
    return lambda probs: (prediction_sets(probs, q, empty), facts)
