"""Scores of predictions against labels, and the choice of a best setting from cross-validated scores."""

from __future__ import annotations

import numpy as np

from finetune_cli.analysis.calibration import ece, nll
from finetune_cli.config import TRAIN
from finetune_cli.data.scan import Scan
from finetune_cli.files import shown


def best_c(scores: list[dict], metric: str = "accuracy") -> float:
    """The C of the best row: highest cross-validated `metric` (the row's "cv_<metric>": "accuracy", or
    "macro_f1" for imbalanced classes), ties (to 1e-6) by the lower log loss, then the smaller C. Accuracy on
    a few dozen images ties often; the log loss separates the tied Cs."""
    return max(scores, key=lambda s: (round(s[f"cv_{metric}"], 6), -round(s.get("cv_log_loss", 0.0), 6),
                                      -s["C"]))["C"]


#: What a run chooses by when its training classes are imbalanced `imbalance_warn_ratio` x or more (else
#: accuracy). Macro-F1 rather than balanced accuracy: balanced accuracy is the mean recall, so a model that
#: calls every doubtful image the rare class gains on it at little cost, and class weighting already pushes
#: that way; macro-F1 charges those false alarms to the rare class's precision.
IMBALANCED_METRIC = "macro_f1"


def selection_metric(balanced: bool) -> str:
    """The score a run's choices maximise: "macro_f1" when its classes are imbalanced (`balanced`, the
    flag that also weights them), else "accuracy"."""
    return IMBALANCED_METRIC if balanced else "accuracy"


def metric_value(metric: str, truth: np.ndarray, guess: np.ndarray) -> float:
    """`metric` ("accuracy" | "macro_f1" | "balanced_accuracy", 0-1) of int predictions (n,) against truth
    (n,), over the classes present in the truth."""
    return float(resampled_metric(metric, truth[None, :], guess[None, :], sorted(set(truth.tolist())))[0])


def resampled_metric(metric: str, truth: np.ndarray, guess: np.ndarray, labels: list[int]) -> np.ndarray:
    """`metric_value` of each of b resamples: truth and guess (b, n) -> (b,), over the classes `labels`."""
    if metric == "accuracy":
        return (truth == guess).mean(1)
    f1, recall = _per_class(truth, guess, labels)
    if metric == "macro_f1":
        return f1.mean(1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(recall, 1)


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
    point, interval = class_scores(truth, guess, present), bootstrap_intervals(truth, guess, present)
    return {
        "accuracy": float((truth == guess).mean()),
        "accuracy_interval95": interval["accuracy"],
        "macro_f1": point["macro_f1"], "macro_f1_interval95": interval["macro_f1"],
        "balanced_accuracy": point["balanced_accuracy"], "balanced_accuracy_interval95": interval["balanced_accuracy"],
        "interval_method": f"bootstrap percentile, {BOOTSTRAP_RESAMPLES} resamples of the images",
        "ece": ece(probs[ok], truth, bins),
        "nll": nll(probs[ok], truth),
        "n_images": int(ok.sum()),
        "tta": tta,
        "per_class": [
            {"class": classes[c], "precision": round(float(p), 4), "recall": round(float(r), 4),
             "f1": round(float(f), 4), "f1_interval95": interval["f1"][j], "support": int(s)}
            for j, (c, p, r, f, s) in enumerate(zip(present, precision, recall, f1, support))
        ],
        "classes": classes,
        "confusion": confusion_matrix(truth, guess, labels=list(range(len(classes)))).tolist(),
        "skipped": [{"path": shown(s.path), "reason": shown(s.reason)} for s in scan.skipped],
    }


#: Resamples of every bootstrap interval (percentile method: the 2.5th and 97.5th of the resampled scores).
BOOTSTRAP_RESAMPLES = 1000


def class_scores(truth: np.ndarray, guess: np.ndarray, labels: list[int]) -> dict:
    """{"macro_f1", "balanced_accuracy"} (0-1) of predictions (n,) against truth (n,), over the classes
    `labels` (those present in the truth): F1 and recall per class, averaged with equal weight."""
    f1, recall = _per_class(truth[None, :], guess[None, :], labels)
    return {"macro_f1": float(f1.mean()), "balanced_accuracy": float(np.nanmean(recall))}


def bootstrap_intervals(truth: np.ndarray, guess: np.ndarray, labels: list[int], *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, chunk: int = 50) -> dict:
    """95 % bootstrap intervals: {"accuracy", "macro_f1", "balanced_accuracy": [low, high], "f1": [[low,
    high] per class of `labels`]}, resampling the n images with replacement (`chunk` resamples at a time,
    so memory stays at chunk x n)."""
    rng = np.random.default_rng(seed)
    accuracy, macro, balanced, per_class = [], [], [], []
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(truth), (min(chunk, resamples - start), len(truth)))
        t, g = truth[rows], guess[rows]
        f1, recall = _per_class(t, g, labels)
        accuracy.append((t == g).mean(1))
        macro.append(f1.mean(1))
        with np.errstate(invalid="ignore"):
            balanced.append(np.nanmean(recall, 1))
        per_class.append(f1)
    span = lambda x: [round(float(v), 4) for v in np.nanpercentile(x, [2.5, 97.5], axis=0)]  # noqa: E731
    f1 = np.concatenate(per_class)
    return {"accuracy": span(np.concatenate(accuracy)), "macro_f1": span(np.concatenate(macro)),
            "balanced_accuracy": span(np.concatenate(balanced)),
            "f1": [span(f1[:, j]) for j in range(len(labels))]}


def _per_class(truth: np.ndarray, guess: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(F1 (b, c), recall (b, c), NaN where the class is absent) of b samples (b, n) for the c `labels`;
    an F1 with nothing to count is 0 (scikit-learn's zero_division=0)."""
    f1, recall = np.zeros((len(truth), len(labels))), np.full((len(truth), len(labels)), np.nan)
    for j, c in enumerate(labels):
        is_c, said_c = truth == c, guess == c
        tp = (is_c & said_c).sum(1)
        denominator = is_c.sum(1) + said_c.sum(1)
        f1[:, j] = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        support = is_c.sum(1)
        recall[:, j] = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
    return f1, recall
