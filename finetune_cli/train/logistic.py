"""The one L2 logistic regression every linear fit builds, and its floored standardisation.

The linear head and its C path (`train.linear`), its learning curve
(`train.curve`), tune's trials, the similarity probe and audit all fit this
model, each with its own options.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler

from finetune_cli.config import LINEAR


class FlooredScaler(StandardScaler):
    """A StandardScaler whose per-feature scale is at least `floor` x the median (positive) scale.

    A nearly constant feature (a channel almost always 0) would otherwise be
    blown up to unit variance: the head then leans on its noise, with weights
    of 1/std once folded (measured: up to 252 against a mean of 0.5), and any
    small change of that feature (8-bit quantisation of the backbone, a
    perturbation of a few grey levels) swings the prediction.
    """

    def __init__(self, floor: float = 0.1):
        super().__init__()
        self.floor = floor

    def fit(self, X, y=None, sample_weight=None):
        super().fit(X, y, sample_weight)
        positive = self.scale_[self.scale_ > 0]
        if self.floor > 0 and positive.size:
            self.scale_ = np.maximum(self.scale_, self.floor * float(np.median(positive)))
        return self


def logistic(C: float = 1.0, *, tol: float = LINEAR.tol, max_iter: int = 1000, class_weight: str | None = None,
             warm_start: bool = False):
    """The one L2 logistic regression every linear fit builds (scikit-learn, lbfgs, multinomial): the linear
    head and its C path, tune's trials, the similarity probe and audit, each with its own options."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, tol=tol, class_weight=class_weight, warm_start=warm_start)


def standardised_logistic(C: float, *, floor: float = LINEAR.scale_floor, **options):
    """`logistic(C, **options)` behind a `FlooredScaler(floor)`, as one pipeline (floor 0: a plain StandardScaler)."""
    from sklearn.pipeline import make_pipeline

    return make_pipeline(FlooredScaler(floor), logistic(C, **options))


def floored_scaler(features: np.ndarray, floor: float) -> FlooredScaler:
    """`FlooredScaler(floor)` fitted on `features` (n, d)."""
    return FlooredScaler(floor).fit(features)
