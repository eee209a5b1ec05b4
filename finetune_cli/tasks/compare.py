"""`finetune compare RUN_A RUN_B DIR`: do two runs differ on the same labelled images beyond noise?

Both runs predict every image of DIR. The images that trained either run (by content: `trained_on.txt`)
are left out, so the comparison is on held-out images only. On the rest:

    McNemar's exact test on the discordant pairs (b: only A right, c: only B right):
        p = min(1, 2 * P(X <= min(b, c))),  X ~ Binomial(b + c, 1/2)
    a paired bootstrap 95 % interval of accuracy(A) - accuracy(B) (the same resampled images for both)

The verdict is "A is better" or "B is better" when p < `alpha`, else "no difference beyond noise".
"""

from __future__ import annotations

import os

import numpy as np

from finetune_cli.analysis.scores import BOOTSTRAP_RESAMPLES
from finetune_cli.config import PREDICT, SCAN, ScanConfig, checked_tta
from finetune_cli.data.inputs import labelled_test_scan
from finetune_cli.errors import SettingsError
from finetune_cli.models.inference import probabilities
from finetune_cli.runs.run import Run, trained_on
from finetune_cli.train.compare import paired_interval


def compare(run_a: str | os.PathLike, run_b: str | os.PathLike, root: str | os.PathLike, *,
            tta: int | str = PREDICT.tta, alpha: float = 0.05, seed: int = 0, config: ScanConfig = SCAN) -> dict:
    """Whether two runs differ in accuracy on the labelled folder `root`, beyond noise.

    Args:
        run_a, run_b: run folders (or `last`); they must know the same classes (any order).
        tta: test-time views, as `evaluate` (1-16), for both runs.
        alpha: the test's level (0-1).

    Returns:
        {"runs": [a, b], "n_images", "n_left_out" (images that trained a run), "accuracy": [a, b],
         "difference" (a - b), "difference_interval95", "only_a_right", "only_b_right", "p_value",
         "verdict", "method"}.

    Raises:
        ModelFileError, FolderError, SettingsError (different classes, alpha, tta, no held-out image left).
    """
    tta = checked_tta(tta)
    if not 0 < alpha < 1:
        raise SettingsError(f"Expected alpha between 0 and 1. Received: {alpha!r}")
    a, b = Run.load(run_a), Run.load(run_b)
    if sorted(a.classes) != sorted(b.classes):
        raise SettingsError(f"{a.path.name} and {b.path.name} know different classes ({', '.join(a.classes)} vs "
                            f"{', '.join(b.classes)}): compare runs trained for the same classes")
    scan = labelled_test_scan(root, a.classes, config)
    right = [_right(run, scan, config, tta) for run in (a, b)]
    trained = (trained_on(a.path) or frozenset()) | (trained_on(b.path) or frozenset())
    held = np.array([r.digest not in trained for r in scan.images]) & right[0][1] & right[1][1]
    if not held.any():
        raise SettingsError(f"no image of {root} is held out from both runs (every readable one trained "
                            "one of them): compare on a folder neither run trained on")
    ra, rb = right[0][0][held], right[1][0][held]
    return {"runs": [str(a.path), str(b.path)], "n_images": int(held.sum()),
            "n_left_out": int(sum(r.digest in trained for r in scan.images)), **paired(ra, rb, alpha, seed)}


def paired(right_a: np.ndarray, right_b: np.ndarray, alpha: float = 0.05, seed: int = 0) -> dict:
    """McNemar's exact test and a paired bootstrap interval for two bool arrays (n,): was each run right."""
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p_value = mcnemar_p(only_a, only_b)
    low, high = paired_interval(right_a, right_b, BOOTSTRAP_RESAMPLES, 0.95, seed)  # the keep rule's interval
    verdict = ("no difference beyond noise" if p_value >= alpha
               else "A is better" if only_a > only_b else "B is better")
    return {"accuracy": [float(right_a.mean()), float(right_b.mean())],
            "difference": float(right_a.mean() - right_b.mean()),
            "difference_interval95": [round(low, 4), round(high, 4)],
            "only_a_right": only_a, "only_b_right": only_b, "p_value": round(p_value, 6), "alpha": alpha,
            "verdict": verdict,
            "method": f"McNemar's exact test; paired bootstrap ({BOOTSTRAP_RESAMPLES} resamples)"}


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (1.0 when there are none)."""
    from scipy.stats import binom

    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def _right(run: Run, scan, config: ScanConfig, tta: int) -> tuple[np.ndarray, np.ndarray]:
    """(was the run's top-1 class the image's label (n,), was the image read (n,))."""
    probs, ok = probabilities(run.model, scan, run.image_size, config=config, tta=tta)
    labels = np.array([run.classes.index(r.label) for r in scan.images])
    return probs.argmax(1) == labels, ok
