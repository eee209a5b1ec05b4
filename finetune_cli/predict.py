"""Using a trained run: predict labels for files and folders, evaluate on a labelled folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.scan import ImageRecord, Scan, Skipped, _probe, scan_folder
from finetune_cli.errors import FolderError
from finetune_cli.files import check_output_file, shown, writing
from finetune_cli.run import Run


def collect(inputs, config: ScanConfig = SCAN) -> Scan:
    """Files and folders to predict on, as one unlabeled scan rooted at "/".

    A folder with no usable image is skipped with its reason, like a bad
    file; only when no input holds a usable image is it an error.

    Raises:
        FolderError: an input does not exist, or nothing usable was found.
    """
    records, skipped = [], []
    paths = [Path(p).expanduser().absolute() for p in inputs]
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
            result = _probe(path.parent, path, "", config)
            if isinstance(result, ImageRecord):
                records.append(replace(result, path=str(path)))
            else:
                skipped.append(Skipped(str(path), result.reason))
    if not records:
        first = f" ({shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        raise FolderError("no usable images among the inputs" + first)
    return Scan(Path("/"), False, (), tuple(records), tuple(skipped))


def probabilities(model, scan: Scan, size: int, batch_size: int = 32, config: ScanConfig = SCAN) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), ok (n,)) for the images of `scan`, in order."""
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images, image_spec

    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[image_spec(size)])
    probs, oks = [], []
    for images, ok in batched_images(scan.paths(), size, batch_size, config):
        probs.append(forward(images).numpy())
        oks.append(ok.numpy())
    return np.concatenate(probs), np.concatenate(oks)


def predict(inputs, run_dir, *, top_k: int = 1, out=None, overwrite: bool = False, config: ScanConfig = SCAN):
    """A frame: path, predicted, probability, top-k labels, then one column per class.

    Args:
        out: if given, the frame is also written there as CSV, atomically;
            the path is checked before any work, and an existing file is
            refused unless `overwrite`.

    Returns:
        (pandas.DataFrame, skipped list).

    Raises:
        OutputError, ModelFileError, FolderError.
    """
    import pandas as pd

    out = check_output_file(out, overwrite=overwrite) if out is not None else None
    run = Run.load(run_dir)
    model, classes, size = run.model, run.classes, run.image_size
    scan = collect(inputs, config)
    probs, ok = probabilities(model, scan, size, config=config)
    order = np.argsort(-probs, axis=1)
    frame = pd.DataFrame({"path": [shown(r.path) for r in scan.images]})
    frame["predicted"] = [classes[i] for i in order[:, 0]]
    frame["probability"] = probs[np.arange(len(probs)), order[:, 0]].round(6)
    for k in range(1, min(top_k, len(classes))):
        frame[f"top{k + 1}"] = [classes[i] for i in order[:, k]]
    for j, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, j].round(6)
    late = [Skipped(r.path, "could not be read") for r, good in zip(scan.images, ok) if not good]
    frame = frame[ok].reset_index(drop=True)
    if out is not None:
        with writing(out) as tmp:
            frame.to_csv(tmp, index=False)
    return frame, list(scan.skipped) + late


def evaluate(root, run_dir, *, config: ScanConfig = SCAN) -> dict:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on a labelled folder.

    Raises:
        FolderError: a class folder the model does not know.
    """
    run = Run.load(run_dir)
    scan = labelled_test_scan(root, run.classes, config)
    probs, ok = probabilities(run.model, scan, run.image_size, config=config)
    return scores(probs, ok, scan, run.classes)


def labelled_test_scan(root, classes: list[str], config: ScanConfig = SCAN) -> Scan:
    """Scan a labelled test folder whose classes the model must know (one class is enough).

    Raises:
        FolderError: the folder is unusable or holds a class unknown to the model.
    """
    scan = scan_folder(root, labelled=True, config=config, for_training=False)
    unknown = [c for c in scan.classes if c not in classes]
    if unknown:
        raise FolderError(f"class folder(s) {', '.join(unknown)} unknown to the model, which knows: {', '.join(classes)}")
    return scan


def scores(probs: np.ndarray, ok: np.ndarray, scan: Scan, classes: list[str]) -> dict:
    """Accuracy, per-class metrics and confusion from probabilities (n, k) of `scan.images`.

    Args:
        ok: bool (n,), False for an image that could not be read (left out).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    truth = np.array([classes.index(r.label) for r in scan.images])[ok]
    guess = probs[ok].argmax(1)
    present = sorted(set(truth))
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=present, zero_division=0)
    return {
        "accuracy": float((truth == guess).mean()),
        "n_images": int(ok.sum()),
        "per_class": [
            {"class": classes[c], "precision": round(float(p), 4), "recall": round(float(r), 4),
             "f1": round(float(f), 4), "support": int(s)}
            for c, p, r, f, s in zip(present, precision, recall, f1, support)
        ],
        "classes": classes,
        "confusion": confusion_matrix(truth, guess, labels=list(range(len(classes)))).tolist(),
        "skipped": [{"path": shown(s.path), "reason": shown(s.reason)} for s in scan.skipped],
    }
