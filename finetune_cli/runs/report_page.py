"""One self-contained HTML page per run (`RUN/report.html`) and per evaluation (`evaluate --html`).

    read      the run folder's files (metrics.json, plan.json, recipe.toml, plots, predictions_val.csv)
    sections  one builder per topic, each returning HTML (`pages.section`)
    write     `pages.page` -> the file, atomically

Everything is inlined (plots and ~96 px thumbnails as data URIs): the page
opens offline, without JavaScript, and reads on a phone-width screen. It is
built from the run folder alone, so `finetune report RUN` can rebuild it for
any finished run. Other pictures (explanation maps, say) join the page
through `extra`: (title, tiles) groups, each drawn as one more gallery.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune_cli.config import REPORT, SCAN, ReportConfig
from finetune_cli.data.images import UnusableImage, open_checked, read_image_file, to_rgb
from finetune_cli.errors import ModelFileError
from finetune_cli.files import read_json
from finetune_cli.pages.html import Tile, figure, page, preformatted, section, table, tiles, write_page
from finetune_cli.runs.run import read_predictions, single_label_only
from finetune_cli.runs.write import predictions_frame

#: The page `train` writes into the run folder.
REPORT_FILE = "report.html"
#: (title, tiles) groups drawn after the run's own sections (explanation maps and the like).
Extra = Sequence[tuple[str, Sequence[Tile]]]


def write_report(folder, extra: Extra = (), config: ReportConfig = REPORT) -> Path:
    """Build `folder/report.html` from the finished run in `folder`; returns its path.

    Raises:
        ModelFileError: `folder` is not a finished run (no readable metrics.json).
        OutputError: the page cannot be written.
    """
    folder = Path(folder).expanduser().absolute()
    return write_page(folder / REPORT_FILE, run_document(folder, extra, config))


def run_document(folder: Path, extra: Extra = (), config: ReportConfig = REPORT) -> str:
    """The whole report of the run in `folder`, as an HTML document."""
    metrics = _read_json(folder / "metrics.json", required=True)
    single_label_only(folder, "report")
    plan = _read_json(folder / "plan.json") or {}
    frame = read_predictions(folder / "predictions_val.csv")
    classes = list(metrics.get("classes") or [])
    parts = [diagnosis_section(metrics)]  # results first, then how they were reached
    if frame is not None and classes:
        name = "out-of-fold validation" if _out_of_fold(metrics) else "validation"
        parts += prediction_sections(frame, classes, name, _png(folder / "confusion.png"), config)
    else:
        parts.append(section("Validation", *_figures(folder, "confusion.png"),
                             notes=["predictions_val.csv is missing (a run from an older version): no per-class "
                                    "scores and no gallery of mistakes; retrain to get them"]))
    parts += [section(title, tiles(items)) for title, items in extra]
    parts += [learning_curve_section(folder, metrics.get("learning_curve")), curves_section(folder),
              calibration_section(folder, metrics.get("calibration")),
              test_section(metrics.get("test")), profile_section(metrics.get("profile"), frame),
              plan_section(plan), recipe_section(folder)]
    return page(f"Run report: {folder.name}", *[p for p in parts if p], notes=summary_notes(folder, metrics, plan))


def write_evaluation(path: Path, run, scan, probs, ok, result: dict, extra: Extra = (),
                     config: ReportConfig = REPORT) -> Path:
    """The `evaluate --html` page: scores, confusion matrix, per-class scores, mistakes of `run` on `scan`.

    Args:
        run: the `run.Run` evaluated; scan: the labelled folder's scan.
        probs: (n, k) probabilities of `scan.images`; ok: (n,) bool, False for images not read.
        result: `predict.scores` of them (accuracy, ece, nll, skipped, tta).
    """
    kept = [r for r, good in zip(scan.images, ok) if good]
    labels = [run.classes.index(r.label) for r in kept]
    frame = predictions_frame([str(scan.root / r.path) for r in kept], run.classes, labels, probs[ok])
    views = f", mean of {result['tta']} views per image" if result.get("tta", 1) > 1 else ""
    notes = [f"model: {run.path}", f"folder: {scan.root}", score_line(result, f"images{views}")]
    if result.get("n_training_images"):
        notes.append(f"{result['n_training_images']} of these images trained this model (same content): the "
                     "accuracy is not a held-out score" + (f"; on the other {result['n_held_out']}: "
                                                           f"{result['held_out_accuracy']:.1%}"
                                                           if "n_held_out" in result else ""))
    parts = prediction_sections(frame, run.classes, "evaluation", None, config)
    if result.get("skipped"):
        parts.append(section("Skipped files", table(result["skipped"], ["path", "reason"])))
    parts += [section(title, tiles(items)) for title, items in extra]
    return write_page(Path(path), page(f"Evaluation: {scan.root.name}", *parts, notes=notes))


def prediction_sections(frame, classes: list[str], name: str, confusion_png: bytes | None,
                        config: ReportConfig = REPORT) -> list[str]:
    """Confusion matrix, per-class scores and the gallery of mistakes, from a `predictions_frame`.

    Args:
        frame: one row per image (path, true, predicted, probability, p_true).
        name: what the images are ("validation", "evaluation"), for titles.
        confusion_png: a ready picture of the matrix; None: drawn here.
    """
    from sklearn.metrics import confusion_matrix

    truth, guess = _indices(frame["true"], classes), _indices(frame["predicted"], classes)
    matrix = confusion_matrix(truth, guess, labels=list(range(len(classes))))
    if confusion_png is None:
        from finetune_cli.pages.figures import confusion_figure, figure_png

        confusion_png = figure_png(confusion_figure(matrix, classes))
    accuracy = float(np.mean(truth == guess)) if len(frame) else 0.0
    note = f"{len(frame)} {name} images, accuracy {accuracy:.1%}; rows: true class, columns: predicted"
    return [section(f"Confusion matrix ({name})", figure(confusion_png), notes=[note]),
            section(f"Per-class scores ({name})", table(class_rows(matrix, classes), CLASS_COLUMNS)),
            gallery_section(frame, name, config)]


CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support", "mistaken for"]


def class_rows(matrix: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 (scikit-learn), support and the commonest wrong prediction per true class.

    Args:
        matrix: (k, k) counts, rows true, columns predicted.
    """
    from sklearn.metrics import precision_recall_fscore_support

    truth = np.repeat(np.arange(len(classes)), matrix.sum(1))
    guess = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in matrix]) if len(truth) else truth
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, guess, labels=list(range(len(classes))), zero_division=0)
    rows = []
    for c, name in enumerate(classes):
        wrong = matrix[c].copy()
        wrong[c] = 0
        confused = f"{classes[wrong.argmax()]} ({wrong.max()})" if wrong.max() > 0 else ""
        rows.append({"class": name, "precision": float(precision[c]), "recall": float(recall[c]),
                     "f1": float(f1[c]), "support": int(support[c]), "mistaken for": confused})
    return rows


