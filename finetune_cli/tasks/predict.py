"""Using a trained run: predict labels for files and folders, evaluate on a labelled folder."""

from __future__ import annotations

from finetune_cli.analysis.scores import scores
from finetune_cli.config import PREDICT, SCAN, ScanConfig, checked_tta
from finetune_cli.data.inputs import collect, labelled_test_scan
from finetune_cli.data.scan import Skipped
from finetune_cli.files import check_output_file, shown, writing
from finetune_cli.models.inference import prediction_frame, probabilities
from finetune_cli.runs.run import Run, training_overlap


def predict(inputs, run_dir, *, top_k: int = 1, out=None, overwrite: bool = False, tta: int = PREDICT.tta,
            config: ScanConfig = SCAN):
    """A frame: path, predicted, probability, top-k labels, one column per class (p_NAME), then tta.

    Args:
        tta: views averaged per image (see `probabilities`), 1-16; the
            `tta` column repeats it on every row, so a CSV says how it was made.
        out: if given, the frame is also written there as CSV, atomically;
            the path is checked before any work, and an existing file is
            refused unless `overwrite`.

    Returns:
        (pandas.DataFrame, skipped list).

    Raises:
        OutputError, ModelFileError, FolderError, SettingsError (tta out of range).
    """
    tta = checked_tta(tta)
    out = check_output_file(out, overwrite=overwrite) if out is not None else None
    run = Run.load(run_dir)
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


def evaluate(root, run_dir, *, tta: int = PREDICT.tta, config: ScanConfig = SCAN, html=None,
             overwrite: bool = False) -> dict:
    """Accuracy, calibration (ECE, NLL), per-class precision/recall/F1 and the confusion matrix on a labelled
    folder; see `scores`. `tta`: views averaged per image (see `probabilities`), 1-16. `html`: also
    write that page (`report_html.write_evaluation`; result["html"]), refused if it exists unless `overwrite`.

    Raises:
        FolderError: a class folder the model does not know.
        SettingsError: tta out of range.
        OutputError: `html` cannot be written.
    """
    tta = checked_tta(tta)
    page = check_output_file(html, overwrite=overwrite, suffixes=(".html", ".htm"), option="--html") if html else None
    run = Run.load(run_dir)
    scan = labelled_test_scan(root, run.classes, config)
    probs, ok = probabilities(run.model, scan, run.image_size, config=config, tta=tta)
    result = {**scores(probs, ok, scan, run.classes, tta=tta), **training_overlap(run, scan, probs, ok)}
    if page is not None:
        from finetune_cli.runs.report_page import write_evaluation

        result["html"] = str(write_evaluation(page, run, scan, probs, ok, result))
    return result


