"""The search space of a linear plan and the ways to walk it. Pure: no TensorFlow, no files.

    parameter  values                                   on the plot
    C          log range `TuneConfig.c_range`           log axis
    stage      the backbone's last stages, `final` last  categories
    pooling    `avg`, `max`                             categories
    views      augmented views per training image 0..N  integers

Methods (`pick_method`):

    grid     `ParameterGrid` over a log-grid of C (2^k + 1 points: a finer
             grid holds every point of a coarser one) times the other
             parameters, in a seeded order (a truncated grid still spreads out)
    random   `ParameterSampler`, C log-uniform rounded to 3 significant
             digits, duplicates dropped; the first n candidates are the
             same whatever the budget, so a resumed search continues it
    halving  random candidates, then successive halving over images: every
             candidate on a small stratified subsample, the best 1/factor on
             factor x the images, ..., the last rung on all of them
    auto     grid when one or two parameters vary, random from three up

A trial is known by its `key`, so a resumed search skips the trials it has.

A fine-tuning plan has its own space (`FinetuneSpace`) and one method,
successive halving over epochs (`epoch_rungs`): every candidate trains for a
few epochs, the best 1/factor train again for factor x the epochs, up to the
recipe's epochs (`random`: every candidate for all the epochs at once).

    parameter        values                                on the plot
    learning_rate    log range `TuneConfig.lr_range`       log axis
    top_lr_factor    `TuneConfig.top_lr_factors`           log axis
    dropout          `TuneConfig.dropouts`                 numbers
    l2               `TuneConfig.l2s`                      categories
    unfreeze_stages  1..n stages (`TuneConfig.max_unfreeze`) integers
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from finetune_cli.data.splits import distinct_per_class, grouped_folds
from finetune_cli.errors import FolderError, SettingsError

METHODS = ("auto", "grid", "random", "halving")
#: The parameters of a linear plan, in the order trials.csv lists them.
PARAMETERS = ("C", "stage", "pooling", "views")


@dataclass(frozen=True)
class Space:
    """What a linear search may choose.

    Attributes:
        c_range: (low, high) inverse regularisation strengths, 0 < low <= high.
        stages: feature stages, earliest first: stage indices as text, and
            `final` (the backbone's output) last.
        poolings: of `avg` and `max`.
        views: augmented views per training image, ascending (0 = none).
    """

    c_range: tuple[float, float]
    stages: tuple[str, ...]
    poolings: tuple[str, ...]
    views: tuple[int, ...]

    def values(self) -> dict:
        """The discrete parameters' candidates: {name: list}."""
        return {"stage": list(self.stages), "pooling": list(self.poolings), "views": list(self.views)}

    def varying(self) -> list[str]:
        """The parameters with more than one possible value, in `PARAMETERS` order."""
        moving = {"C": self.c_range[0] < self.c_range[1], **{k: len(v) > 1 for k, v in self.values().items()}}
        return [name for name in PARAMETERS if moving[name]]

    def to_dict(self) -> dict:
        return asdict(self)


def round_c(c: float) -> float:
    """A log-range value (C, a learning rate) to 3 significant digits: what trials.csv holds and trials are
    matched by."""
    return float(f"{float(c):.3g}")


def key(params: dict) -> str:
    """One trial's identity, e.g. `C=0.1|stage=final|pooling=avg|views=2`."""
    return (f"C={float(params['C']):.3g}|stage={params['stage']}|pooling={params['pooling']}"
            f"|views={int(params['views'])}")


def pick_method(method: str, space: Space) -> str:
    """The method to run: `method`, or for `auto` grid (1-2 varying parameters) or random (3+).

    Raises:
        SettingsError: an unknown method.
    """
    if method not in METHODS:
        raise SettingsError(f"--method must be one of {', '.join(METHODS)}. Received: --method={method!r}")
    if method != "auto":
        return method
    return "grid" if len(space.varying()) <= 2 else "random"


def c_grid(space: Space, budget: int, max_points: int) -> list[float]:
    """Log-spaced C values: 2^k + 1 points (k >= 1, at most `max_points`), the most the budget allows
    with every combination of the other parameters; 3 when even that does not fit."""
    low, high = space.c_range
    if low == high:
        return [round_c(low)]
    others = math.prod(len(v) for v in space.values().values())
    points = 3
    while 2 * points - 1 <= max_points and (2 * points - 1) * others <= budget:
        points = 2 * points - 1
    return [round_c(c) for c in np.logspace(math.log10(low), math.log10(high), points)]


def grid_candidates(space: Space, budget: int, seed: int, max_points: int) -> list[dict]:
    """Every point of the grid (see `c_grid`), in a seeded order; the caller takes the first `budget`."""
    from sklearn.model_selection import ParameterGrid

    grid = list(ParameterGrid({"C": c_grid(space, budget, max_points), **space.values()}))
    order = np.random.default_rng(seed).permutation(len(grid))
    return [_typed(grid[i]) for i in order]


def random_candidates(space: Space, budget: int, seed: int) -> list[dict]:
    """Up to `budget` distinct candidates from `ParameterSampler` (C log-uniform, rounded).

    The stream depends on the seed alone, so the first n candidates are the
    same for any budget >= n. Fewer than `budget` when the space runs out.
    """
    from scipy.stats import loguniform

    low, high = space.c_range
    values = {"C": [round_c(low)] if low == high else loguniform(low, high), **space.values()}
    return sampled(values, "C", budget, seed, _typed, key)


def sampled(values: dict, logged: str, budget: int, seed: int, typed, identity) -> list[dict]:
    """Up to `budget` distinct candidates from `ParameterSampler(values)`, `logged` rounded (`round_c`).

    `values` maps names to lists or, for `logged`, a distribution; `typed`
    makes a candidate plain, `identity` names it. With lists only the sampler
    draws without replacement, so the whole grid is drawn (a fixed order).
    """
    from sklearn.model_selection import ParameterSampler

    if all(isinstance(v, list) for v in values.values()):
        n_iter = math.prod(len(v) for v in values.values())
    else:
        n_iter = 20 * budget + 100
    chosen: dict[str, dict] = {}
    for params in ParameterSampler(values, n_iter=n_iter, random_state=seed):
        params = typed({**params, logged: round_c(params[logged])})
        chosen.setdefault(identity(params), params)
        if len(chosen) == budget:
            break
    return list(chosen.values())


def _typed(params: dict) -> dict:
    """Plain Python values (numpy scalars out), in `PARAMETERS` order."""
    return {"C": float(params["C"]), "stage": str(params["stage"]), "pooling": str(params["pooling"]),
            "views": int(params["views"])}


def halving_schedule(n_candidates: int, n_images: int, min_images: int, factor: int) -> list[tuple[int, int]]:
    """Successive-halving rungs: [(candidates, images)], the last on all `n_images`.

    Candidates shrink by `factor` per rung down to one or more; images grow by
    `factor` per rung. Rungs that would use fewer than `min_images` are dropped
    (tiny data: a single rung, i.e. a random search).
    """
    rungs = 1 + int(math.floor(math.log(max(n_candidates, 1), factor) + 1e-9))
    while rungs > 1 and n_images // factor ** (rungs - 1) < min_images:
        rungs -= 1
    return [(math.ceil(n_candidates / factor ** r), n_images // factor ** (rungs - 1 - r)) for r in range(rungs)]


def subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subsample of about `n` rows; a smaller n gives a subset of a larger one.

    Each class keeps the first share of its rows in one seeded order (at least 2 rows).
    """
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        keep.extend(rows[: max(2, int(round(n * len(rows) / len(labels))))])
    return np.sort(np.array(keep))


@dataclass(frozen=True)
class Folds:
    """The cross-validation every trial of a search is scored with (the same splits: paired comparisons).

    Attributes:
        splits: [(train rows, test rows)] into the scored rows.
        folds: folds per repetition (2 to --cv).
        repeats: repetitions (1, or more for tiny data).
    """

    splits: list
    folds: int
    repeats: int

    def describe(self) -> str:
        return f"{self.folds}-fold stratified" + (f", repeated {self.repeats}x" if self.repeats > 1 else "")


def cv_folds(labels: np.ndarray, cv: int, repeat_below: int, repeats: int, seed: int,
             groups: np.ndarray | None = None) -> Folds:
    """Stratified K-fold splits of `labels` (int (n,)), repeated with new folds when the smallest class is tiny.

    `groups` (n,) int, when given, keeps rows of one group (identical files,
    `data.splits.content_groups`) in one fold; K is then bounded by the
    smallest class's number of distinct images.

    Raises:
        FolderError: a class has fewer than 2 distinct rows (nothing to cross-validate).
    """
    per_class = distinct_per_class(labels, groups)
    smallest = int(per_class[np.unique(labels)].min())
    folds = min(cv, smallest)
    if folds < 2:
        raise FolderError(f"a class has {smallest} distinct image(s) outside the held-out set: cross-validation "
                          "needs at least 2 per class; add images")
    repeats = repeats if smallest < repeat_below and repeats > 1 else 1
    return Folds(grouped_folds(labels, groups, folds, seed, repeats), folds, repeats)


def best_trial(rows: list[dict], metric: str = "accuracy") -> dict | None:
    """The row with the highest mean `metric` ("accuracy", or "macro_f1" for imbalanced classes); ties go to
    the lower std, fewer views, then smaller C (simpler)."""
    if not rows:
        return None
    mean, std = f"mean_{metric}", f"std_{metric}"
    return max(rows, key=lambda r: (round(r[mean], 6), -round(r[std], 6), -r["views"], -r["C"]))


def edge_warnings(best: dict, space: Space, fraction: float) -> list[str]:
    """Lines for best values within `fraction` of an end of their range, where the range could go further.

    C: either end, on a log scale. views: the top end (0 is a natural floor).
    stage: the earliest searched stage, when earlier ones exist (`final` is the top).
    """
    lines = []
    low, high = (math.log10(c) for c in space.c_range)
    where = (math.log10(best["C"]) - low) / (high - low) if high > low else 0.5
    if where <= fraction or where >= 1 - fraction:
        end, bound = ("low", space.c_range[0]) if where <= fraction else ("high", space.c_range[1])
        lines.append(f"the best C ({best['C']:.3g}) lies at the {end} edge of the range searched "
                     f"({space.c_range[0]:g} to {space.c_range[1]:g}): widen TuneConfig.c_range beyond {bound:g}")
    top = max(space.views)
    if top > 0 and best["views"] >= top - fraction * top:
        lines.append(f"the best number of augmented views ({best['views']}) is the most searched: more views "
                     "might score higher (raise TuneConfig.max_views)")
    first = space.stages[0]
    if len(space.stages) > 1 and str(best["stage"]) == first and first.isdigit() and int(first) > 1:
        lines.append(f"the best stage ({first}) is the earliest searched: an earlier stage might score higher "
                     "(raise TuneConfig.stages)")
    return lines


#: The parameters of a fine-tuning plan, in the order trials.csv lists them.
FINETUNE_PARAMETERS = ("learning_rate", "top_lr_factor", "dropout", "l2", "unfreeze_stages")
#: Fine-tuning search methods: `auto` and `halving` are successive halving over epochs.
FINETUNE_METHODS = ("auto", "halving", "random")


@dataclass(frozen=True)
class FinetuneSpace:
    """What a fine-tuning search may choose, and the epochs it may spend.

    Attributes:
        lr_range: (low, high) head learning rates, 0 < low <= high, log-uniform.
        top_lr_factors: top-stage rate / head rate, each in (0, 1].
        dropouts: dropout before the head, each in [0, 1).
        l2s: L2 penalties on the head's kernel, each >= 0.
        unfreeze: how many top stages train, ascending, within 1..n.
        epochs: (first rung, most): the first rung's epochs and the recipe's.
    """

    lr_range: tuple[float, float]
    top_lr_factors: tuple[float, ...]
    dropouts: tuple[float, ...]
    l2s: tuple[float, ...]
    unfreeze: tuple[int, ...]
    epochs: tuple[int, int]

    def values(self) -> dict:
        """The discrete parameters' candidates: {name: list}."""
        return {"top_lr_factor": list(self.top_lr_factors), "dropout": list(self.dropouts), "l2": list(self.l2s),
                "unfreeze_stages": list(self.unfreeze)}

    def varying(self) -> list[str]:
        """The parameters with more than one possible value, in `FINETUNE_PARAMETERS` order."""
        moving = {"learning_rate": self.lr_range[0] < self.lr_range[1], **{k: len(v) > 1 for k, v in
                                                                            self.values().items()}}
        return [name for name in FINETUNE_PARAMETERS if moving[name]]

    def to_dict(self) -> dict:
        return asdict(self)


def finetune_key(params: dict) -> str:
    """One fine-tuning candidate's identity, e.g. `lr=0.001|top=0.1|dropout=0.2|l2=0.0001|unfreeze=1`."""
    return (f"lr={float(params['learning_rate']):.3g}|top={float(params['top_lr_factor']):g}"
            f"|dropout={float(params['dropout']):g}|l2={float(params['l2']):g}"
            f"|unfreeze={int(params['unfreeze_stages'])}")


def _finetune_typed(params: dict) -> dict:
    """Plain Python values (numpy scalars out), in `FINETUNE_PARAMETERS` order."""
    return {"learning_rate": float(params["learning_rate"]), "top_lr_factor": float(params["top_lr_factor"]),
            "dropout": float(params["dropout"]), "l2": float(params["l2"]),
            "unfreeze_stages": int(params["unfreeze_stages"])}


def finetune_candidates(space: FinetuneSpace, budget: int, seed: int) -> list[dict]:
    """Up to `budget` distinct candidates from `ParameterSampler` (learning rate log-uniform, rounded).

    As `random_candidates`: the first n are the same for any budget >= n, so a
    resumed search with a larger budget continues this one.
    """
    from scipy.stats import loguniform

    low, high = space.lr_range
    values = {"learning_rate": [round_c(low)] if low == high else loguniform(low, high), **space.values()}
    return sampled(values, "learning_rate", budget, seed, _finetune_typed, finetune_key)


def pick_finetune_method(method: str) -> str:
    """`halving` (for auto and halving) or `random`.

    Raises:
        SettingsError: grid (a fine-tuning space is searched by sampling) or an unknown method.
    """
    if method not in FINETUNE_METHODS:
        raise SettingsError(f"--method must be one of {', '.join(FINETUNE_METHODS)} for a fine-tuning plan "
                            f"(grid searches linear plans only). Received: --method={method!r}")
    return "random" if method == "random" else "halving"


def epoch_rungs(n_candidates: int, first: int, most: int, factor: int) -> list[tuple[int, int]]:
    """Successive-halving rungs over epochs: [(candidates, epochs)].

    The first rung trains every candidate for `first` epochs; each next rung
    keeps ceil(1/factor) of the candidates and gives them factor x the epochs
    (at most `most`), until one candidate is left or `most` epochs are reached.
    """
    rungs = [(n_candidates, min(first, most))]
    while rungs[-1][0] > 1 and rungs[-1][1] < most:
        rungs.append((math.ceil(rungs[-1][0] / factor), min(most, rungs[-1][1] * factor)))
    return rungs


def finetune_rank(row: dict, metric: str = "accuracy") -> tuple:
    """Sort key of a fine-tuning trial, best first: more epochs (a later rung), then lower validation
    cross-entropy, higher accuracy, fewer unfrozen stages, lower rate (simpler, safer). With `metric`
    "macro_f1" (imbalanced classes) a higher validation macro-F1 comes before the cross-entropy, which an
    imbalanced validation set leaves to its large classes."""
    first = (-row["val_macro_f1"],) if metric == "macro_f1" else ()
    return (-row["epochs"], *first, row["val_loss"], -row["val_accuracy"], row["unfreeze_stages"],
            row["learning_rate"])


def best_finetune_trial(rows: list[dict], metric: str = "accuracy") -> dict | None:
    """The best trial with a finite score at the most epochs any such trial ran (see `finetune_rank`)."""
    scored = [r for r in rows if math.isfinite(r["val_loss"])]
    return min(scored, key=lambda r: finetune_rank(r, metric)) if scored else None


def finetune_edge_warnings(best: dict, space: FinetuneSpace, n_stages: int, fraction: float) -> list[str]:
    """Lines for a best learning rate within `fraction` (log scale) of an end of its range, the most stages
    searched when more exist, and a best epoch that is the last one the recipe allows (still improving)."""
    lines = []
    low, high = (math.log10(v) for v in space.lr_range)
    where = (math.log10(best["learning_rate"]) - low) / (high - low) if high > low else 0.5
    if where <= fraction or where >= 1 - fraction:
        end = "low" if where <= fraction else "high"
        lines.append(f"the best learning rate ({best['learning_rate']:.3g}) lies at the {end} edge of the range "
                     f"searched ({space.lr_range[0]:g} to {space.lr_range[1]:g}): widen TuneConfig.lr_range")
    if best["unfreeze_stages"] == max(space.unfreeze) < n_stages:
        lines.append(f"the best number of unfrozen stages ({best['unfreeze_stages']}) is the most searched of "
                     f"{n_stages}: more might score better (raise TuneConfig.max_unfreeze)")
    if best["best_epoch"] == best["epochs"] == space.epochs[1]:
        lines.append(f"the best trial still improved at its last epoch ({best['epochs']}): more epochs might score "
                     "better (raise epochs in the recipe)")
    return lines


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion hits / n (0-1), (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre, spread = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n)), min(1.0, (centre + spread) / (1 + z * z / n))


DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)?", re.IGNORECASE)
SECONDS = {"h": 3600, "m": 60, "s": 1, None: 1}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90`, `90s`, `5m`, `1h30m` or `1.5h` (> 0).

    Raises:
        SettingsError: anything else.
    """
    source = str(text).strip()
    parts = list(DURATION.finditer(source))
    joined = "".join(m.group(0) for m in parts).replace(" ", "")
    if not parts or joined != source.replace(" ", "") or (len(parts) > 1 and any(m[2] is None for m in parts)):
        raise SettingsError(f"--time must be a duration such as 90s, 5m or 1h30m. Received: --time={text!r}")
    seconds = sum(float(m[1]) * SECONDS[m[2] and m[2].lower()] for m in parts)
    if seconds <= 0:
        raise SettingsError(f"--time must be longer than 0 s. Received: --time={text!r}")
    return seconds


def parse_budget(text) -> int:
    """A trial budget: a whole number >= 1.

    Raises:
        SettingsError: anything else.
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"--budget must be a whole number of trials, at least 1. Received: --budget={text!r}")
    return value
