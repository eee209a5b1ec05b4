"""Prediction sets with a coverage guarantee: split conformal prediction with adaptive prediction sets
(APS, randomised; Romano, Sesia & Candes, "Classification with valid and adaptive coverage", NeurIPS 2020).

    calibration: n held-out images, probabilities (n, k), true labels (n,)
      score s_i = (mass of the classes ranked above the true one) + u_i * p_true,   u_i ~ U(0, 1)
      q = the ceil((n + 1) * coverage)-th smallest score
    a new image: its classes in decreasing probability, each kept while (mass above it) + u * p <= q;
      the most probable class is always kept, so a set is never empty

When the calibration and the new images are exchangeable, P(true class in the set) >= coverage
(Romano et al., Theorem 1), and with the randomisation at most coverage + 1/(n + 1) plus the little the
always-kept top class adds. With n calibration images a coverage above n / (n + 1) cannot be promised:
it is refused, saying how many images it would take.
"""

from __future__ import annotations

import math

import numpy as np

from finetune_cli.errors import SettingsError

METHOD = "split conformal, randomised APS (Romano, Sesia & Candes 2020)"


def checked_coverage(coverage: float | str) -> float:
    """`coverage` (or its text) as a float strictly between 0 and 1.

    Raises:
        SettingsError: anything else.
    """
    try:
        value = None if isinstance(coverage, bool) else float(coverage)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 < value < 1:
        raise SettingsError(f"Expected --coverage between 0 and 1 (e.g. 0.9). Received: {coverage!r}")
    return value


def scores(probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Conformity scores (n,) in [0, 1] of the true labels (n,) under probabilities (n, k)."""
    u = np.random.default_rng(seed).uniform(size=len(labels))
    p_true = probs[np.arange(len(labels)), labels]
    above = np.where(probs > p_true[:, None], probs, 0.0).sum(1)
    return above + u * p_true


def threshold(calibration: np.ndarray, coverage: float) -> float:
    """q: the ceil((n + 1) * coverage)-th smallest of the n calibration scores.

    Raises:
        SettingsError: too few calibration images for `coverage` (n < coverage / (1 - coverage)).
    """
    n = len(calibration)
    rank = math.ceil((n + 1) * coverage - 1e-9)
    if rank > n:
        needed = math.ceil(coverage / (1 - coverage) - 1e-9)
        raise SettingsError(f"--coverage {coverage:g} needs at least {needed} validation images; this run has {n}, "
                            f"so at most {n / (n + 1):.3f} can be promised (or train with a larger --val-dir)")
    return float(np.sort(calibration)[rank - 1])


def prediction_sets(probs: np.ndarray, q: float, seed: int = 1) -> list[np.ndarray]:
    """For each row of probabilities (m, k): the class indices of its set, most probable first."""
    u = np.random.default_rng(seed).uniform(size=len(probs))
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    above = np.cumsum(ranked, axis=1) - ranked
    keep = above + u[:, None] * ranked <= q
    keep[:, 0] = True
    return [row[mask] for row, mask in zip(order, keep)]


def calibrated_sets(cal_probs: np.ndarray, cal_labels: np.ndarray, probs: np.ndarray, coverage: float
                    ) -> tuple[list[np.ndarray], dict]:
    """(sets for `probs` (m, k), facts {"coverage_target", "n_calibration", "threshold", "method"}) from the
    calibration probabilities (n, k) and labels (n,).

    Raises:
        SettingsError: coverage out of (0, 1), or too few calibration images for it.
    """
    coverage = checked_coverage(coverage)
    q = threshold(scores(cal_probs, cal_labels), coverage)
    facts = {"coverage_target": coverage, "n_calibration": int(len(cal_labels)), "threshold": round(q, 6),
             "method": METHOD}
    return prediction_sets(probs, q), facts
