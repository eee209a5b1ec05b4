"""`finetune export`: write a run's model as keras, savedmodel, tflite or onnx, and verify the written file.

    run folder -> held-out (and calibration) images -> file in a staging folder -> the file run by its
    own runtime vs the Keras model -> accepted: moved into DIR with labels.json and export.json
                                   -> refused (agreement < min_agreement, no --force): removed

DIR (default: a new RUN/exports/FORMAT-QUANTIZE-N) is created exclusively when it is picked, with the
output marker; a DIR this export created is removed again when it fails. The staging folder beside DIR
is named as `files.staging_folder` names them, so it fits the file-name limit and the next export
removes it when a killed one left it; SIGTERM cleans up as Ctrl-C does. A write that fails (disk
full, read-only, a name too long) is one OutputError naming the path.

Which converter and runtime each format uses: `models.formats`. The held-out images are those of
`check_dir` (a labelled folder), or the validation split `finetune train --seed SEED` made of `data`
(the folder the run was trained on; a run folder does not record it). Full int8 takes its
representative set from the training part of `data`. Before 8-bit quantisation the final Dense layer
is split by weight scale (`models.formats.split_head`; the same function in float).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune_cli.config import EXPORT, SCAN, TRAIN, ExportConfig
from finetune_cli.data.inputs import labelled_test_scan
from finetune_cli.data.splits import overlap
from finetune_cli.errors import ExportError, OutputError, SettingsError
from finetune_cli.files import (WRITE_ERRNOS, check_writable_folder, claim_numbered, create_folder, remove_created,
                                remove_stale_temps, sigterm_as_interrupt, staging_folder, write_error)
from finetune_cli.models import formats
from finetune_cli.runs.run import Run, read_predictions
from finetune_cli.train.context import split


@dataclass(frozen=True)
class Images:
    """Decoded images for the export: float32 (n, S, S, 3) in [0, 255] with class indices (n,) into run.classes.

    Attributes:
        check: the held-out images the exported file is verified on; labels: their classes.
        calibration: the representative set of int8 (at most `ExportConfig.calibration` images), or None.
        source: where `check` came from, in words.
        held_out: False when `check` are training images of the saved model (a run that trained on every
            image): the agreement is measured, but their accuracy is not a held-out score.
    """

    check: np.ndarray
    labels: np.ndarray
    calibration: np.ndarray | None
    source: str
    held_out: bool = True


def export(run, *, format: str, quantize: str = "none", out=None, data=None, check_dir=None,
               seed: int = 0, overwrite: bool = False, force: bool = False, min_agreement: float | None = None,
               calibration: int | None = None, settings: ExportConfig = EXPORT) -> dict:
    """Write a run's model as keras, savedmodel, tflite or onnx into `out`, and verify the written file.

    The file takes raw RGB float32 (B, S, S, 3) in [0, 255] (preprocessing inside) and returns
    probabilities (B, k); labels.json goes beside it (and into the file: ONNX metadata_props, TFLite
    metadata, SavedModel assets). Routes per format: `models.formats`.

    Args:
        format: keras, savedmodel, tflite or onnx.
        quantize: none; tflite also fp16, dynamic, int8; onnx also int8.
        out: the folder (new, or existing: other files in it are kept); None: a new RUN/exports/F-Q-N.
        data: the folder the run was trained on: its validation split (`train --seed seed`) is the
            check set, its training part int8's representative set (`calibration` images at most).
        check_dir: a labelled folder to verify on instead.
        min_agreement: the share (0-1) of held-out images on which the file must pick the Keras model's
            top-1 class; below it the export is refused and nothing is written, unless `force`.
        None values: `config.ExportConfig`'s defaults.

    Returns:
        The report (also out/export.json): n_images, accuracy_keras, accuracy, agreement,
        max_prob_diff, ms_per_image (batch 1, CPU) of both, bytes, route, out.

    Raises:
        SettingsError, ModelFileError, FolderError, OutputError, ExportError (refused, missing runtime).
    """
    formats.check_choice(format, quantize)
    min_agreement = settings.min_agreement if min_agreement is None else min_agreement
    calibration = settings.calibration if calibration is None else calibration
    if not 0 <= min_agreement <= 1 or calibration < 1:
        raise SettingsError(f"--min-agreement takes 0 to 1 and --calibration at least 1 image. "
                            f"Received: min_agreement={min_agreement}, calibration={calibration}")
    formats.check_runtime(format)
    run = Run.load(run)
    out, created = _output_folder(out, run, format, quantize, overwrite)
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up as Ctrl-C does: no staging folder left
            return _export(run, out, format, quantize, data, check_dir, seed, force, min_agreement, calibration,
                           settings)
    except BaseException as exc:
        if created:
            remove_created(out)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(out, exc, "write into") from None
        raise


def _export(run: Run, out: Path, fmt: str, quantize: str, data, check_dir, seed: int, force: bool,
            min_agreement: float, calibration: int, settings: ExportConfig) -> dict:
    """Write the file into a staging folder beside `out`, verify it, and move the accepted files into `out`."""
    images = held_out(run, data, check_dir, seed, calibration if quantize == "int8" else 0)
    model = formats.split_head(run.model) if quantize in ("dynamic", "int8") else run.model
    staging = staging_folder(out.parent, out.name)  # a name `remove_stale_temps` recognises, within NAME_MAX
    try:
        path = formats.write(model, run.path / "model.keras", fmt, quantize, staging, run.image_size,
                             run.classes, images.calibration, settings.onnx_opset)
        report = verify(run, fmt, path, images, settings)
        report.update(_facts(run, fmt, quantize, path, images, min_agreement, force), out=str(out),
                      split_head=model is not run.model)
        if report["agreement"] < min_agreement and not force:
            raise ExportError(f"export refused: the {fmt} ({quantize}) file picks the Keras model's class on "
                              f"{report['agreement']:.1%} of {report['n_images']} held-out images, below "
                              f"--min-agreement {min_agreement:.0%} (largest probability difference "
                              f"{report['max_prob_diff']:.3f}); nothing was written; --force keeps it anyway")
        (staging / "labels.json").write_text(json.dumps(run.classes, ensure_ascii=False), "utf-8")
        (staging / "export.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), "utf-8")
        _publish(staging, out, [path.name, "labels.json", "export.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _output_folder(out, run: Run, fmt: str, quantize: str, overwrite: bool) -> tuple[Path, bool]:
    """(DIR, absolute; True when created here), checked before any work: it accepts files, the names to write are free.

    Default: a new numbered RUN/exports/<format>-<quantize>-N, created exclusively now (two exports started
    together never share one). Staging folders that killed exports left (beside DIR) are removed first.

    Raises:
        OutputError.
    """
    if out is None:
        remove_stale_temps(run.path / "exports")
        return claim_numbered(f"{fmt}-{quantize}", root=run.path / "exports", command="export"), True
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: give a folder (new, or one to add the export to)")
    check_writable_folder(out.parent)
    remove_stale_temps(out.parent, out.name)
    taken = [name for name in (formats.FILE_NAME[fmt], "labels.json", "export.json") if (out / name).exists()]
    if taken and not overwrite:
        raise OutputError(f"{out} already holds {', '.join(taken)}: pass --overwrite to replace them, "
                          "or choose another --out")
    return out, create_folder(out, command="export")


def held_out(run: Run, data, check_dir, seed: int, n_calibration: int) -> Images:
    """The verification images (and int8's representative set), decoded at the run's input size.

    Verification uses `check_dir`, else the run's own validation images
    (RUN/predictions_val.csv, written by `train`), else the validation split
    of `data`. The representative set comes from the training images of
    `data`, else of the folder the run recorded (metrics.json `data_root`),
    never from the images it is checked on.

    Raises:
        ExportError: no images to check on, or int8 without training images.
        FolderError: a folder is unusable, or holds classes the run does not know.
    """
    from finetune_cli.data.pipeline import decoded_arrays

    every_image = (run.metrics or {}).get("validation", {}).get("method") == "out-of-fold"
    recorded = None if every_image else _recorded_validation(run)  # out-of-fold: those images trained the model
    data = data if data is not None else _recorded_root(run)
    if data is None and ((check_dir is None and recorded is None) or n_calibration):
        need = "full int8 takes its representative images from" if n_calibration else "verification needs"
        raise ExportError(f"{need} the training images, and this run did not record them (or they moved): give "
                          "--data DIR (the folder the run was trained on; its validation split is checked)"
                          + ("" if check_dir else ", or --check-dir DIR (a labelled folder)"))
    train = val = everything = None
    if data is not None:
        everything = labelled_test_scan(data, run.classes, SCAN)
        train, val = split(everything, None, TRAIN.val_fraction, seed=seed)
    held = True
    if check_dir is not None:
        check = labelled_test_scan(check_dir, run.classes, SCAN)
        paths, labels, source = check.paths(), [run.classes.index(r.label) for r in check.images], str(check_dir)
        trained_on = everything if every_image else train
        shared = overlap(check.images, trained_on.images) if trained_on is not None else []
        if shared:
            held = False
            source += (f" ({len(shared)} of its {len(check.images)} images are training images, by content: "
                       "agreement is measured, the accuracy is not held out)")
    elif recorded is not None:
        paths, labels, source = recorded[0], recorded[1], "the run's validation images (predictions_val.csv)"
    else:
        paths, labels = val.paths(), [run.classes.index(r.label) for r in val.images]
        source = f"validation split of {data} (seed {seed})"
        if every_image:
            source = (f"a split of {data} (seed {seed}), which the run trained on (it used every image): "
                      "agreement is measured, the accuracy is not held out; --check-dir gives a held-out one")
    pixels, ok = decoded_arrays(paths, run.image_size)
    calibration = None
    if n_calibration:
        calibration = _representative(train, set(map(str, paths)), n_calibration, seed, run.image_size)
    return Images(pixels[ok], np.asarray(labels)[ok], calibration, source, held if check_dir is not None
                  else not every_image)


def _recorded_validation(run: Run) -> tuple[list[str], list[int]] | None:
    """(paths, class indices) of RUN/predictions_val.csv when every listed image still exists, else None."""
    frame = read_predictions(run.path / "predictions_val.csv")
    if frame is None or not set(frame["true"]) <= set(run.classes):
        return None
    labels = [run.classes.index(name) for name in frame["true"]]
    paths = [str(p) for p in frame["path"]]
    return (paths, labels) if paths and all(Path(p).is_file() for p in paths) else None


def _recorded_root(run: Run) -> str | None:
    """The training folder metrics.json records (`data_root`), when it still exists."""
    root = (run.metrics or {}).get("data_root")
    return root if root and Path(root).is_dir() else None


def _representative(train, exclude: set[str], n: int, seed: int, size: int) -> np.ndarray:
    """Up to `n` decoded training images (float32 (m, S, S, 3)), none of them in `exclude` (the check set)."""
    candidates = [p for p in map(str, train.paths()) if p not in exclude]
    chosen = sorted(np.random.default_rng(seed).permutation(len(candidates))[:n])
    from finetune_cli.data.pipeline import decoded_arrays

    pixels, fine = decoded_arrays([candidates[i] for i in chosen], size)
    return pixels[fine]


def verify(run: Run, fmt: str, path: Path, images: Images, settings: ExportConfig) -> dict:
    """The exported file against the Keras model on the held-out images, each at batch 1.

    Returns:
        accuracy of both (0-1), top-1 agreement (0-1), the largest absolute probability difference,
        and the median CPU ms per image at batch 1 of both.
    """
    import tensorflow as tf

    if not len(images.check):
        raise ExportError(f"no readable held-out image in {images.source}: nothing to verify the export on")
    spec = tf.TensorSpec((None, run.image_size, run.image_size, 3), tf.float32)
    keras_call = tf.function(lambda x: run.model([x], training=False), input_signature=[spec])
    reference, keras_ms = one_at_a_time(lambda x: keras_call(x).numpy(), images.check, settings)
    exported, ms = one_at_a_time(formats.runtime(fmt, path), images.check, settings)
    return {
        "n_images": int(len(images.check)),
        "accuracy_keras": float((reference.argmax(1) == images.labels).mean()),
        "accuracy": float((exported.argmax(1) == images.labels).mean()),
        "agreement": float((exported.argmax(1) == reference.argmax(1)).mean()),
        "held_out": images.held_out,
        "max_prob_diff": float(np.abs(exported - reference).max()),
        "ms_per_image": round(ms, 3),
        "ms_per_image_keras": round(keras_ms, 3),
    }


def one_at_a_time(call, images: np.ndarray, settings: ExportConfig) -> tuple[np.ndarray, float]:
    """(outputs (n, k) of `call` on each image at batch 1, median ms per call over the first timed images)."""
    for _ in range(settings.timing_warmup):
        call(images[:1])
    outputs, seconds = [], []
    for i in range(len(images)):
        started = time.perf_counter()
        outputs.append(np.asarray(call(images[i : i + 1]), dtype=np.float32))
        seconds.append(time.perf_counter() - started)
    return np.concatenate(outputs), 1000 * float(np.median(seconds[: settings.timing_images]))


def _facts(run: Run, fmt: str, quantize: str, path: Path, images: Images, min_agreement: float,
           force: bool) -> dict:
    """What was exported, how, and its size in bytes (a SavedModel: the whole folder)."""
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "run": str(run.path), "format": fmt, "quantize": quantize, "file": path.name, "bytes": int(size),
        "route": formats.ROUTE[fmt], "checked_on": images.source,
        "calibration_images": 0 if images.calibration is None else int(len(images.calibration)),
        "classes": run.classes, "image_size": run.image_size, "min_agreement": min_agreement,
        "forced": bool(force),
    }


def _publish(staging: Path, out: Path, names: list[str]) -> None:
    """Move the finished files from `staging` into `out` (created if new), replacing same-named ones only."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        try:
            os.replace(staging / name, target)
        except OSError as exc:
            raise write_error(target, exc) from None
