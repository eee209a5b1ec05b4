"""How far a classifier's confidence can be trusted, and temperature scaling to mend it (Guo et al. 2017).

Pure numpy (and one scipy minimiser); no model, no files:

    nll(probs, labels)                  mean negative log-likelihood, nats
    reliability(probs, labels, bins)    per confidence bin: mean confidence, accuracy, count
    ece(probs, labels, bins)            expected calibration error from those bins
    temper(probs, T)                    softmax(log p / T): the same ranking, softer (T > 1) or sharper (T < 1)
    fit_temperature(probs, labels)      the T minimising the NLL of temper(probs, T) on held-out images

`train.calibrate` fits T on the validation images and folds it into the saved model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The NLL clips probabilities to this before its log (as `train.compare` does): one certain mistake
#: costs 27.6 nats, not infinity.
TINY = 1e-12
#: `temper` clips only to the smallest positive float64: a float32 softmax can underflow to 0, and
#: any larger floor would flatten the tail that the temperature rescales.
FLOOR = np.finfo(np.float64).tiny


def per_image_nll(probs: np.ndarray, labels: np.ndarray, floor: float = TINY) -> np.ndarray:
    """-log p(true class) (n,) nats of int labels (n,) under probabilities (n, k), p clipped at `floor`."""
    picked = np.asarray(probs, np.float64)[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, floor, 1.0))


def nll(probs: np.ndarray, labels: np.ndarray, floor: float = TINY) -> float:
    """Mean negative log-likelihood (nats, >= 0) of int labels (n,) under probabilities (n, k); NaN when n = 0.

    `floor`: the clip before the log; training and validation losses use Keras's 1e-7 (`train.setup`).
    """
    if len(labels) == 0:
        return float("nan")
    return float(per_image_nll(probs, labels, floor).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """The reliability table of probabilities (n, k) for int labels (n,), over `bins` equal-width bins.

    Bin b holds the images whose confidence (the top probability) lies in
    (b / bins, (b + 1) / bins]; a confidence of exactly 0 goes to bin 0.

    Returns:
        {"confidence": (bins,) mean confidence per bin, "accuracy": (bins,)
        share of correct top-1 predictions per bin (both 0 for an empty bin),
        "count": (bins,) int images per bin, "edges": (bins + 1,) from 0 to 1}.
    """
    probs = np.asarray(probs, np.float64)
    confidence, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    return {"confidence": np.bincount(which, confidence, bins) / safe,
            "accuracy": np.bincount(which, correct.astype(float), bins) / safe,
            "count": count, "edges": edges}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error in [0, 1]: sum over bins of (share of images) x |accuracy - confidence|.

    Bins as in `reliability`; NaN when there are no images.
    """
    if len(labels) == 0:
        return float("nan")
    table = reliability(probs, labels, bins)
    return float(np.sum(table["count"] / len(labels) * np.abs(table["accuracy"] - table["confidence"])))


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) (n, k) float64 of probabilities (n, k), T > 0.

    Since log p differs from the logits only by a per-row constant, this is
    exactly softmax(logits / T): the argmax never changes.
    """
    logits = np.log(np.clip(np.asarray(probs, np.float64), FLOOR, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` minimising nll(temper(probs, T), labels).

    Searched on log T by scipy's bounded scalar minimiser (Brent): the NLL is
    convex in 1 / T, so it has one minimum and the search finds it.
    """
    from scipy.optimize import minimize_scalar

    low, high = np.log(bounds[0]), np.log(bounds[1])
    found = minimize_scalar(lambda log_t: nll(temper(probs, np.exp(log_t)), labels), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x))


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on validation images, with the evidence before and after.

    Attributes:
        temperature: the T applied (1.0 when not applied).
        fitted: the T the minimiser found.
        applied: whether T was folded into the model (see `train.calibrate`).
        reason: why it was not applied ("" when it was).
        before, after: (n, k) validation probabilities without and with T.
        labels: (n,) int validation labels.
        bins: confidence bins of the ECE.
    """

    temperature: float
    fitted: float
    applied: bool
    reason: str
    before: np.ndarray
    after: np.ndarray
    labels: np.ndarray
    bins: int

    def facts(self) -> dict:
        """What metrics.json records under "calibration" (ECE in [0, 1], NLL in nats)."""
        facts = {"temperature": round(self.temperature, 6), "fitted_temperature": round(self.fitted, 6),
                 "applied": self.applied, "n_val": int(len(self.labels)), "ece_bins": self.bins,
                 "ece_before": ece(self.before, self.labels, self.bins),
                 "ece_after": ece(self.after, self.labels, self.bins),
                 "nll_before": nll(self.before, self.labels), "nll_after": nll(self.after, self.labels)}
        return {**facts, "reason": self.reason} if self.reason else facts
