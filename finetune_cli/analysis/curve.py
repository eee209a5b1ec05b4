"""Learning curves and label forecasts: would more labels help, and how much?

The out-of-fold error of a plan's linear head, measured at nested fractions of
the labelled images (`train.curve.measure`), is fitted by an inverse power law
in the training images per class n,

    error(n) = a + b * n ** -c,     a in [0, 1], b >= 0, c in [0.05, 2],

the curve the sample-size literature fits to classifier learning curves
(Figueroa et al. 2012, "Predicting sample size required for classification
performance", BMC Med. Inform. Decis. Mak. 12:8; Hestness et al. 2017, "Deep
learning scaling is predictable, empirically"). `a` is the error that more
labels of the same kind tend to. A forecast's 95 % interval is the 2.5th to
97.5th percentile of the forecasts refitted on bootstrap resamples of the
images (stratified by class), so it carries the noise of the few images behind
the curve; each class's own curve (its recall against its own images) says
which class limits the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune_cli.config import CURVE, CurveConfig

#: The exponents c tried (log-spaced, about 5 % apart).
C_GRID = np.geomspace(0.05, 2.0, 80)


@dataclass(frozen=True)
class Measured:
    """Out-of-fold hits of a linear head refitted on nested fractions of the labelled images.

    Attributes:
        hits: bool (r, f, n): image i was predicted right at fraction j in repetition r, by a head that
            never saw it.
        labels: int (n,) class index per image, in [0, k).
        class_sizes: float (f, k) mean training images of each class at each fraction.
        fractions: (f,) the fractions measured, increasing.
        trained_per_class: int (k,) images of each class the run's own model trained on (the forecast's 1x).
    """

    hits: np.ndarray
    labels: np.ndarray
    class_sizes: np.ndarray
    fractions: tuple
    trained_per_class: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """(f,) mean training images per class at each fraction."""
        return self.class_sizes.mean(axis=1)


def law(n, a: float, b: float, c: float):
    """error(n) = a + b * n ** -c, for n > 0 (array or float)."""
    return a + b * np.power(n, -c)


def fit_power_law(n: np.ndarray, error: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of `law` fitted by least squares to error (f,) in [0, 1] at n (f,) > 0 images per class
    (`fit_power_laws` of one curve); a curve that does not fall is flat: (mean error, 0, 1)."""
    return tuple(float(v) for v in fit_power_laws(n, np.asarray(error, float)[None])[0])