def gallery_section(frame, name: str, config: ReportConfig = REPORT) -> str:
    """Thumbnails of the misclassified images, the most confident mistakes first (`config.gallery_max`
    at most); images no longer on disk are listed in a table instead, and the page says so."""
    wrong = frame[frame["true"] != frame["predicted"]].sort_values("probability", ascending=False, kind="stable")
    title = f"Misclassified {name} images"
    if wrong.empty:
        return section(title, notes=[f"none: every {name} image is classified correctly"])
    notes = [f"{len(wrong)} of {len(frame)} images, the most confident mistakes first"]
    shown = wrong.head(config.gallery_max)
    if len(wrong) > len(shown):
        notes.append(f"showing the first {len(shown)}; predictions_val.csv lists them all")
    pictures, gone = [], []
    for row in shown.itertuples(index=False):
        thumb = thumbnail(row.path, config)
        if thumb is None:
            gone.append({"path": row.path, "true": row.true, "predicted": row.predicted,
                         "probability": float(row.probability)})
            continue
        caption = (f"true: {row.true}\npredicted: {row.predicted} ({row.probability:.0%})\n"
                   f"p(true) {row.p_true:.0%}\n{Path(row.path).name}")
        pictures.append(Tile(thumb, caption, flagged=True))
    parts = [tiles(pictures)] if pictures else []
    if gone:
        notes.append(f"{len(gone)} image(s) could not be read any more (moved or deleted): listed without a picture")
        parts.append(table(gone, ["path", "true", "predicted", "probability"]))
    return section(title, *parts, notes=notes)


def thumbnail(path: str, config: ReportConfig = REPORT) -> bytes | None:
    """A JPEG of the image at `path`, upright RGB, its longest side `config.thumbnail_px`; None if unreadable."""
    from PIL import Image

    side = config.thumbnail_px
    try:
        image = open_checked(read_image_file(path, SCAN.max_bytes), SCAN.max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (side, side))  # decode big photos at a fraction of their size
        image = to_rgb(image, (255, 255, 255))
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=config.thumbnail_quality)
        return out.getvalue()
    except (OSError, ValueError, UnusableImage, Image.DecompressionBombError):
        return None


def _out_of_fold(metrics: dict) -> bool:
    """Whether the run's validation figures are out-of-fold probabilities of its training images."""
    validation = metrics.get("validation")
    return isinstance(validation, dict) and validation.get("method") == "out-of-fold"


