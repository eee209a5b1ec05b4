"""Scores of predictions against labels, and the choice of a best setting from cross-validated scores."""

from __future__ import annotations

import numpy as np

from finetune_cli.analysis.calibration import ece, nll
from finetune_cli.config import TRAIN
from finetune_cli.data.scan import Scan
from finetune_cli.files import shown


def best_c(scores: list[dict]) -> float:
    """The C of the best row: highest cross-validated accuracy, ties (to 1e-6) by the lower log loss, then
    the smaller C. Accuracy on a few dozen images ties often; the log loss separates the tied Cs."""
    return max(scores, key=lambda s: (round(s["cv_accuracy"], 6), -round(s.get("cv_log_loss", 0.0), 6),
                                      -s["C"]))["C"]


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
