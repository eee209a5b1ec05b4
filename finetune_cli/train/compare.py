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


def compare_on_validation(tuned_probs, tuned_labels, linear_probs, linear_labels, *, seed: int = 0,
                          config: TrainConfig = TRAIN) -> dict:
    """Which to keep, the fine-tuned model or the linear head, and why.

    Args:
        tuned_probs, linear_probs: (n, k) validation probabilities of each.
        tuned_labels, linear_labels: (n,) int labels; the same images in the
            same order when both models saw the same validation set.

    Returns:
        {"kept": "fine-tuned"|"linear-head", "decided_by", "n_val", accuracies,
        cross-entropies, the accuracy difference's interval, "note"}.
    """
    right_t, loss_t = scores(tuned_probs, tuned_labels)
    right_l, loss_l = scores(linear_probs, linear_labels)
    facts = {"n_val": int(len(tuned_labels)),
             "fine_tuned": {"accuracy": float(right_t.mean()), "cross_entropy": float(loss_t.mean())},
             "linear_head": {"accuracy": float(right_l.mean()), "cross_entropy": float(loss_l.mean())}}
    paired = np.array_equal(tuned_labels, linear_labels)
    low, high = (paired_interval(right_t, right_l, config.compare_resamples, config.compare_interval, seed)
                 if paired and len(right_t) else (-1.0, 1.0))
    clear = low > 0 or high < 0
    if clear:
        tuned_wins, decided_by = low > 0, "accuracy"
    else:
        tuned_wins, decided_by = facts["fine_tuned"]["cross_entropy"] < facts["linear_head"]["cross_entropy"], \
            "cross-entropy (accuracies within noise)"
    facts.update(kept="fine-tuned" if tuned_wins else "linear-head", decided_by=decided_by,
                 accuracy_difference_interval=[round(low, 4), round(high, 4)], interval_level=config.compare_interval)
    facts["note"] = _note(facts)
    return facts


def _note(facts: dict) -> str:
    t, l_ = facts["fine_tuned"], facts["linear_head"]
    low, high = facts["accuracy_difference_interval"]
    kept = "the fine-tuned model" if facts["kept"] == "fine-tuned" else "the linear head (fine-tuning did not beat it)"
    return (f"kept {kept}, by {facts['decided_by']}: on {facts['n_val']} validation images, fine-tuned "
            f"{t['accuracy']:.1%} (cross-entropy {t['cross_entropy']:.3f}) vs linear head {l_['accuracy']:.1%} "
            f"({l_['cross_entropy']:.3f}); accuracy difference {facts['interval_level']:.0%} interval "
            f"[{low:+.1%}, {high:+.1%}]")
