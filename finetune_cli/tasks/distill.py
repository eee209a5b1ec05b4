"""`finetune distill`: a small student trained on finished runs' soft targets.

    check     temperature, alpha, the teacher runs (`Run.load`), their classes
    prepare   the run folder, scan + split (as `train`), the student's BaseRef
    teach     teacher probabilities per image content and view, cached on disk
              (`features.FeatureCache`, a namespace per teacher model file
              digest, image size and view): a rerun runs no teacher
    fit       two students from the same seed on the engine (`train.distill`):
              on hard labels alone (alpha = 1), then distilled
    compare   teachers and both students: test accuracy (--test-dir, else the
              validation split), parameters, file size, CPU ms per image
    write     model.keras (the distilled student, loaded by predict/evaluate
              unchanged), student_hard.keras, labels.json, history.csv,
              curves.png, distill.json, metrics.json last
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from finetune_cli.config import DISTILL, SCAN, TRAIN, DistillConfig, ScanConfig
from finetune_cli.data.inputs import labelled_test_scan
from finetune_cli.data.scan import Scan, check_out_outside, scan_folder
from finetune_cli.errors import ModelFileError, SettingsError, TrainingError
from finetune_cli.features import FeatureCache
from finetune_cli.models.backbones import BaseRef, build, file_digest, resolve
from finetune_cli.models.heads import classifier
from finetune_cli.models.inference import probabilities
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.runs.folder import RunFolder
from finetune_cli.runs.run import Run
from finetune_cli.train.context import split, without_overlap
from finetune_cli.train.distill import fit_student, soft_targets
from finetune_cli.train.engine import Diverged


def check_settings(temperature: float, alpha: float) -> None:
    """Raises SettingsError unless temperature > 0 and 0 <= alpha <= 1 (both finite)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise SettingsError(f"Expected --temperature > 0 (4 is usual). Received: --temperature {temperature}")
    if not (np.isfinite(alpha) and 0 <= alpha <= 1):
        raise SettingsError(f"Expected --alpha in [0, 1] (the weight of the hard labels). Received: --alpha {alpha}")


def load_teachers(paths, classes: list[str]) -> list[Run]:
    """The teacher runs, each checked to know exactly `classes`, in that order.

    Raises:
        SettingsError: no teacher, one that is not a finished run, or other classes.
    """
    if not paths:
        raise SettingsError("--teacher is required: the run folder of a trained model (`finetune train --out`)")
    teachers = []
    for path in paths:
        try:
            teacher = Run.load(path)
        except ModelFileError as exc:
            raise SettingsError(f"--teacher {path} is not a finished run: {exc}") from None
        if list(teacher.classes) != list(classes):
            raise SettingsError(f"--teacher {path} knows the classes {teacher.classes}, the training folder "
                                f"holds {list(classes)}: a teacher must be trained on the same class folders")
        teachers.append(teacher)
    return teachers


def teacher_ref(teacher: Run) -> BaseRef:
    """The cache identity of a teacher: its model file's digest (a retrained teacher is a new namespace)."""
    model_file = teacher.path / "model.keras"
    identity = f"teacher:{file_digest(model_file)}"
    return BaseRef(f"teacher {teacher.path.name}", None, model_file, "imagenet", teacher.image_size, 0, identity)


def teacher_probabilities(teacher: Run, scan: Scan, view: int, cache: FeatureCache | None, *,
                          batch_size: int = 32, config: ScanConfig = SCAN) -> tuple[np.ndarray, np.ndarray, int]:
    """The teacher's probabilities of view `view` of each image of `scan`, from the cache where possible.

    Returns:
        (probabilities float32 (n, k), ok bool (n,): the image was read,
        how many images the teacher computed (0 on a warm rerun)).
    """
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images
    from finetune_cli.train.setup import predictor

    k, size = len(teacher.classes), teacher.image_size
    space = cache.namespace(teacher_ref(teacher), "probabilities", "none", view) if cache else ""
    rows = [cache.get(space, r.digest) if cache else None for r in scan.images]
    missing = [i for i, row in enumerate(rows) if row is None or len(row) != k]
    ok = np.ones(len(rows), bool)
    if missing:
        forward = predictor(teacher.model)
        paths = [scan.root / scan.images[i].path for i in missing]
        done = 0
        for images, good in batched_images(paths, size, batch_size, config, view=view):
            probs, good = forward(tf.cast(images, tf.float32)).numpy(), good.numpy()
            for i, p, g in zip(missing[done : done + len(probs)], probs, good):
                rows[i], ok[i] = p, bool(g)
                if cache and g:
                    cache.put(space, scan.images[i].digest, p)
            done += len(probs)
    return np.stack(rows).astype(np.float32), ok, len(missing)


