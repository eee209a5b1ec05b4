"""The linear head's learning curve on cached features: refitted on nested fractions of the labelled images.

For each repetition, stratified K folds (a group of identical images never
split); in each fold the training rows are put in one random order and the
head (the run's own C, its class weights) is refitted on the first `fraction`
of each class's rows, fraction by fraction, so every smaller subset is nested
in the larger; the held-out fold is scored each time. Every image is thus
predicted at every fraction by a head that never saw it. `analysis.curve`
fits and forecasts. Cost: repetitions x folds x fractions fits of a logistic
regression (milliseconds to a second each), no backbone pass.
"""

from __future__ import annotations

import math
import time

import numpy as np

from finetune_cli.analysis.curve import Measured, forecast, too_few
from finetune_cli.config import CURVE, LINEAR, CurveConfig
from finetune_cli.data.splits import content_groups, distinct_per_class, grouped_folds
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.train.logistic import standardised_logistic


def learning_curve(features: np.ndarray, labels: np.ndarray, classes: list[str], C: float, *,
                   groups: np.ndarray | None = None, balanced: bool = False, seed: int = 0,
                   config: CurveConfig = CURVE) -> dict:
    """metrics.json["learning_curve"] of a linear head with inverse regularisation `C` (`analysis.curve.forecast`,
    or its "too few" record), with "model", "C" and "seconds" added.

    Args:
        features: float (n, d), one row per labelled image (no augmented view).
        labels: int (n,) in [0, len(classes)).
        groups: (n,) content id per row (identical images share one); None: every row its own.
    """
    started = time.perf_counter()
    with one_blas_thread():
        measured = measure(features, labels, len(classes), C, groups=groups, balanced=balanced, seed=seed,
                           config=config)
    record = forecast(measured, classes, config, seed) if isinstance(measured, Measured) else measured
    return {"model": "linear head", "C": C, **record, "seconds": round(time.perf_counter() - started, 3)}


def table_curve(ctx, table, C: float, balanced: bool) -> dict:
    """`learning_curve` of a run's training images, from their feature table (`features.FeatureTable`: one
    row per image, its records' digests grouping identical images), its message said as a note.

    Args:
        ctx: the run's `train.context.Context` (classes, labels, seed, reporter).
    """
    ctx.reporter.on_phase("learning curve: the linear head refitted on nested fractions of the training images")
    record = learning_curve(table.features, ctx.labels(table.records), ctx.classes, C, balanced=balanced,
                            groups=content_groups(r.digest for r in table.records), seed=ctx.seed)
    ctx.reporter.on_note(record["message"])
    return record


def kept_fractions(labels: np.ndarray, groups: np.ndarray, config: CurveConfig) -> tuple[int, list[float]] | str:
    """(folds, fractions that leave the smallest class `config.min_per_class` training images, each a
    different number of them), or the reason there are too few for `config.min_points` of them."""
    per_class = distinct_per_class(labels, groups)
    smallest = int(per_class[per_class > 0].min())
    folds = min(config.folds, smallest)
    trained = smallest * (folds - 1) / folds if folds >= 2 else 0
    kept, seen = [], set()
    for f in sorted(config.fractions):  # a fraction that gives the smallest class no new image adds no point
        size = math.ceil(f * trained)
        if size >= config.min_per_class and size not in seen:
            kept.append(f)
            seen.add(size)
    if folds < 2 or len(kept) < config.min_points:
        fraction = sorted(config.fractions, reverse=True)[min(config.min_points, len(config.fractions)) - 1]
        need = math.ceil(config.min_per_class / fraction * config.folds / (config.folds - 1))
        return f"the smallest class has {smallest} distinct images; a curve of {config.min_points} points needs " \
               f"about {need}"
    return folds, kept


def measure(features: np.ndarray, labels: np.ndarray, n_classes: int, C: float, *, groups=None,
            balanced: bool = False, seed: int = 0, config: CurveConfig = CURVE) -> Measured | dict:
    """The out-of-fold hits at each kept fraction (`Measured`), or `analysis.curve.too_few`'s record."""
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    kept = kept_fractions(labels, groups, config)
    if isinstance(kept, str):
        return too_few(kept)
    folds, fractions = kept
    hits = np.zeros((config.seeds, len(fractions), len(labels)), bool)
    sizes = np.zeros((len(fractions), n_classes))
    weight = "balanced" if balanced else None
    for r in range(config.seeds):
        for i, (train, test) in enumerate(grouped_folds(labels, groups, folds, seed + r)):
            order = np.random.default_rng([seed, r, i]).permutation(train)
            for j, fraction in enumerate(fractions):
                rows = nested(order, labels, fraction)
                model = standardised_logistic(C, floor=LINEAR.scale_floor, tol=LINEAR.tol, class_weight=weight)
                model.fit(features[rows], labels[rows])
                hits[r, j, test] = model.predict(features[test]) == labels[test]
                sizes[j] += np.bincount(labels[rows], minlength=n_classes)
    sizes /= config.seeds * folds
    return Measured(hits, labels, sizes, tuple(fractions), np.bincount(labels, minlength=n_classes))


def nested(order: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """The first ceil(fraction x count) rows of each class in `order` (at least one): subsets nested as the
    fraction grows, stratified like the whole."""
    chosen = []
    for c in np.unique(labels[order]):
        mine = order[labels[order] == c]
        chosen.append(mine[:max(1, math.ceil(fraction * len(mine)))])
    return np.concatenate(chosen)