def summary_notes(folder: Path, metrics: dict, plan: dict) -> list[str]:
    """The lines under the title: what was trained on what, and how well."""
    lines = [f"run folder: {folder}"]
    base = plan.get("base")
    if base:
        lines.append(f"base: {base} ({plan.get('weights')} weights, {plan.get('image_size')} px)")
    if "val_accuracy" in metrics:
        kind = "out-of-fold (cross-validation on every image)" if _out_of_fold(metrics) else "validation"
        lines.append(f"{metrics.get('strategy', '?')} on {metrics.get('n_train', '?')} images: {kind} "
                     f"accuracy {metrics['val_accuracy']:.1%}{_interval(metrics.get('val_accuracy_interval95'))} on "
                     f"{metrics.get('n_val', '?')}"
                     + (f"; test accuracy {metrics['test_accuracy']:.1%}" if "test_accuracy" in metrics else ""))
    if metrics.get("kept") == "linear-head":
        lines.append("kept the linear head: fine-tuning did not beat it on the validation images")
    timings = metrics.get("timings_s") or {}
    if "total" in timings:
        lines.append(f"trained in {timings['total']:.1f} s")
    return lines


def profile_section(profile: dict | None, frame) -> str:
    """The dataset: images per class (and in the validation split), sizes, formats, warnings."""
    if not profile:
        return section("Dataset", notes=["metrics.json of this run holds no dataset profile (an older version)"])
    val = frame["true"].value_counts().to_dict() if frame is not None else {}
    rows = [{"class": c["name"], "images": c["count"], "share": f"{c['share']:.0%}",
             "validation": val.get(c["name"], "")} for c in profile.get("classes", [])]
    notes = [f"{profile.get('n_images')} images in {profile.get('n_classes')} classes, "
             f"{profile.get('size_category')} data (largest class / smallest: {profile.get('imbalance')})"]
    sizes = profile.get("image_size") or {}
    if sizes:
        notes.append("image sides (min / median / max): " + "; ".join(
            f"{axis} {v['min']} / {v['median']} / {v['max']} px" for axis, v in sizes.items()))
    if profile.get("formats"):
        notes.append("formats: " + ", ".join(f"{k} {v}" for k, v in profile["formats"].items()))
    notes += [f"warning: {w}" for w in profile.get("warnings", [])]
    return section("Dataset", table(rows, ["class", "images", "share", "validation"]), notes=notes)


def plan_section(plan: dict) -> str:
    """The similarity evidence (probe accuracy per stage) and the plan read from it, with its reason."""
    decided, evidence = plan.get("plan") or {}, plan.get("similarity") or {}
    if not decided:
        return ""
    notes = [f"plan: {decided.get('strategy')} (recipe '{decided.get('recipe')}'): {decided.get('reason')}"]
    if evidence:
        notes.append(f"similarity to the pretraining data: {evidence.get('verdict')}: {evidence.get('reason')}"
                     + (" (stated, not measured)" if evidence.get("forced") else ""))
    notes += [f"suggestion: {s}" for s in decided.get("suggestions", [])]
    keys = ["size_category", "similarity", "feature_stage", "train_stages", "top_stages", "augmentation",
            "feature_views", "epochs", "learning_rates"]
    rows = [{"setting": k.replace("_", " "), "value": _text(decided[k])} for k in keys if k in decided]
    parts = [table(rows, ["setting", "value"])]
    probes = evidence.get("stage_accuracy") or {}
    if probes:
        best = str(evidence.get("best_stage"))
        parts.append(table([{"stage": s + (" (best)" if s == best else ""), "probe accuracy": float(a)}
                            for s, a in probes.items()], ["stage", "probe accuracy"]))
    return section("Plan and evidence", *parts, notes=notes)


def recipe_section(folder: Path) -> str:
    try:
        text = (folder / "recipe.toml").read_text("utf-8")
    except (OSError, ValueError):
        return ""
    return section("Recipe (recipe.toml)", preformatted(text))