def soft_table(teachers: list[Run], scan: Scan, views: int, cache, temperature: float, *,
               batch_size: int, config: ScanConfig) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Per view: softened averaged targets (n, k) and ok (n,); and the teacher images computed."""
    softs, oks, computed = [], [], 0
    for view in range(views):
        outputs = [teacher_probabilities(t, scan, view, cache, batch_size=batch_size, config=config)
                   for t in teachers]
        softs.append(soft_targets([o[0] for o in outputs], temperature))
        oks.append(np.all([o[1] for o in outputs], axis=0))
        computed += sum(o[2] for o in outputs)
    return softs, oks, computed


def student_batches(parts: list[tuple], size: int, batch_size: int, seed: int, config: ScanConfig):
    """Shuffled batches of (images, labels, weights, soft, labelled) for `train.distill.fit_student`.

    Args:
        parts: (scan, view, labels int (n,) (-1: unlabeled), soft (n, k), ok (n,)) each:
            the images of `scan` in view `view` (`data.pipeline.augmented_view`),
            the view the teachers scored.
    """
    import tensorflow as tf

    from finetune_cli.data.pipeline import loader, path_tensor

    loaders = {view: loader(size, config, view) for _, view, *_ in parts}
    columns = [[], [], [], [], []]
    for scan, view, labels, soft, ok in parts:
        for column, values in zip(columns, ([str(p) for p in scan.paths()], [view] * len(labels), labels, soft,
                                            ok.astype(np.float32))):
            column.extend(values)
    labels = np.asarray(columns[2], np.int32)
    data = tf.data.Dataset.from_tensor_slices((path_tensor(columns[0]), tf.constant(columns[1], tf.int32),
                                               labels, np.asarray(columns[3], np.float32),
                                               np.asarray(columns[4], np.float32), (labels >= 0).astype(np.float32)))
    data = data.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)

    def decode(path, view, label, soft, weight, labelled):
        image, good = tf.numpy_function(lambda p, v: loaders[int(v)](p), [path, view], [tf.uint8, tf.bool],
                                        stateful=False)
        image.set_shape((size, size, 3))
        return tf.cast(image, tf.float32), label, weight * tf.cast(good, tf.float32), soft, labelled

    return data.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def distill(root, teachers, student: str, *, out=None, student_weights: str = "imagenet", unlabeled=None,
            temperature: float | None = None, alpha: float | None = None, image_size: int | None = None,
            epochs: int | None = None, views: int | None = None, val_dir=None, test_dir=None, seed: int = 0,
            cache_dir=None, use_cache: bool = True, batch_size: int = 32, config: ScanConfig = SCAN,
            settings: DistillConfig = DISTILL,
            reporter: Reporter = QUIET) -> dict:
    """Distil teacher runs into a student trained on `root`'s class folders (`finetune distill`).

    Args:
        teachers: run folders of `finetune train`; several are averaged (probabilities).
        student: a registry name (`bases`, incl. lenet, alexnet, vgg) or a .keras file; a new head is added.
        student_weights: `imagenet`, `none` or a weights file (built-in networks: always a fresh start).
        unlabeled: a folder of images only the teachers label (the transfer set, soft loss only).
        temperature, alpha, epochs, views: None for `config.DistillConfig`'s defaults.
        image_size: the student's input side; None: the first teacher's.

    Returns:
        metrics (also RUN/metrics.json); "distill" holds distill.json: the teachers,
        the hard-label student and the distilled student, each with accuracy,
        parameters, file size and CPU ms per image.

    Raises:
        SettingsError, FolderError, BackboneError, OutputError, TrainingError.
    """
    started = time.perf_counter()
    given = dict(temperature=temperature, alpha=alpha, epochs=epochs or None, views=views or None)
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    check_settings(settings.temperature, settings.alpha)
    scan = scan_folder(root, labelled=True, config=config)
    runs = load_teachers(list(teachers), list(scan.classes))
    ref = resolve(student, student_weights, image_size or runs[0].image_size, seed)
    extra = scan_folder(unlabeled, labelled=False, config=config, for_training=False) if unlabeled else None
    test_scan = labelled_test_scan(test_dir, list(scan.classes), config) if test_dir else None
    val_scan = scan_folder(val_dir, labelled=True, config=config) if val_dir else None
    val_scan, test_scan = (without_overlap(scan, s, option, False) if s is not None else None
                           for s, option in ((val_scan, "--val-dir"), (test_scan, "--test-dir")))
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    check_out_outside(out, root)
    run = RunFolder(out, command="distill") if out is not None else RunFolder.new(
        f"{Path(root).resolve().name}-distill", command="distill")  # created exclusively: never a shared folder
    reporter.on_phase(f"run folder: {run.path}")
    with run.guarded():
        train_scan, val_scan = split(scan, val_scan, TRAIN.val_fraction, seed=seed)
        data = _Data(train_scan, val_scan, extra, test_scan or val_scan, list(scan.classes), ref, batch_size, config)
        students, computed = _fit_students(data, runs, cache, settings, seed, reporter)
        facts = {"classes": data.classes, "image_size": ref.image_size}
        files = {name: (students[name][0], run.save_model(students[name][0], file, facts=facts))
                 for name, file in (("hard", "student_hard.keras"), ("distilled", "model.keras"))}
        reporter.on_phase("comparing teachers and students (accuracy, size, CPU time)")
        table = compare(data, runs, files, settings)
        summary = {"teachers": [str(t.path) for t in runs], "student": ref.label, "student_weights": ref.weights,
                   "image_size": ref.image_size, "temperature": settings.temperature, "alpha": settings.alpha,
                   "views": settings.views, "unlabeled_images": len(extra.images) if extra else 0,
                   "scored_on": "test" if test_scan else "validation", "teacher_images_computed": computed,
                   "rows": table}
        return _write(run, data, students, summary, time.perf_counter() - started)


def _write(run, data: _Data, students: dict, summary: dict, seconds: float) -> dict:
    """labels.json, history.csv (both students, column `student`), distill.json, then metrics.json (last)."""
    import pandas as pd

    run.write_json("labels.json", data.classes)
    history = [{"student": name, **row} for name, (_, state) in students.items() for row in state.history]
    run.write_frame("history.csv", pd.DataFrame(history))
    run.write_json("distill.json", summary)
    distilled = summary["rows"][-1]
    metrics = {"strategy": "distill", "classes": data.classes, "base": data.ref.label,
               "val_accuracy": _best_val(students["distilled"][1]),
               f"{summary['scored_on']}_accuracy": distilled["accuracy"],
               "best_epoch": students["distilled"][1].best_epoch, "distill": summary,
               "run_folder": str(run.path), "timings_s": {"total": round(seconds, 2)}}
    run.write_json("metrics.json", metrics)
    return metrics


def _best_val(state) -> float:
    """Validation accuracy of the epoch early stopping kept."""
    rows = [h for h in state.history if h["epoch"] == state.best_epoch] or state.history[-1:]
    return float(rows[0]["val_accuracy"])


@dataclasses.dataclass
class _Data:
    """What both students train and are scored on; `score` is the test scan (or the validation split)."""

    train: Scan
    val: Scan
    unlabeled: Scan | None
    score: Scan
    classes: list[str]
    ref: BaseRef
    batch_size: int
    config: ScanConfig

    def labels(self, scan: Scan) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[r.label] for r in scan.images], np.int32)


def _fit_students(data: _Data, runs: list[Run], cache, settings: DistillConfig, seed: int,
                  reporter: Reporter) -> tuple[dict, int]:
    """{"hard": (model, LoopState), "distilled": (...)}, and how many teacher outputs were computed.

    Both students start from the same seeded initialisation and see the same
    images, views, order and epochs; the hard one has alpha = 1 and no transfer set.
    """
    from finetune_cli.data.pipeline import labelled_batches

    reporter.on_phase(f"teachers: soft targets at T={settings.temperature:g} (cached per image content and view)")
    options = {"batch_size": data.batch_size, "config": data.config}
    softs, oks, computed = soft_table(runs, data.train, settings.views, cache, settings.temperature, **options)
    labelled = [(data.train, v, data.labels(data.train), softs[v], oks[v]) for v in range(settings.views)]
    transfer = []
    if data.unlabeled is not None:
        usofts, uoks, more = soft_table(runs, data.unlabeled, settings.views, cache, settings.temperature, **options)
        computed += more
        minus = -np.ones(len(data.unlabeled.images), np.int32)
        transfer = [(data.unlabeled, v, minus, usofts[v], uoks[v]) for v in range(settings.views)]
    size, k = data.ref.image_size, len(data.classes)
    y_val = data.labels(data.val)
    val_data = labelled_batches(data.val.paths(), y_val, np.ones(len(y_val)), size, settings.batch_size,
                                config=data.config)
    students = {}
    for name, alpha, parts in (("hard", 1.0, labelled), ("distilled", settings.alpha, labelled + transfer)):
        reporter.on_phase(f"student {data.ref.label} on {'hard labels alone' if name == 'hard' else 'soft targets'}"
                          f" (alpha={alpha:g})")
        model = _student(data.ref, k, settings)
        batches = student_batches(parts, size, settings.batch_size, seed, data.config)
        try:
            state = fit_student(model, batches, val_data, k, temperature=settings.temperature, alpha=alpha,
                                settings=settings, progress=lambda s, total: reporter.on_epoch(s.history[-1], total))
        except Diverged as exc:
            raise TrainingError(f"{exc} training the {name} student: lower learning_rate") from None
        students[name] = (model, state)
    return students, computed


def _student(ref: BaseRef, n_classes: int, settings: DistillConfig):
    """The student: the backbone `ref` names (seeded), pooled, a new softmax `classifier` layer."""
    backbone = build(ref)
    return classifier(backbone.model, backbone.model.layers[-1].name, n_classes, dropout=settings.dropout)


def cpu_ms_per_image(model, size: int, batches=(1, 32), repeats: int = 10) -> dict:
    """{f"ms_batch{b}": CPU milliseconds per image at batch size b}: the median of `repeats` passes after a warm-up.

    (The median, since one pass slowed by another process would move a mean.)
    """
    import tensorflow as tf

    from finetune_cli.train.setup import predictor

    timings = {}
    with tf.device("/CPU:0"):
        forward = predictor(model)
        for batch in batches:
            x = tf.constant(np.full((batch, size, size, 3), 127.0, np.float32))
            forward(x).numpy()
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                forward(x).numpy()
                seconds.append(time.perf_counter() - started)
            timings[f"ms_batch{batch}"] = round(float(np.median(seconds)) / batch * 1000, 3)
    return timings


def compare(data: _Data, runs: list[Run], files: dict, settings: DistillConfig) -> list[dict]:
    """One row per teacher, then the hard-label student and the distilled one.

    Args:
        files: {"hard": (model, path), "distilled": (model, path)}, the students as saved.

    Returns:
        rows of model, file, accuracy (on `data.score`), params, bytes and ms per image per batch size.
    """
    labels = data.labels(data.score)
    rows = []
    entries = [(f"teacher {t.path.name}", t.model, t.path / "model.keras", t.image_size) for t in runs]
    entries += [(f"student ({name})", model, path, data.ref.image_size) for name, (model, path) in files.items()]
    for name, model, path, size in entries:
        probs, ok = probabilities(model, data.score, size, data.batch_size, data.config)
        accuracy = float(np.mean(probs.argmax(1)[ok] == labels[ok])) if ok.any() else float("nan")
        rows.append({"model": name, "file": str(path), "accuracy": round(accuracy, 4),
                     "params": int(model.count_params()), "bytes": Path(path).stat().st_size,
                     **cpu_ms_per_image(model, size, settings.timing_batches, settings.timing_repeats)})
    return rows