def fit_power_laws(n: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """(r, 3) rows (a, b, c) of `law` fitted by least squares to each row of errors (r, f), clipped to [0, 1].

    For each c of `C_GRID` the law is linear in (a, b): solved in closed form for every row at once, within
    a in [0, 1] and b >= 0 (an unconstrained solution outside them is replaced by the best on the bound), and
    each row keeps its best c. A row with b = 0 (flat) reports c = 1.
    """
    n, e = np.asarray(n, float), np.clip(np.asarray(errors, float), 0.0, 1.0)
    best, sse = np.zeros((len(e), 3)), np.full(len(e), np.inf)
    mean = e.mean(axis=1)
    for c in C_GRID:
        z = n ** -c
        zc = z - z.mean()
        b = (e - mean[:, None]) @ zc / (zc @ zc)
        a = mean - b * z.mean()
        b, a = np.where(b < 0, 0.0, b), np.where(b < 0, mean, a)
        through_zero = a < 0  # the best with a = 0: b = <e, z> / <z, z>
        b, a = np.where(through_zero, np.maximum(e @ z / (z @ z), 0.0), b), np.where(through_zero, 0.0, a)
        a = np.minimum(a, 1.0)
        err = ((e - a[:, None] - b[:, None] * z) ** 2).sum(axis=1)
        better = err < sse - 1e-15
        best[better], sse[better] = np.column_stack([a, b, np.full(len(e), c)])[better], err[better]
    best[best[:, 1] == 0, 2] = 1.0
    return best


def stratified_resamples(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """int (count, n) bootstrap resamples of the rows, each class resampled within itself (its share kept)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, len(labels)), np.int64)
    start = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[:, start:start + len(rows)] = rng.choice(rows, size=(count, len(rows)))
        start += len(rows)
    return out


def forecast(measured: Measured, classes: list[str], config: CurveConfig = CURVE, seed: int = 0) -> dict:
    """The learning curve's record for metrics.json["learning_curve"].

    Returns:
        {"points": [{"fraction", "images_per_class", "accuracy", "low", "high"}] (measured, out-of-fold),
         "fit": {"a", "b", "c"}, "forecast": [{"multiple", "images_per_class", "accuracy", "low", "high"}]
         (at `config.multiples` of the images per class trained on), "per_class": [...] (`class_forecast`),
         "limiting_class", "gain_if_doubled": {"accuracy", "low", "high"} (2x against 1x, with its interval),
         "verdict" (`verdict`), "message"}; accuracies 0-1.
    """
    per_image = measured.hits.mean(axis=0)  # (f, n): the repetitions averaged
    sizes, now = measured.sizes, float(measured.trained_per_class.mean())
    targets = np.array([m * now for m in config.multiples])
    resamples = stratified_resamples(measured.labels, config.resamples, seed)
    curves = per_image[:, resamples].mean(axis=2).T  # (resamples, f) accuracy at each fraction
    laws = fit_power_laws(sizes, 1 - curves)
    spread = 1 - law(targets[None], laws[:, :1], laws[:, 1:2], laws[:, 2:])  # (resamples, targets)
    accuracy = per_image.mean(axis=1)
    a, b, c = fit_power_law(sizes, 1 - accuracy)
    ahead = 1 - law(targets, a, b, c)
    low, high = np.percentile(curves, [2.5, 97.5], axis=0)
    points = [{"fraction": f, "images_per_class": round(float(s), 2), "accuracy": float(m), "low": float(lo),
               "high": float(hi)} for f, s, m, lo, hi in zip(measured.fractions, sizes, accuracy, low, high)]
    f_low, f_high = np.percentile(spread, [2.5, 97.5], axis=0)
    ahead_rows = [{"multiple": m, "images_per_class": round(float(t), 2), "accuracy": float(v), "low": float(lo),
                   "high": float(hi)} for m, t, v, lo, hi in zip(config.multiples, targets, ahead, f_low, f_high)]
    per_class = class_forecast(measured, per_image, classes)
    record = {"points": points, "fit": {"a": a, "b": b, "c": c}, "forecast": ahead_rows, "per_class": per_class,
              "limiting_class": max(per_class, key=lambda r: r["gain_if_doubled"])["class"]}
    if 1.0 in config.multiples and 2.0 in config.multiples:
        once, twice = config.multiples.index(1.0), config.multiples.index(2.0)
        gains = spread[:, twice] - spread[:, once]
        record["gain_if_doubled"] = {"accuracy": float(ahead[twice] - ahead[once]),
                                     "low": float(np.percentile(gains, 2.5)), "high": float(np.percentile(gains, 97.5))}
    return {**record, **verdict(record, config)}


def class_forecast(measured: Measured, per_image: np.ndarray, classes: list[str]) -> list[dict]:
    """Per class (classes with images only): its recall's own curve, and what doubling its images would add.

    Returns:
        [{"class", "images", "recall" (the curve at its images; 0-1), "recall_if_doubled",
          "gain_if_doubled" (overall accuracy, 0-1: the recall gain times the class's share of the images)}].
    """
    rows, labels = [], measured.labels
    for k in np.unique(labels):
        mine = labels == k
        recall = per_image[:, mine].mean(axis=1)
        n = float(measured.trained_per_class[k])
        params = fit_power_law(measured.class_sizes[:, k], 1 - recall)
        at, doubled = (float(1 - law(v, *params)) for v in (n, 2 * n))
        rows.append({"class": classes[k], "images": int(n), "recall": at, "recall_if_doubled": doubled,
                     "gain_if_doubled": max(doubled - at, 0.0) * float(mine.mean())})
    return rows


def verdict(record: dict, config: CurveConfig = CURVE) -> dict:
    """{"verdict", "message"}: what the forecast means for the user, in one sentence. The verdict is "flat"
    (twice the labels add under `config.flat_gain`: near the top, or this plan has stopped learning),
    "uncertain" (the gain's 95 % interval reaches 0) or "rising"."""
    ahead = {row["multiple"]: row for row in record["forecast"]}
    now, twice = ahead.get(1.0), ahead.get(2.0)
    if now is None or twice is None:
        return {"verdict": "rising", "message": "forecast: " + ", ".join(
            f"{r['multiple']:g}x {r['accuracy']:.1%}" for r in record["forecast"])}
    gain = twice["accuracy"] - now["accuracy"]
    if gain < config.flat_gain and now["accuracy"] >= config.near_top:
        return {"verdict": "flat", "message": (
            f"the learning curve is near its top: {now['accuracy']:.1%} now, {twice['accuracy']:.1%} with twice "
            "the labels; more labels of this kind would add little")}
    if gain < config.flat_gain:
        return {"verdict": "flat", "message": (
            f"the learning curve is flat: twice the labels would add {100 * gain:.1f} points "
            f"({now['accuracy']:.1%} -> {twice['accuracy']:.1%}); more labels of this kind will not help this plan "
            "much: try fine-tuning (--strategy partial or full) or another --base")}
    span = record.get("gain_if_doubled", {})
    if span.get("low", 1.0) <= 0:
        return {"verdict": "uncertain", "message": (
            f"the learning curve is too noisy to tell whether more labels help: twice the labels would add "
            f"{100 * gain:.1f} points, but anywhere from {100 * span['low']:.1f} to {100 * span['high']:.1f} "
            f"(95 % interval; {now['accuracy']:.1%} now)")}
    limiting = next(r for r in record["per_class"] if r["class"] == record["limiting_class"])
    later = ahead.get(4.0)
    return {"verdict": "rising", "message": (
        f"more labels should help: {now['accuracy']:.1%} expected now, {twice['accuracy']:.1%} "
        f"({twice['low']:.1%}-{twice['high']:.1%}) with twice the labels"
        + (f", {later['accuracy']:.1%} with four times" if later else "")
        + f"; class `{limiting['class']}` limits you most: {limiting['images']} more of it would add about "
        f"{100 * limiting['gain_if_doubled']:.1f} points")}


def too_few(reason: str) -> dict:
    """The record when the data are too few to forecast: no points, no forecast, the reason said."""
    return {"points": [], "forecast": [], "per_class": [], "verdict": "too few",
            "message": f"too few labelled images to forecast a learning curve: {reason}"}
