"""Writing a finished run into its folder: the model, labels, history, metrics, figures and the
validation predictions (`write_run`), metrics.json last.
"""

from __future__ import annotations

import numpy as np

from finetune_cli.analysis.scores import bootstrap_intervals, class_scores
from finetune_cli.files import shown
from finetune_cli.pages.figures import confusion_figure, curves_figure, learning_curve_figure, reliability_figure
from finetune_cli.runs.folder import RunFolder
from finetune_cli.runs.run import PROB_PREFIX


def write_run(run: RunFolder, result, classes: list[str], image_size: int, facts: dict, timings,
              val_paths: list[str] | None = None) -> dict:
    """Write a fitted result into the run folder: model, history, plots, then metrics.json (last).

    Args:
        result: a `train.context.TrainResult`.
        facts: metrics known before writing (strategy, similarity, counts, test scores).
        timings: () -> {step: seconds}, read after the model is saved.
        val_paths: the validation images' absolute paths, in `result.val_probs` order: written with
            their predictions to predictions_val.csv; None: no such file.

    Returns:
        The metrics, as written to metrics.json.
    """
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    probs, labels = result.val_probs, result.val_labels
    run.save_model(result.model, facts={"classes": classes, "image_size": image_size})
    matrix = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(classes))))
    run.write_frame("history.csv", pd.DataFrame(result.history))
    run.save_figure("curves.png", curves_figure(result.history))
    run.save_figure("confusion.png", confusion_figure(matrix, classes))
    if result.calibration is not None:
        run.save_figure("reliability.png", reliability_figure(result.calibration))
        facts = {**facts, "calibration": result.calibration.facts()}
    if facts.get("learning_curve", {}).get("points"):
        run.save_figure("learning_curve.png", learning_curve_figure(facts["learning_curve"]))
    if val_paths is not None:
        run.write_frame("predictions_val.csv", predictions_frame(val_paths, classes, labels, probs))
    metrics = {**facts, "val_accuracy": float(np.mean(probs.argmax(1) == labels)),
               **validation_intervals(np.asarray(labels), probs.argmax(1)), "classes": classes,
               "learning_rates": result.plan.learning_rates, "notes": result.notes, "timings_s": timings()}
    run.write_json("metrics.json", metrics)
    return metrics


def write_multilabel_run(run: RunFolder, scan, fitted, image_size: int, facts: dict, notes: list, timings,
                         out_of_fold: bool = True) -> dict:
    """Write a multi-label run (`train.multilabel.MultiLabelFit`): the model (its facts: task, thresholds,
    separator), labels.json, skipped.csv, trained_on.txt, history.csv, predictions_val.csv (path, true and
    predicted label sets, `PROB_PREFIX` + label per label), then metrics.json (last); returns the metrics.

    facts: what is known before writing (strategy, counts, test scores); `scan`: the training scan;
    `out_of_fold`: validated out-of-fold (else on a --val-dir)."""
    import pandas as pd

    from finetune_cli.analysis.multilabel import label_sets, multilabel_scores
    from finetune_cli.runs.run import TRAINED_ON

    labels, sep, thresholds = list(scan.classes), scan.separator, fitted.thresholds
    run.save_model(fitted.model, facts={"classes": labels, "image_size": image_size, "task": "multi-label",
                                        "thresholds": [float(t) for t in thresholds], "separator": sep})
    run.write_json("labels.json", labels)
    run.write_frame("skipped.csv", pd.DataFrame([{"path": shown(s.path), "reason": shown(s.reason)}
                                                 for s in scan.skipped], columns=["path", "reason"]))
    trained = fitted.trained_on if fitted.trained_on is not None else {r.digest for r in scan.images}
    run.write_text(TRAINED_ON, "".join(f"{d}\n" for d in sorted(trained)))
    run.write_frame("history.csv", pd.DataFrame(fitted.history))
    frame = pd.DataFrame({"path": [shown(p) for p in fitted.val_paths],
                          "true": label_sets(fitted.val_truth, 0.5, labels, sep),
                          "predicted": label_sets(fitted.val_guess, 0.5, labels, sep)})
    probs = pd.DataFrame(fitted.val_probs.round(6), columns=[PROB_PREFIX + name for name in labels])
    run.write_frame("predictions_val.csv", pd.concat([frame, probs], axis=1))
    val = multilabel_scores(fitted.val_truth, fitted.val_probs, thresholds, labels, guess=fitted.val_guess)
    chosen = "on the other folds' images" if out_of_fold else "on these images"
    metrics = {**facts, "task": "multi-label", "separator": sep,
               **{f"val_{k}": v for k, v in val.items() if k not in ("n_images", "per_label")},
               "validation": {"method": "out-of-fold" if out_of_fold else "held-out", "n_images": val["n_images"],
                              "thresholds_chosen": chosen, "per_label": val["per_label"]},
               "thresholds": dict(zip(labels, [round(float(t), 6) for t in thresholds])), "C": fitted.C,
               "candidates": fitted.candidates, "classes": labels, "timings_s": timings(),
               "notes": notes + ["report.html is not written for multi-label runs: metrics.json holds the "
                                 "per-label scores"]}
    run.write_json("metrics.json", metrics)
    return metrics


def validation_intervals(labels: np.ndarray, guess: np.ndarray) -> dict:
    """metrics.json's val_accuracy_interval95, val_macro_f1 (+ interval), val_balanced_accuracy (+ interval):
    `analysis.scores` on the validation images; {} without any."""
    if not len(labels):
        return {}
    present = sorted(set(labels.tolist()))
    point, span = class_scores(labels, guess, present), bootstrap_intervals(labels, guess, present)
    return {"val_accuracy_interval95": span["accuracy"], "val_macro_f1": point["macro_f1"],
            "val_macro_f1_interval95": span["macro_f1"], "val_balanced_accuracy": point["balanced_accuracy"],
            "val_balanced_accuracy_interval95": span["balanced_accuracy"]}


def predictions_frame(paths: list[str], classes: list[str], labels, probs):
    """One row per image: path, true, predicted, probability (of the prediction), p_true (of the truth), then
    one column per class, `PROB_PREFIX` + its name, in the model's order (what prediction sets calibrate on).

    Args:
        paths: n paths (shown as printable text); labels: (n,) class indices; probs: (n, k) in [0, 1].
    """
    import numpy as np
    import pandas as pd

    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    guess, rows = probs.argmax(1), np.arange(len(labels))
    frame = pd.DataFrame({"path": [shown(p) for p in paths], "true": [classes[i] for i in labels],
                          "predicted": [classes[i] for i in guess], "probability": probs[rows, guess].round(6),
                          "p_true": probs[rows, labels].round(6)})
    columns = pd.DataFrame(probs.round(6), columns=[PROB_PREFIX + name for name in classes])
    return pd.concat([frame, columns], axis=1)


