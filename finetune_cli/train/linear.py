"""The linear head: logistic regression on frozen features, folded into a Dense layer.

scikit-learn's L-BFGS solves the convex problem exactly and picks C by
cross-validation in seconds, where a Keras dense head needs epochs and a
learning rate; the solution is then written into a softmax Dense layer so the
saved model is one Keras model on raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune_cli.analysis.scores import best_c, metric_value, selection_metric
from finetune_cli.config import LINEAR, LinearConfig
from finetune_cli.data.splits import content_groups, distinct_per_class, grouped_folds
from finetune_cli.features import extract
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.strategy.similarity import probe_layers
from finetune_cli.train.context import TrainResult
from finetune_cli.train.curve import table_curve
from finetune_cli.train.logistic import floored_scaler, logistic
from finetune_cli.train.sources import JointSource, PixelSource, Rows, StageSource


@dataclass
class LinearHead:
    """A fitted linear softmax head.

    Attributes:
        kernel: float32 (d, k), applied to raw (unstandardised) features.
        bias: float32 (k,).
        C: the chosen inverse regularisation strength.
        scores: one dict per C tried, by increasing C: {"C", "cv_accuracy", "cv_log_loss", "cv_macro_f1"}
            (the last of the pooled out-of-fold predictions).
        metric: what chose C: "accuracy", or "macro_f1" when the classes were weighted (imbalanced).
        oof: float32 (m, k) out-of-fold probabilities at `C` for the first m rows
            of the features (the `primary` rows: each image once, no augmented
            view), each from a head that never saw that image; None without folds.
    """

    kernel: np.ndarray
    bias: np.ndarray
    C: float
    scores: list = field(default_factory=list)
    oof: np.ndarray | None = None
    metric: str = "accuracy"

    @property
    def best_cv(self) -> float:
        """The best cross-validated accuracy over C (0-1); NaN when there were too few images to fold."""
        return max((s["cv_accuracy"] for s in self.scores), default=float("nan"))

    @property
    def best_score(self) -> float:
        """The best cross-validated `metric` over C (0-1), what chose C; NaN without folds."""
        return max((s[f"cv_{self.metric}"] for s in self.scores), default=float("nan"))

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
    config: LinearConfig = LINEAR,
    n_primary: int | None = None,
) -> LinearHead:
    """Fit a multinomial logistic regression on all rows, C chosen by grouped cross-validation.

    Args:
        features: float (n, d).
        labels: int (n,) in [0, n_classes).
        groups: image id per row, so augmented views of one image never sit on
            both sides of a fold; None when each row is its own image.
        balanced: weight classes inversely to their frequency, and choose C by macro-F1
            (`analysis.scores.selection_metric`) instead of accuracy.
        n_primary: the first `n_primary` rows are the images themselves (the
            rest augmented views of them): the out-of-fold probabilities are
            theirs; None: every row.
    """
    with one_blas_thread():
        return _fit_linear(features, labels, n_classes, groups, balanced, seed, config,
                           len(labels) if n_primary is None else n_primary)


def _fit_linear(features, labels, n_classes: int, groups, balanced: bool, seed: int, config: LinearConfig,
                n_primary: int) -> LinearHead:

    groups = np.arange(len(labels)) if groups is None else groups
    weight = "balanced" if balanced else None
    per_class = distinct_per_class(labels, groups)  # a fold cannot divide one image's copies or views
    n_folds = int(min(config.folds, per_class[per_class > 0].min()))
    scores, oof, metric = [], None, selection_metric(balanced)
    if n_folds >= 2:
        path = CPath(features, labels, grouped_folds(labels, groups, n_folds, seed), n_classes, n_primary, weight,
                     config, metric).search()
        scores = [{"C": c, "cv_accuracy": a, "cv_log_loss": loss, "cv_macro_f1": f1}
                  for c, (a, loss, _, f1) in sorted(path.items())]
        best = best_c(scores, metric)
        oof = path[best][2]
    else:  # too few images to fold: the one C given, else a moderate one
        best = config.c_grid[0] if len(config.c_grid) == 1 else 0.1
    scaler = floored_scaler(features, config.scale_floor)
    model = logistic(best, tol=config.tol, class_weight=weight).fit(scaler.transform(features), labels)
    return LinearHead(*_fold(model, scaler, n_classes), C=best, scores=scores, oof=oof, metric=metric)


class CPath:
    """Grouped-CV scores of a logistic regression along C, on a grid extended while its best is on an end.

    Each fold walks its Cs from the strongest regularisation up, every fit
    warm-started from the previous solution (the same optimum, about a third
    of the time of fitting each C from zero). When the best C is the grid's
    smallest or largest, `config.c_extend` more points of the same log step
    are tried beyond it, up to `config.c_range`. The best is by `metric` ("accuracy": the folds' mean;
    "macro_f1": of the pooled out-of-fold predictions, as an F1 of a few images per fold is too coarse).
    """

    def __init__(self, features, labels, folds, n_classes: int, n_primary: int, weight, config: LinearConfig,
                 metric: str = "accuracy"):
        self.x, self.y, self.folds, self.k, self.weight, self.config = features, labels, folds, n_classes, weight, config
        self.metric = metric
        self.primary = np.arange(len(labels)) < n_primary
        self.position = np.cumsum(self.primary) - 1  # row -> its row among the primary ones
        self.n_primary = n_primary
        self.models = [None] * len(folds)

    def search(self) -> dict[float, tuple[float, float, np.ndarray, float]]:
        """{C: (mean accuracy over folds, mean log loss, out-of-fold probabilities (n_primary, k), their macro-F1)}."""
        path = self.scores(sorted(self.config.c_grid))
        low, high = self.config.c_range
        while len(path) > 1:
            grid = sorted(path)
            best = best_c([{"C": c, "cv_accuracy": path[c][0], "cv_log_loss": path[c][1], "cv_macro_f1": path[c][3]}
                           for c in grid], self.metric)
            if best not in (grid[0], grid[-1]):
                return path
            down = best == grid[0]
            ratio = grid[0] / grid[1] if down else grid[-1] / grid[-2]  # the grid's own log step, outwards
            beyond = (best * ratio ** i for i in range(1, self.config.c_extend + 1))
            more = sorted(float(f"{c:.3g}") for c in beyond if low * 0.999 <= c <= high * 1.001)
            more = [c for c in more if c not in path]
            if not more:
                return path
            if down:
                self.models = [None] * len(self.folds)  # walk the new low end up from scratch
            path.update(self.scores(more))
        return path

    def scores(self, cs: list[float]) -> dict[float, tuple[float, float, np.ndarray, float]]:
        """Scores at each C of `cs` (ascending), each fold continuing from its last fitted model."""

        hits = {c: [] for c in cs}
        losses = {c: [] for c in cs}
        oof = {c: np.zeros((self.n_primary, self.k), np.float32) for c in cs}
        for i, (train, test) in enumerate(self.folds):
            scaler = floored_scaler(self.x[train], self.config.scale_floor)
            x_train, x_test = scaler.transform(self.x[train]), scaler.transform(self.x[test])
            if self.models[i] is None:
                self.models[i] = logistic(tol=self.config.tol, class_weight=self.weight, warm_start=True)
            keep = self.primary[test]
            for c in cs:
                model = self.models[i].set_params(C=c).fit(x_train, self.y[train])
                probs = np.zeros((len(test), self.k))
                probs[:, model.classes_] = model.predict_proba(x_test)
                truth = probs[np.arange(len(test)), self.y[test]]
                hits[c].append(float((probs.argmax(1) == self.y[test]).mean()))
                losses[c].append(float(-np.log(np.clip(truth, 1e-15, None)).mean()))
                oof[c][self.position[test[keep]]] = probs[keep]
        truth = self.y[self.primary]
        return {c: (float(np.mean(hits[c])), float(np.mean(losses[c])), oof[c],
                    metric_value("macro_f1", truth, oof[c].argmax(1))) for c in cs}


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


def fit_linear_plan(ctx, plan, similarity, n_stages: int, balanced: bool, recipe=None, curve: bool = False,
                    only: str | None = None):
    """Logistic regression on cached features of the plan's stage, folded into a Keras model.

    With `feature_stage = "best"` (small data unlike the pretraining data),
    the candidates of `candidate_sources` are compared by cross-validated
    accuracy on the training images and the best is kept; the comparison goes
    into metrics["candidates"] and plan.json.

    Args:
        ctx: the run's `train.context.Context`.
        similarity: the evidence (its `best_stage` is a candidate).
        recipe: its `pooling` and `linear_c` (0: C by cross-validation); None: the defaults.
        curve: also measure the kept head's learning curve (metrics["learning_curve"], `train.curve`).
        only: the name of the one candidate to fit (a refit of features already chosen), or None: all.

    Returns:
        A `TrainResult`; history is one row per C tried.
    """
    pooling, c = (recipe.pooling, recipe.linear_c) if recipe is not None else ("avg", 0.0)
    sources = candidate_sources(plan, similarity, n_stages, pooling)
    if only is not None:
        sources = [s for s in sources if s.name == only] or sources
    if len(sources) > 1:  # one backbone pass per view fills the cache for every stage candidate
        stages = sorted({k for s in sources for k in getattr(s, "layers", ())}, key=lambda k: k or n_stages + 1)
        for view in range(plan.feature_views + 1):
            ctx.features(ctx.train, stages, view, pooling=pooling)
    fits = [fit_source(ctx, source, plan.feature_views, balanced, c) for source in sources]
    cv = [f[1].best_score if np.isfinite(f[1].best_score) else -1.0 for f in fits]
    best = max(range(len(fits)), key=lambda i: (round(cv[i], 6), -i))
    source, head, (x, y), primary = sources[best], fits[best][1], fits[best][2], fits[best][3]
    extra = {}
    if len(sources) > 1:
        extra["candidates"] = _record_candidates(ctx, sources, [f[1] for f in fits], best)
    val_probs, val_labels = validation(ctx, source, head, y)
    model = source.model(ctx, head.kernel, head.bias)

    def score(scan):
        """(probabilities, ok) for scan.images through the source's features and the head: the model's own math."""
        rows = source.rows(ctx, scan)
        index = {r.path: i for i, r in enumerate(rows.records)}
        ok = np.array([r.path in index for r in scan.images])
        probs = np.zeros((len(scan.images), len(ctx.classes)), np.float32)
        probs[ok] = head.probabilities(rows.features)[[index[r.path] for r in scan.images if r.path in index]]
        return probs, ok

    metrics = {"train_accuracy": float((head.probabilities(x).argmax(1) == y).mean()), "C": head.C,
               "features": source.name, **extra}
    if ctx.out_of_fold:
        metrics["validation"] = out_of_fold_record(head, len(val_labels))
    if curve:
        metrics["learning_curve"] = table_curve(ctx, Rows(x[:len(primary)], primary), head.C, balanced)
    return TrainResult(model, plan, head.scores, val_probs, val_labels, metrics, score)


def validation(ctx, source, head: LinearHead, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), labels (n,)) the run is validated on: the held-out images through the head, or
    with `ctx.out_of_fold` (the training images are the validation images) the head's out-of-fold
    probabilities of every training image, in `ctx.train.images` order."""
    if not ctx.out_of_fold:
        val = source.rows(ctx, ctx.val)
        return head.probabilities(val.features), ctx.labels(val.records)
    if head.oof is None:
        raise ValueError("out-of-fold validation needs cross-validation folds (2 distinct images per class)")
    return head.oof, y[:len(head.oof)]