def learning_curve_section(folder: Path, record: dict | None) -> str:
    """The learning curve and label forecast (metrics["learning_curve"], `analysis.curve`): its verdict, the
    figure, the forecast and what doubling each class would add."""
    if not record:
        return ""
    notes = [record.get("message", "")]
    if not record.get("forecast"):
        return section("Learning curve and label forecast", notes=notes)
    notes.append(f"the {record.get('model', 'linear head')} (C = {record.get('C', 0):.3g}) refitted on nested "
                 "fractions of the training images, each image scored out-of-fold; a power law in images per class "
                 "fitted to the error; 95 % intervals from bootstrap resamples of the images")
    ahead = [{"labels": f"{r['multiple']:g}x", "images per class": r["images_per_class"],
              "expected accuracy": f"{r['accuracy']:.1%}", "95 % interval": f"{r['low']:.1%}-{r['high']:.1%}"}
             for r in record["forecast"]]
    classes = [{"class": r["class"], "images": r["images"], "recall": f"{r['recall']:.1%}",
                "recall if doubled": f"{r['recall_if_doubled']:.1%}",
                "points if doubled": f"{100 * r['gain_if_doubled']:.1f}"} for r in record.get("per_class", [])]
    return section("Learning curve and label forecast", *_figures(folder, "learning_curve.png"),
                   table(ahead, list(ahead[0])), table(classes, list(classes[0]) if classes else []), notes=notes)


def curves_section(folder: Path) -> str:
    """curves.png, or the curves drawn again from history.csv where the picture is gone."""
    png = _png(folder / "curves.png")
    if png is None:
        try:
            import pandas as pd

            from finetune_cli.pages.figures import curves_figure, figure_png

            png = figure_png(curves_figure(pd.read_csv(folder / "history.csv").to_dict("records")))
        except (OSError, ValueError, KeyError):
            return ""
    return section("Training curves", figure(png, "from history.csv"))


def calibration_section(folder: Path, facts: dict | None) -> str:
    """The reliability diagram and the temperature / ECE / NLL facts of metrics.json, where calibrated."""
    if not facts:
        return ""
    applied = "applied" if facts.get("applied") else "not applied (it did not lower the validation NLL)"
    notes = [f"temperature {facts.get('temperature', 1):.3g}, {applied}; fitted on {facts.get('n_val')} "
             f"validation images"]
    rows = [{"measure": f"ECE ({facts.get('ece_bins')} bins)", "before": facts.get("ece_before"),
             "after": facts.get("ece_after")},
            {"measure": "NLL (nats)", "before": facts.get("nll_before"), "after": facts.get("nll_after")}]
    return section("Calibration", *_figures(folder, "reliability.png"), table(rows, ["measure", "before", "after"]),
                   notes=notes)


def test_section(test: dict | None) -> str:
    """The --test-dir scores, as `evaluate` gives them."""
    if not test:
        return ""
    note = score_line(test, "test images")
    return section("Test folder", table(test.get("per_class", []), ["class", "precision", "recall", "f1", "support"]),
                   notes=[note])


def _interval(span) -> str:
    return f" (95 % interval {span[0]:.1%}-{span[1]:.1%})" if span else ""


def score_line(scores: dict, what: str) -> str:
    """One line of `analysis.scores.scores`: accuracy, macro-F1 and balanced accuracy with their 95 % intervals
    (when the scores carry them: runs from before had none), ECE, NLL."""
    def shown(name: str, percent: bool) -> str:
        value, span = scores[name], scores.get(f"{name}_interval95")
        text = f"{value:.1%}" if percent else f"{value:.3f}"
        return text + (f" (95 % interval {span[0]:.1%}-{span[1]:.1%})" if percent and span else
                       f" ({span[0]:.3f}-{span[1]:.3f})" if span else "")
    parts = [f"accuracy {shown('accuracy', True)} on {scores['n_images']} {what}"]
    if "macro_f1" in scores:
        parts.append(f"macro-F1 {shown('macro_f1', False)}, balanced accuracy {shown('balanced_accuracy', True)}")
    return "; ".join(parts + [f"ECE {scores['ece']:.1%}, NLL {scores['nll']:.3f}"])


def diagnosis_section(metrics: dict) -> str:
    """The verdict on the training history and every note of the run."""
    verdict = metrics.get("diagnosis") or {}
    notes = [f"{verdict['verdict']}: {verdict['reason']}"] if verdict else []
    if verdict.get("next_step") and verdict.get("verdict") != "healthy":
        notes.append(f"next: {verdict['next_step']}")
    notes += [f"note: {n}" for n in metrics.get("notes", []) if not n.startswith("diagnosis:")]
    return section("Diagnosis", notes=notes or ["no notes"])


def _figures(folder: Path, *names: str) -> list[str]:
    return [figure(png) for png in map(_png, (folder / n for n in names)) if png is not None]


def _png(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path, required: bool = False):
    try:
        return read_json(path)
    except (OSError, ValueError):
        if required:
            raise ModelFileError(f"{path.parent} is not a finished run: {path.name} is missing or unreadable "
                                 "(give the --out folder of a finished `finetune train`)") from None
        return None


def _indices(names, classes: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(n, -1) for n in names], dtype=np.int64)


def _text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)
