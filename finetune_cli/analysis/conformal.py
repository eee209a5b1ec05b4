"""Prediction sets with a coverage guarantee: split conformal prediction with the least ambiguous set-valued
classifier (LAC; Sadinle, Lei & Wasserman, "Least ambiguous set-valued classifiers with bounded error
levels", JASA 2019; the score of Vovk's split conformal with 1 - softmax).

    calibration: n held-out images, probabilities (n, k), true labels (n,)
      score s_i = 1 - p_true_i
      q = the ceil((n + 1) * coverage)-th smallest score
    a new image's set: every class with probability >= 1 - q, most probable first; when none is, the
      most probable class alone (a set is never empty), or with --empty-sets no class at all

When the calibration and the new images are exchangeable, P(true class in the set) >= coverage (the
split-conformal guarantee), and LAC's sets are the smallest on average among sets with that coverage.
The guarantee is a floor: a set holds at least the top class, so coverage is never below the model's
top-1 accuracy (a model 86 % right asked for 0.8 covers 0.86 with single classes); `--empty-sets` lets a
set be empty where no class is plausible enough, and the coverage is then the target's, as published.
With n calibration images a coverage above n / (n + 1) cannot be promised: it is refused, saying how
many images it would take.

The guarantee is an average over draws of the calibration images; the coverage of one run's sets (one
draw) follows Beta(r, n + 1 - r) with r = ceil((n + 1) * coverage) (Vovk, "Conditional validity of
inductive conformal predictors", ACML 2012; Angelopoulos & Bates, "A gentle introduction to conformal
prediction", 2021, section 3.2). `spread` gives its central 90 %: with 180 calibration images at 0.9 a run's
sets cover between about 0.86 and 0.94 of new images, with 1,000 between 0.88 and 0.92. A test set of m
images adds its own binomial noise on top.

Adaptive prediction sets (APS, Romano et al. 2020) were measured and not kept: on 600 held-out sign
photos their never-empty sets covered 0.967 at a 0.9 target with 1.6-1.7 classes per set (exact
coverage needs empty sets on confident images), against LAC's 0.90-0.93 with 1.1 classes.
"""

from __future__ import annotations

import math

import numpy as np

from finetune_cli.errors import SettingsError

METHOD = "split conformal, LAC (Sadinle, Lei & Wasserman 2019)"


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


def scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Nonconformity scores (n,) in [0, 1] of the true labels (n,) under probabilities (n, k): 1 - p_true."""
    return 1.0 - probs[np.arange(len(labels)), labels]


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


def prediction_sets(probs: np.ndarray, q: float, empty: bool = False) -> list[np.ndarray]:
    """For each row of probabilities (m, k): the class indices of its set (p >= 1 - q), most probable first;
    where no class clears the threshold, the most probable class alone, or with `empty` no class (LAC as
    published: the coverage is then the target itself, not floored at the top-1 accuracy)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    keep = np.take_along_axis(probs, order, axis=1) >= 1.0 - q
    keep[:, 0] |= not empty
    return [row[mask] for row, mask in zip(order, keep)]


def spread(n: int, coverage: float, mass: float = 0.9) -> tuple[float, float]:
    """The central `mass` of the coverage that sets calibrated on n images deliver (over draws of the n):
    the quantiles of Beta(r, n + 1 - r), r = ceil((n + 1) * coverage) <= n; each in [0, 1]."""
    from scipy.stats import beta

    rank = math.ceil((n + 1) * coverage - 1e-9)
    low, high = beta.ppf([(1 - mass) / 2, (1 + mass) / 2], rank, n + 1 - rank)
    return float(low), float(high)


def calibrate(cal_probs: np.ndarray, cal_labels: np.ndarray, coverage: float) -> tuple[float, dict]:
    """(q, facts {"coverage_target", "n_calibration", "threshold", "method", "coverage_spread90"}) from the
    calibration probabilities (n, k) and labels (n,): what `prediction_sets` needs, computed once.
    "coverage_spread90" is [low, high] (`spread`): where this calibration's coverage lies for 90 % of
    calibration draws of its size.

    Raises:
        SettingsError: coverage out of (0, 1), or too few calibration images for it.
    """
    coverage = checked_coverage(coverage)
    q = threshold(scores(cal_probs, cal_labels), coverage)
    low, high = spread(len(cal_labels), coverage)
    return q, {"coverage_target": coverage, "n_calibration": int(len(cal_labels)), "threshold": round(q, 6),
               "method": METHOD, "coverage_spread90": [round(low, 4), round(high, 4)]}


def calibrated_sets(cal_probs: np.ndarray, cal_labels: np.ndarray, probs: np.ndarray, coverage: float
                    ) -> tuple[list[np.ndarray], dict]:
    """(sets for `probs` (m, k), facts) at `coverage`: `calibrate`, then `prediction_sets`."""
    q, facts = calibrate(cal_probs, cal_labels, coverage)
    return prediction_sets(probs, q), facts
