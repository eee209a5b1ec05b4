"""The linear head: logistic regression on frozen features, folded into a Dense layer.

scikit-learn's L-BFGS solves the convex problem exactly and picks C by
cross-validation in seconds, where a Keras dense head needs epochs and a
learning rate; the solution is then written into a softmax Dense layer so the
saved model is one Keras model on raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

C_GRID = (0.01, 0.1, 1.0)
FOLDS = 3
TOL = 1e-3  # features are standardised; tighter tolerances change no decision but cost seconds


@dataclass
class LinearHead:
    """A fitted linear softmax head.

    Attributes:
        kernel: float32 (d, k), applied to raw (unstandardised) features.
        bias: float32 (k,).
        C: the chosen inverse regularisation strength.
        scores: one dict per C tried: {"C", "cv_accuracy"}.
    """

    kernel: np.ndarray
    bias: np.ndarray
    C: float
    scores: list = field(default_factory=list)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Softmax probabilities (n, k) for features (n, d)."""
        logits = features @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def fit_linear(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    groups: np.ndarray | None = None,
    balanced: bool = False,
    seed: int = 0,
) -> LinearHead:
    """Fit a multinomial logistic regression, C chosen by grouped cross-validation.

    Args:
        features: float (n, d).
        labels: int (n,) in [0, n_classes).
        groups: image id per row, so augmented views of one image never sit on
            both sides of a fold; None when each row is its own image.
        balanced: weight classes inversely to their frequency.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    groups = np.arange(len(labels)) if groups is None else groups
    weight = "balanced" if balanced else None
    per_class = np.bincount(labels, minlength=n_classes)
    folds = int(min(FOLDS, per_class[per_class > 0].min()))
    scores = []
    if folds >= 2:
        accuracy = _cv_path(features, labels, groups, folds, weight, seed)
        scores = [{"C": c, "cv_accuracy": float(a)} for c, a in accuracy.items()]
        best = max(scores, key=lambda s: (round(s["cv_accuracy"], 6), -s["C"]))["C"]
    else:
        best = 0.1
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=best, max_iter=1000, tol=TOL, class_weight=weight).fit(scaler.transform(features), labels)
    return LinearHead(*_fold(model, scaler, n_classes), C=best, scores=scores)


def _cv_path(features, labels, groups, folds: int, weight, seed: int) -> dict[float, float]:
    """Mean grouped-CV accuracy for each C of C_GRID.

    Each fold walks the grid from the strongest regularisation up, every fit
    warm-started from the previous solution: the same optimum, about a third
    of the time of fitting each C from zero.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    hits = {c: [] for c in C_GRID}
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(features, labels, groups):
        scaler = StandardScaler().fit(features[train])
        x_train, x_test = scaler.transform(features[train]), scaler.transform(features[test])
        model = LogisticRegression(max_iter=1000, tol=TOL, class_weight=weight, warm_start=True)
        for c in sorted(C_GRID):
            model.set_params(C=c).fit(x_train, labels[train])
            hits[c].append(float((model.predict(x_test) == labels[test]).mean()))
    return {c: float(np.mean(v)) for c, v in hits.items()}


def _fold(model, scaler, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold the standardisation into (kernel (d, k), bias (k,)) for raw features."""
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; softmax needs two
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_bias = np.full(n_classes, -1e4)  # a class absent from training is never predicted
    full_coef[model.classes_] = coef
    full_bias[model.classes_] = intercept
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    kernel = (full_coef / scale).T
    bias = full_bias - (scaler.mean_ / scale) @ full_coef.T
    return kernel.astype(np.float32), bias.astype(np.float32)
