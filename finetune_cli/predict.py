"""Using a trained run: predict labels for files and folders, evaluate on a labelled folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from finetune_cli.calibration import ece, nll
from finetune_cli.config import PREDICT, SCAN, TRAIN, ScanConfig
from finetune_cli.data.lists import expand_lists, is_uri
from finetune_cli.data.scan import ImageRecord, Scan, Skipped, _probe, scan_folder
from finetune_cli.errors import FolderError, SettingsError
from finetune_cli.files import check_output_file, shown, writing
from finetune_cli.run import Run, trained_on


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
            result = _probe(path.parent, path, "", config)
            if isinstance(result, ImageRecord):
                records.append(replace(result, path=str(path)))
            else:
                skipped.append(Skipped(str(path), result.reason))
    if not records:
        first = f" ({shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        raise FolderError("no usable images among the inputs" + first)
    return Scan(Path("/"), False, (), tuple(records), tuple(skipped))


def probabilities(model, scan: Scan, size: int, batch_size: int = 32, config: ScanConfig = SCAN,
                  tta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), ok (n,)) for the images of `scan`, in order.

    With `tta` K > 1 (test-time augmentation), the mean of the probabilities
    of views 0..K-1 of each image: view 0 is the image itself, the others the
    deterministic flips and crops of `data.pipeline.augmented_view` (the views
    the feature cache trains on). ok: the image was read in every view.
    """
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images, image_spec

    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[image_spec(size)])
    views, oks = [], []
    for view in range(tta):
        batches = [(forward(images).numpy(), ok.numpy())
                   for images, ok in batched_images(scan.paths(), size, batch_size, config, view=view)]
        views.append(np.concatenate([b[0] for b in batches]))
        oks.append(np.concatenate([b[1] for b in batches]))
    return (views[0] if tta == 1 else np.mean(views, axis=0, dtype=np.float64).astype(np.float32)), np.all(oks, 0)


def checked_tta(tta: int | str) -> int:
    """`tta` (an int, or its text from the command line) as an int, if it is a whole number in 1..`PREDICT.max_tta`.

    Raises:
        SettingsError: anything else, saying the range.
    """
    try:
        value = None if isinstance(tta, (bool, float)) else int(tta)
    except (TypeError, ValueError):
        value = None
    if value is None or not 1 <= value <= PREDICT.max_tta:
        raise SettingsError(f"--tta takes 1 to {PREDICT.max_tta} views per image (1: off). Received: tta={tta!r}")
    return value


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


def prediction_frame(paths: list[str], probs: np.ndarray, classes: list[str], top_k: int, tta: int):
    """The frame `predict` returns, from probabilities (n, k) of the images at `paths` (text, row order).

    Shared by the local and the Ray engine (`ray_engine`), so both write the same columns and rounding.
    """
    import pandas as pd

    order = np.argsort(-probs, axis=1)
    frame = pd.DataFrame({"path": list(paths)})
    frame["predicted"] = [classes[i] for i in order[:, 0]]
    frame["probability"] = probs[np.arange(len(probs)), order[:, 0]].round(6)
    for k in range(1, min(top_k, len(classes))):
        frame[f"top{k + 1}"] = [classes[i] for i in order[:, k]]
    for j, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, j].round(6)
    frame["tta"] = tta
    return frame


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
        from finetune_cli.report_html import write_evaluation

        result["html"] = str(write_evaluation(page, run, scan, probs, ok, result))
    return result


def training_overlap(run: Run, scan: Scan, probs: np.ndarray, ok: np.ndarray) -> dict:
    """{"n_training_images": images of `scan` that trained the run (by content), and, when some but not all
    did, "held_out_accuracy" on the others (0-1) and "n_held_out"}; {} when the run records no training images.

    A run that trained on every image (a linear plan validated out-of-fold) scores its own folder almost
    perfectly; that number is not a held-out score, and the result says so.
    """
    trained = trained_on(run.path)
    if trained is None:
        return {}
    seen = np.array([r.digest in trained for r in scan.images], bool)
    facts = {"n_training_images": int((seen & ok).sum())}
    rest = ~seen & ok
    if facts["n_training_images"] and rest.any():
        labels = np.array([run.classes.index(r.label) for r in scan.images])
        facts.update(n_held_out=int(rest.sum()),
                     held_out_accuracy=float((probs[rest].argmax(1) == labels[rest]).mean()))
    return facts


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


def scores(probs: np.ndarray, ok: np.ndarray, scan: Scan, classes: list[str], *, tta: int = 1,
           bins: int = TRAIN.ece_bins) -> dict:
    """Accuracy, calibration, per-class metrics and confusion from probabilities (n, k) of `scan.images`.

    Args:
        ok: bool (n,), False for an image that could not be read (left out).
        tta: the views the probabilities average (recorded as "tta").
        bins: confidence bins of "ece" (expected calibration error, 0-1);
            "nll" is the mean negative log-likelihood of the true class, nats.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    truth = np.array([classes.index(r.label) for r in scan.images])[ok]
    guess = probs[ok].argmax(1)
    present = sorted(set(truth))
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, labels=present, zero_division=0)
    return {
        "accuracy": float((truth == guess).mean()),
        "ece": ece(probs[ok], truth, bins),
        "nll": nll(probs[ok], truth),
        "n_images": int(ok.sum()),
        "tta": tta,
        "per_class": [
            {"class": classes[c], "precision": round(float(p), 4), "recall": round(float(r), 4),
             "f1": round(float(f), 4), "support": int(s)}
            for c, p, r, f, s in zip(present, precision, recall, f1, support)
        ],
        "classes": classes,
        "confusion": confusion_matrix(truth, guess, labels=list(range(len(classes)))).tolist(),
        "skipped": [{"path": shown(s.path), "reason": shown(s.reason)} for s in scan.skipped],
    }