def out_of_fold_record(head: LinearHead, n: int) -> dict:
    """metrics["validation"] for a head validated out-of-fold on all n labelled images."""
    return {"method": "out-of-fold", "n_images": n, "C": head.C,
            "c_range_tried": [head.scores[0]["C"], head.scores[-1]["C"]] if head.scores else []}


def candidate_sources(plan, similarity, n_stages: int, pooling: str = "avg") -> list:
    """The feature sources a plan considers: its one stage, or (feature_stage "best") the stage the
    similarity probe found best (every probed stage when the verdict was forced and nothing was probed),
    the probed stages concatenated, raw pixels, and the probed stages beside raw pixels (`JointSource`)."""
    stage = plan.feature_stage
    if stage != "best":
        layer = None if stage == "final" or int(stage) == n_stages else int(stage)
        return [StageSource((layer,), pooling)]
    probed = tuple(probe_layers(n_stages))
    best = None if similarity.best_stage in (None, n_stages) else similarity.best_stage
    measured = bool(similarity.stage_accuracy) and best in probed
    # the probe already compared the single stages; without its evidence (a forced verdict), compare them here
    ordered = (best,) if measured else probed
    sources, pixels = [StageSource((k,), pooling) for k in ordered], PixelSource(LINEAR.pixel_side)
    if len(probed) > 1:
        sources.append(StageSource(probed, pooling))
    return sources + [pixels, JointSource(StageSource(probed, pooling), pixels)]


