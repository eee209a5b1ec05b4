"""Using a trained run: predict labels for files and folders, evaluate on a labelled folder."""

from __future__ import annotations

import dataclasses

from finetune_cli.analysis.scores import scores
from finetune_cli.config import PREDICT, SCALE, SCAN, ScanConfig, checked_tta
from finetune_cli.data.inputs import collect, labelled_test_scan
from finetune_cli.data.scan import Progress, Skipped
from finetune_cli.errors import SettingsError
from finetune_cli.files import check_output_file, shown, writing
from finetune_cli.models.inference import prediction_frame, probabilities
from finetune_cli.runs.run import Run, training_overlap
from finetune_cli.scale import ray_data
from finetune_cli.scale.backend import ray_requested


def predict(inputs, model, *, top_k: int = 1, out=None, overwrite: bool = False, tta: int | str = PREDICT.tta,
            engine: str = SCALE.engine, address: str | None = None, workers: int = SCALE.workers,
            progress: Progress | None = None, config: ScanConfig = SCAN):
    """(frame of predictions, skipped files) for image files and folders.

    The frame: path, predicted, probability, top-k labels, one column per class (p_NAME), then tta.

    `out`: also write the frame there as CSV (refused if it exists, unless `overwrite`).
    `tta`: test-time augmentation, the probabilities averaged over this many
    deterministic views per image (1-16, or its text; 1 is off); the frame's `tta` column records it.
    `engine`: `local`, or `ray`: the same rows as Parquet shards + manifest.json in the folder (or URI)
    `out`, by `workers` model actors (0: one per CPU) on the cluster at `address` or on a Ray started
    here; inputs may also be list files and URIs (see `scale.ray_data`). Returns (manifest dict, skipped).
    `model`: a run folder, its model.keras, or `last`.

    Raises:
        OutputError, ModelFileError, FolderError, SettingsError (tta out of range, engine).
    """
    tta = checked_tta(tta)
    if ray_requested(engine, address):
        if out is None:
            raise SettingsError("--engine ray writes Parquet shards: give --out FOLDER (or a URI)")
        return ray_data.predict(inputs, model, out=str(out), overwrite=overwrite, top_k=top_k, tta=tta,
                                address=address, settings=dataclasses.replace(SCALE, workers=workers),
                                progress=progress)
    out = check_output_file(out, overwrite=overwrite) if out is not None else None
    run = Run.load(model)
    model, classes, size = run.model, run.classes, run.image_size
    scan = collect(inputs, config)
    probs, ok = probabilities(model, scan, size, config=config, tta=tta)
    frame = prediction_frame([shown(r.path) for r in scan.images], probs, classes, top_k, tta)
    late = [Skipped(r.path, "could not be read") for r, good in zip(scan.images, ok) if not good]
    frame = frame[ok].reset_index(drop=True)
    if out is not None:
        with writing(out) as tmp:
            frame.to_csv(tmp, index=False)
    return frame, list(scan.skipped) + late


def evaluate(root, model, *, tta: int = PREDICT.tta, config: ScanConfig = SCAN, html=None,
             overwrite: bool = False) -> dict:
    """Accuracy, ECE and NLL, per-class metrics and confusion matrix of a run on a labelled folder.

    `tta`: as for `predict` (1-16), recorded as result["tta"].
    `html`: also write a self-contained page there (confusion matrix, per-class scores, the misclassified
    images as thumbnails; see `runs.report_page.write_evaluation`), checked before any work, refused if it
    exists unless `overwrite`; result["html"] is its path.

    Raises:
        FolderError, ModelFileError, SettingsError (tta out of range), OutputError (html).
    """
    tta = checked_tta(tta)
    page = check_output_file(html, overwrite=overwrite, suffixes=(".html", ".htm"), option="--html") if html else None
    run = Run.load(model)
    scan = labelled_test_scan(root, run.classes, config)
    probs, ok = probabilities(run.model, scan, run.image_size, config=config, tta=tta)
    result = {**scores(probs, ok, scan, run.classes, tta=tta), **training_overlap(run, scan, probs, ok)}
    if page is not None:
        from finetune_cli.runs.report_page import write_evaluation

        result["html"] = str(write_evaluation(page, run, scan, probs, ok, result))
    return result


