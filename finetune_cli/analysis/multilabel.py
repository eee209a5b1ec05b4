"""Scores of a multi-label classifier: one probability per label, a threshold per label.

`multilabel_scores` is what `train` (validation, test) and `evaluate` report; `best_thresholds` chooses the
thresholds on out-of-fold (or validation) probabilities. No TensorFlow.
"""

from __future__ import annotations

import numpy as np


def average_precision(truth: np.ndarray, probs: np.ndarray) -> float:
    """Average precision (0-1) of one label: truth (n,) in {0, 1}, probs (n,); NaN with no positive."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(truth, probs)) if truth.any() else float("nan")


def mean_average_precision(truth: np.ndarray, probs: np.ndarray) -> float:
    """The mean over labels with a positive of their average precision (0-1): truth, probs (n, L)."""
    values = [average_precision(truth[:, j], probs[:, j]) for j in range(truth.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def best_thresholds(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per label, the threshold (L,) in (0, 1) with the best F1 of `probs >= t` on these images: the midpoint
    between the lowest probability called positive and the next below it; 0.5 for a label with no positive.

    truth, probs: (n, L); probs in [0, 1], from models that did not train on these images (out-of-fold).
    """
    thresholds = np.full(truth.shape[1], 0.5)
    for j in range(truth.shape[1]):
        y, p = truth[:, j] > 0, probs[:, j].astype(np.float64)
        if not y.any():
            continue
        order = np.argsort(-p, kind="stable")
        hits = np.cumsum(y[order])  # true positives when the top k are called positive, k = 1..n
        f1 = 2 * hits / (np.arange(1, len(p) + 1) + y.sum())
        k = int(np.argmax(f1))
        below = p[order[k + 1]] if k + 1 < len(p) else 0.0
        thresholds[j] = float(np.clip((p[order[k]] + below) / 2, 1e-6, 1 - 1e-6))
    return thresholds


def multilabel_scores(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str],
                      guess: np.ndarray | None = None) -> dict:
    """Micro/macro F1, mean average precision, subset accuracy and per-label scores.

    Args:
        truth: (n, L) multi-hot; probs: (n, L) in [0, 1]; thresholds: (L,); labels: the L names.
        guess: (n, L) the predicted sets, when they were not decided by `thresholds` (`cross_fitted`).

    Returns:
        {"n_images", "micro_f1", "macro_f1" (over labels with support), "mean_average_precision",
         "subset_accuracy" (the predicted set is exactly the true one), "hamming_loss",
         "per_label": {name: {"precision", "recall", "f1", "support", "average_precision", "threshold"}}}.
    """
    from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support

    truth = truth.astype(int)
    guess = (probs >= thresholds if guess is None else guess).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(truth, guess, average=None, zero_division=0)
    present = support > 0
    per_label = {name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                        "support": int(support[j]), "average_precision": average_precision(truth[:, j], probs[:, j]),
                        "threshold": float(thresholds[j])} for j, name in enumerate(labels)}
    return {"n_images": int(len(truth)), "micro_f1": float(f1_score(truth, guess, average="micro", zero_division=0)),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "mean_average_precision": mean_average_precision(truth, probs),
            "subset_accuracy": float((truth == guess).all(1).mean()), "hamming_loss": float(hamming_loss(truth, guess)),
            "per_label": per_label}


def cross_fitted(truth: np.ndarray, probs: np.ndarray, folds: list) -> np.ndarray:
    """Predicted sets (n, L) bool of out-of-fold probabilities, each fold's images thresholded with the
    thresholds `best_thresholds` chooses on the other folds' images: an F1 that did not choose its own
    thresholds. folds: (train rows, test rows) pairs covering every row once as a test row."""
    guess = np.zeros(truth.shape, bool)
    for train, test in folds:
        guess[test] = probs[test] >= best_thresholds(truth[train], probs[train])
    return guess


def label_sets(probs: np.ndarray, thresholds: np.ndarray, labels: list[str], separator: str) -> list[str]:
    """Each image's predicted labels (probability >= its label's threshold), in label order, joined by
    `separator`; "" for an image with none."""
    return [separator.join(name for name, on in zip(labels, row) if on) for row in probs >= thresholds]