def fit_source(ctx, source, views: int, balanced: bool, c: float = 0.0):
    """(source, fitted head, (x, y), records) on the training images' features of `source`, views included
    (the first len(records) rows of x are the images themselves, `records` theirs); C fixed at `c` when > 0,
    else cross-validated."""
    import dataclasses

    ctx.reporter.on_phase(f"features: {source.name}" + (f", {views} augmented views" if views and source.views_apply
                                                          else ""))
    parts = [source.rows(ctx, ctx.train, view) for view in range(views + 1 if source.views_apply else 1)]
    x = np.concatenate([p.features for p in parts])
    y = np.concatenate([ctx.labels(p.records) for p in parts])
    groups = np.concatenate([[r.digest for r in p.records] for p in parts])
    ctx.reporter.on_phase(f"fitting the linear head on {source.name} features (cross-validated C)")
    config = dataclasses.replace(LINEAR, c_grid=(c,)) if c > 0 else LINEAR
    head = fit_linear(x, y, len(ctx.classes), groups=np.unique(groups, return_inverse=True)[1],
                      balanced=balanced, seed=ctx.seed, config=config, n_primary=len(parts[0].features))
    return source, head, (x, y), parts[0].records


def _record_candidates(ctx, sources, heads, best: int) -> list[dict]:
    """The candidates' cross-validated accuracies (and macro-F1, which chose, for imbalanced classes), as a
    note, in metrics and in plan.json."""
    metric = heads[best].metric
    table = [{"features": s.name, "cv_accuracy": round(h.best_cv, 4), f"cv_{metric}": round(h.best_score, 4),
              "C": h.C, "dims": int(h.kernel.shape[0]), "chosen": i == best}
             for i, (s, h) in enumerate(zip(sources, heads))]
    name = "macro-F1" if metric == "macro_f1" else "accuracy"
    ctx.reporter.on_note(f"features compared by cross-validated {name} on the training images: " + "; ".join(
        f"{row['features']} {row[f'cv_{metric}']:.1%}" for row in table) + f"; kept {sources[best].name}")
    path = ctx.run.file("plan.json")
    if path.exists():
        ctx.run.write_json("plan.json", {**ctx.run.read_json("plan.json"), "candidates": table})
    return table


def folder_head(scan, ref, *, cache=None, batch_size: int = 32, config=None, seed: int = 0, progress=None):
    """(feature table, labels (n,) int, `LinearHead`, whether classes were weighted) of a labelled scan: final-stage features, average
    pooled, through `cache`, and the head `fit_linear` fits on them (C by cross-validation; classes weighted
    when the largest is `imbalance_warn_ratio` x the smallest or more), for commands that need a head on a
    folder without a run (`suggest`, `curve`)."""
    from finetune_cli.config import FEATURES, SCAN

    config = config or SCAN
    table = extract(scan, ref, pooling=FEATURES.pooling, batch_size=batch_size, cache=cache, config=config,
                    progress=progress)
    index = {name: i for i, name in enumerate(scan.classes)}
    labels = np.array([index[r.label] for r in table.records], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(index))
    balanced = bool(counts.max() >= config.imbalance_warn_ratio * max(counts.min(), 1))
    head = fit_linear(table.features, labels, len(index), groups=content_groups(r.digest for r in table.records),
                      balanced=balanced, seed=seed)
    return table, labels, head, balanced

