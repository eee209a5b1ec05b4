"""Multi-label heads: one sigmoid per label on frozen features, folded into one Keras model.

    candidates  the probe's stages (`strategy.similarity.probe_layers`), average pooled, from the cache
    C           one L2 strength for every label, by grouped k-fold CV on mean average precision
    thresholds  per label, the best F1 on the out-of-fold probabilities (`analysis.multilabel`)
    model       backbone -> pooled stage -> Dense(L, sigmoid), refitted on every labelled image

Each label's head is a binary logistic regression (`train.logistic`), standardised by one
`FlooredScaler`, walked up the C grid with warm starts; a label constant in a fold's training images
predicts its constant there. The folds keep identical files together and are stratified by each image's
rarest label, so that every label has positives in every fold where it can.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from finetune_cli.analysis.multilabel import best_thresholds, cross_fitted, mean_average_precision
from finetune_cli.config import LINEAR, LinearConfig
from finetune_cli.data.splits import content_groups, grouped_folds
from finetune_cli.models.heads import classifier
from finetune_cli.models.stages import select_layer
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.strategy.similarity import probe_layers
from finetune_cli.train.logistic import floored_scaler, logistic


@dataclass
class MultiLabelFit:
    """A fitted multi-label head.

    Attributes:
        model: raw RGB (B, S, S, 3) in [0, 255] -> per-label probabilities (B, L), sigmoid.
        layer: the stage its features come from (None: the final stage).
        C: the L2 strength every label's head was refitted with.
        thresholds: (L,) per-label decision thresholds in (0, 1).
        val_probs, val_truth: (n, L) validation probabilities (out-of-fold, or the --val-dir images') and truth.
        val_guess: (n, L) bool, the validation images' predicted sets: out-of-fold, each fold thresholded by
            the other folds (`analysis.multilabel.cross_fitted`), so their F1 did not choose its thresholds.
        val_paths: the validation images' absolute paths, in row order.
        candidates: one row per stage tried: {"features", "stage" (the final one: the stage count),
            "cv_mean_average_precision", "C", "chosen"}.
        history: the chosen stage's C path: one row per C, {"C", "cv_mean_average_precision"}.
        kernel, bias: the head on raw features: (d, L), (L,) float32; None for a fine-tuned model.
        trained_on: the content digests of the images that trained `model`; None: every image of the run's table.
    """

    model: object
    layer: int | None
    C: float
    thresholds: np.ndarray
    val_probs: np.ndarray
    val_truth: np.ndarray
    val_guess: np.ndarray
    val_paths: list
    candidates: list
    history: list
    kernel: np.ndarray | None
    bias: np.ndarray | None
    trained_on: frozenset | None = None


def fit_multilabel(ctx, n_stages: int, config: LinearConfig = LINEAR) -> MultiLabelFit:
    """The head on `ctx.train` (a multi-label scan), validated out-of-fold (`ctx.out_of_fold`) or on `ctx.val`.

    Raises:
        ValueError: fewer than two distinct images to fold.
    """
    layers = probe_layers(n_stages)
    ctx.reporter.on_phase(f"features of {len(ctx.train.images)} images (stages {[k or 'final' for k in layers]})")
    tables = ctx.features(ctx.train, layers)
    records = tables[0].records
    truth = ctx.train.label_matrix(records, ctx.classes)
    groups = content_groups(r.digest for r in records)
    folds = label_folds(truth, groups, config.folds, ctx.seed)
    paths = []
    for k, table in zip(layers, tables):
        ctx.reporter.on_phase(f"one-vs-rest heads on {'final stage' if k is None else f'stage {k}'} features "
                              f"({len(folds)}-fold CV over C)")
        paths.append(cv_path(table.features, truth, folds, config))
    scored = [{c: mean_average_precision(truth, oof) for c, oof in path.items()} for path in paths]
    best = max(range(len(layers)), key=lambda i: (round(max(scored[i].values()), 6), i))
    c = max(scored[best], key=lambda value: (round(scored[best][value], 6), -value))
    kernel, bias = fit_heads(tables[best].features, truth, c, config)
    oof = paths[best][c]
    val_probs, val_truth, val_paths = oof, truth, [str(ctx.train.root / r.path) for r in records]
    if not ctx.out_of_fold:
        val_table = ctx.features(ctx.val, [layers[best]])[0]
        val_probs = head_probabilities(val_table.features, kernel, bias)
        val_truth = ctx.val.label_matrix(val_table.records, ctx.classes)
        val_paths = [str(ctx.val.root / r.path) for r in val_table.records]
    thresholds = np.round(best_thresholds(val_truth, val_probs), 6)  # as metrics.json and the model say them
    val_guess = cross_fitted(truth, oof, folds) if ctx.out_of_fold else val_probs >= thresholds
    candidates = [{"features": "final stage" if k is None else f"stage {k}", "stage": k or n_stages,
                   "cv_mean_average_precision": round(max(s.values()), 4), "C": max(s, key=s.get), "chosen": i == best}
                  for i, (k, s) in enumerate(zip(layers, scored))]
    backbone = ctx.backbone.model
    model = classifier(backbone, select_layer(backbone, layers[best]), len(ctx.classes), kernel=kernel, bias=bias,
                       activation="sigmoid")
    history = [{"C": value, "cv_mean_average_precision": v} for value, v in sorted(scored[best].items())]
    return MultiLabelFit(model, layers[best], c, thresholds, val_probs.astype(np.float32), val_truth, val_guess,
                         val_paths, candidates, history, kernel, bias)


def label_folds(truth: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list:
    """Grouped k-fold (train rows, test rows) over images with multi-hot `truth` (n, L), stratified by each
    image's rarest label (images with none in a stratum of their own); k at most `n_folds`, at least 2.

    Raises:
        ValueError: fewer than two distinct images.
    """
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("a multi-label head needs at least two distinct images to cross-validate")
    rarity = np.where(truth > 0, truth.sum(0), np.inf)
    strata = np.where(truth.any(1), rarity.argmin(1), truth.shape[1])
    folds = int(min(n_folds, n_groups))
    with warnings.catch_warnings():  # a rare stratum with fewer images than folds is spread as far as it goes
        warnings.simplefilter("ignore", UserWarning)
        return grouped_folds(strata, groups, folds, seed)


def cv_path(features: np.ndarray, truth: np.ndarray, folds: list, config: LinearConfig) -> dict:
    """{C: out-of-fold probabilities (n, L)} along `config.c_grid`, every (fold, label) head warm-started
    from the previous C."""
    grid = sorted(config.c_grid)
    oof = {c: np.zeros(truth.shape, np.float64) for c in grid}
    with one_blas_thread():
        for train, test in folds:
            scaler = floored_scaler(features[train], config.scale_floor)
            x_train, x_test = scaler.transform(features[train]), scaler.transform(features[test])
            for j in range(truth.shape[1]):
                y = truth[train, j]
                if y.min() == y.max():  # one value in this fold's training images: predict it
                    for c in grid:
                        oof[c][test, j] = y[0]
                    continue
                model = logistic(tol=config.tol, warm_start=True)
                for c in grid:
                    oof[c][test, j] = model.set_params(C=c).fit(x_train, y).predict_proba(x_test)[:, 1]
    return oof


def head_probabilities(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Sigmoid probabilities (n, L) of raw features (n, d) through a head (`fit_heads`'s kernel (d, L), bias (L,))."""
    return 1.0 / (1.0 + np.exp(-(features @ kernel + bias)))


def fit_heads(features: np.ndarray, truth: np.ndarray, c: float, config: LinearConfig = LINEAR):
    """(kernel (d, L), bias (L,)) float32 on raw features: each label's logistic regression at `c` on every
    image, with the standardisation folded in."""
    scaler = floored_scaler(features, config.scale_floor)
    x = scaler.transform(features)
    coef, intercept = np.zeros((truth.shape[1], features.shape[1])), np.zeros(truth.shape[1])
    with one_blas_thread():
        for j in range(truth.shape[1]):
            model = logistic(c, tol=config.tol).fit(x, truth[:, j])
            coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    kernel = (coef / scale).T
    return kernel.astype(np.float32), (intercept - (scaler.mean_ / scale) @ coef.T).astype(np.float32)
