"""Two classifiers on the same validation images: which to keep, with the evidence.

Used by fine-tuning to check itself against the linear head it started from.
Accuracy on a small validation split is coarse (one image of 49 is 2
points), so the accuracy difference gets a paired bootstrap interval; when
that interval spans 0, the cross-entropy (a proper score that sees every
probability, not only the argmax) decides instead.
"""

from __future__ import annotations

import numpy as np

from finetune_cli.analysis.calibration import per_image_nll
from finetune_cli.analysis.scores import metric_value, resampled_metric
from finetune_cli.config import TRAIN, TrainConfig


def scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (correct (n,) bool, cross-entropy (n,) nats) of probabilities (n, k) for int labels (n,)."""
    return probs.argmax(1) == labels, per_image_nll(probs, labels)


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, level: float, seed: int = 0) -> tuple[float, float]:
    """The `level` bootstrap interval of mean(a - b) over images resampled in pairs."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = (a.astype(float)[picks] - b.astype(float)[picks]).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))


def paired_metric_interval(truth: np.ndarray, guess_a: np.ndarray, guess_b: np.ndarray, metric: str,
                           resamples: int, level: float, seed: int = 0, chunk: int = 200) -> tuple[float, float]:
    """The `level` bootstrap interval of metric(a) - metric(b) (`analysis.scores.resampled_metric`) over images
    resampled in pairs, `chunk` resamples at a time (memory chunk x n). For "accuracy" it is `paired_interval`."""
    if metric == "accuracy":
        return paired_interval(guess_a == truth, guess_b == truth, resamples, level, seed)
    rng, labels, diffs = np.random.default_rng(seed), sorted(set(truth.tolist())), []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, len(truth), size=(min(chunk, resamples - start), len(truth)))
        t = truth[picks]
        diffs.append(resampled_metric(metric, t, guess_a[picks], labels) - resampled_metric(metric, t, guess_b[picks],
                                                                                              labels))
    tail, diffs = (1 - level) / 2, np.concatenate(diffs)
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))


def compare_on_validation(tuned_probs, tuned_labels, linear_probs, linear_labels, *, seed: int = 0,
                          config: TrainConfig = TRAIN, metric: str = "accuracy") -> dict:
    """Which to keep, the fine-tuned model or the linear head, and why.

    Args:
        tuned_probs, linear_probs: (n, k) validation probabilities of each.
        tuned_labels, linear_labels: (n,) int labels; the same images in the
            same order when both models saw the same validation set.
        metric: what decides first ("accuracy", or "macro_f1" for imbalanced classes,
            `analysis.scores.selection_metric`); the cross-entropy breaks a tie within noise, the
            fine-tuned model winning it only with a loss lower by `config.tie_loss_margin`.

    Returns:
        {"kept": "fine-tuned"|"linear-head", "metric", "decided_by", "n_val", each model's accuracy,
        macro-F1 and cross-entropy, the metric difference's interval ("difference_interval", and
        "accuracy_difference_interval" when the metric is accuracy), "note"}.
    """
    facts = {"n_val": int(len(tuned_labels)), "metric": metric,
             "fine_tuned": _facts(tuned_probs, tuned_labels), "linear_head": _facts(linear_probs, linear_labels)}
    paired = np.array_equal(tuned_labels, linear_labels) and len(tuned_labels) > 0
    low, high = (paired_metric_interval(tuned_labels, tuned_probs.argmax(1), linear_probs.argmax(1), metric,
                                        config.compare_resamples, config.compare_interval, seed)
                 if paired else (-1.0, 1.0))
    if low > 0 or high < 0:
        tuned_wins, decided_by = low > 0, METRIC_NAMES[metric]
    else:
        bar = facts["linear_head"]["cross_entropy"] * (1 - config.tie_loss_margin)
        tuned_wins, decided_by = facts["fine_tuned"]["cross_entropy"] < bar, \
            f"cross-entropy ({METRIC_NAMES[metric]} within noise; lower by {config.tie_loss_margin:.0%} or more wins)"
    span = [round(low, 4), round(high, 4)]
    facts.update(kept="fine-tuned" if tuned_wins else "linear-head", decided_by=decided_by, difference_interval=span,
                 interval_level=config.compare_interval)
    if metric == "accuracy":
        facts["accuracy_difference_interval"] = span
    facts["note"] = _note(facts)
    return facts


#: How notes name each metric.
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}


def _facts(probs: np.ndarray, labels: np.ndarray) -> dict:
    """{"accuracy", "macro_f1", "cross_entropy"} of one model's validation probabilities (n, k)."""
    right, loss = scores(probs, labels)
    guess = probs.argmax(1)
    return {"accuracy": float(right.mean()) if len(right) else 0.0, "cross_entropy": float(loss.mean()),
            "macro_f1": metric_value("macro_f1", labels, guess) if len(right) else 0.0}


def _note(facts: dict) -> str:
    t, l_ = facts["fine_tuned"], facts["linear_head"]
    low, high = facts["difference_interval"]
    key, name = facts["metric"], METRIC_NAMES[facts["metric"]]
    kept = "the fine-tuned model" if facts["kept"] == "fine-tuned" else "the linear head (fine-tuning did not beat it)"
    return (f"kept {kept}, by {facts['decided_by']}: on {facts['n_val']} validation images, fine-tuned "
            f"{name} {t[key]:.1%} (cross-entropy {t['cross_entropy']:.3f}) vs linear head {l_[key]:.1%} "
            f"({l_['cross_entropy']:.3f}); {name} difference {facts['interval_level']:.0%} interval "
            f"[{low:+.1%}, {high:+.1%}]")
