"""Hyper-parameter search of a fine-tuning plan (`finetune tune` with partial, partial-2, full, or a large folder).

    split     the searched images (the training split of `train --seed S`) -> trial training images and
              trial validation images (a stratified seeded `TrainConfig.val_fraction` of them); the
              held-out images (train's validation split) stay unseen until the estimate
    space     `ParameterSampler` candidates of learning_rate (log-uniform), top_lr_factor, dropout, l2 and
              unfreeze_stages (1..n) (`tasks.tune.space.FinetuneSpace`)
    trials    each one exactly what `train` fine-tunes (`train.finetune.start_fine_tuning`: the head from the
              linear solution, the frozen prefix's activations from the feature cache), run by the engine
              (`engine.fit_with_retries`: NaN guard, early stopping, plateau decay) for the rung's epochs
    halving   successive halving over epochs (`tasks.tune.space.epoch_rungs`): every candidate for
              `TuneConfig.first_epochs`, the best 1/factor for factor x the epochs, ... up to the recipe's
              epochs. A survivor restarts from the same start (the linear head on fresh pretrained weights)
              rather than continuing: no model or checkpoint is kept between rungs, so memory stays flat,
              and each row of trials.csv is one reproducible run (a resumed search reuses it)
    score     the lowest validation cross-entropy over the trial's epochs (the weights early stopping keeps),
              accuracy breaking ties: on a few dozen validation images accuracy moves in steps of several
              points and ties between most candidates, where cross-entropy still ranks them, and it is the
              loss early stopping watches. Not cross-validated: k folds would cost k fine-tuning runs per trial
    estimate  the best trial's configuration (as best.toml holds it: its best epoch as `epochs`) trained once
              more on all searched images, for that many epochs without early stopping or plateau decay
              (both would choose on validation images), then scored on the held-out images; their
              per-epoch scores are shown but choose nothing. It is what `train --recipe best.toml --seed S`
              trains, epoch for epoch, up to the choices train makes on those images (an earlier epoch,
              or the linear head when fine-tuning does not beat it)
    write     trials.csv (after every trial), best.toml, search.png, summary.json

Every trial builds its own backbone from `ctx.backbone.ref` (fresh pretrained weights, fresh trainable
flags: the shared backbone is never trained) and keeps no reference when it ends (then `gc.collect()`).
`keras.backend.clear_session()` is not called: it would reset the caller's Keras global state (dtype
policy, logging) and, measured, does not reduce TensorFlow's own native growth per trained model (about
2 MB per trial on the tiny test backbone, 20 MB on EfficientNet-Lite0; tensorflow/tensorflow#61791).
The feature cache is shared: trials that unfreeze the same stages cut the network at the same layer and
read its activations from the cache (trials.csv's `computed` column counts what a backbone pass computed).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import numpy as np

from finetune_cli.analysis.calibration import nll
from finetune_cli.analysis.scores import selection_metric
from finetune_cli.config import TRAIN, TUNE, TrainConfig, TuneConfig
from finetune_cli.errors import FolderError, SettingsError
from finetune_cli.features import FeatureCache
from finetune_cli.models.backbones import build
from finetune_cli.progress import Reporter
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.strategy.decide import decide
from finetune_cli.tasks.tune import space as walk
from finetune_cli.tasks.tune.files import FINETUNE_TABLE, TrialLog, TuneFolder, finetune_figure, finetune_recipe_text
from finetune_cli.train.context import Context, split
from finetune_cli.train.engine import Diverged, fit_with_retries
from finetune_cli.train.session import is_imbalanced, n_stages


class CountingCache(FeatureCache):
    """The feature cache, counting the vectors written to it (each one computed by a backbone pass)."""

    def __init__(self, cache: FeatureCache):
        super().__init__(cache.root)
        self.writes = 0

    def put(self, namespace: str, digest: str, vector: np.ndarray, dtype: str = "float32") -> None:
        self.writes += 1
        super().put(namespace, digest, vector, dtype)


class _ProgressOnly(Reporter):
    """Passes on the progress of a trial's backbone passes, not the phases and notes of the steps inside it
    (the same for every trial; the trial's own line says what it is)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def on_progress(self, done: int, total: int) -> None:
        self.reporter.on_progress(done, total)


def search_finetune(folder: TuneFolder, ctx: Context, profile, recipe: recipe_files.Recipe, similarity: str,
                    facts: dict, definition: dict, *, method: str, budget: int | None, time_limit: float | None,
                    seed: int, started: float, settings: TuneConfig = TUNE,
                    train_settings: TrainConfig = TRAIN, engine=None) -> dict:
    """Search `recipe`'s fine-tuning hyper-parameters on `ctx`'s training split; returns the summary.

    Args:
        folder: the search folder (tune.json, trials.csv, ... go there).
        ctx: from `tasks.train.prepare`: ctx.train the searched images, ctx.val the held-out ones.
        similarity: `similar` or `different`, wording the plans' reasons only.
        facts, definition: what `tasks.tune.tune` knows of the search, and its tune.json entries.
        engine: None (trials here, one by one) or a `scale.ray_tune.RayTrials` (each rung's on a Ray cluster).

    Raises:
        SettingsError: a setting out of range, grid, or no trial finished within --time.
        FolderError: a class has fewer than 2 searched images.
        OutputError: the folder holds a different search.
    """
    used = walk.pick_finetune_method(method)
    space = finetune_space(ctx, recipe, settings)
    trial_train, trial_val = trial_split(ctx, train_settings.val_fraction, seed)
    folder.record_definition({**definition, "kind": "fine-tuning", "recipe": dataclasses.asdict(recipe),
                              "folds": {"trial_val_fraction": train_settings.val_fraction}})
    ctx = dataclasses.replace(ctx, cache=CountingCache(ctx.cache) if ctx.cache is not None else None)
    trials = Trials(ctx, recipe, (trial_train, trial_val), TrialLog(folder, FINETUNE_TABLE, ctx.reporter),
                    Decider(profile.size_category, similarity, n_stages(ctx)), is_imbalanced(ctx, profile),
                    started + time_limit if time_limit else None, train_settings, engine)
    n = budget or settings.finetune_budget
    candidates = walk.finetune_candidates(space, n, seed)
    first, most = space.epochs
    rungs = walk.epoch_rungs(len(candidates), first, most, settings.epoch_factor) if used == "halving" \
        else [(len(candidates), most)]
    ctx.reporter.on_phase(f"searching fine-tuning ({used}): {len(candidates)} candidates, "
                          f"{', '.join(space.varying()) or 'nothing'} varying; rungs "
                          f"{', '.join(f'{k} x {e} epoch(s)' for k, e in rungs)}; scored on {len(trial_val.images)} "
                          f"validation images of the {len(ctx.train.images)} searched")
    run_rungs(trials, candidates, rungs)
    notes = search_notes(trials, rungs, ctx)
    facts = {**facts, "method": used, "budget": budget}
    return finish(folder, trials, space, recipe, rungs, notes, facts, started, settings)


def finetune_space(ctx: Context, recipe: recipe_files.Recipe, settings: TuneConfig) -> walk.FinetuneSpace:
    """The fine-tuning space of `settings` for this backbone and recipe (unfrozen stages 1..n, epochs up to
    the recipe's).

    Raises:
        SettingsError: a setting out of range.
    """
    low, high = settings.lr_range
    checks = {"lr_range": 0 < low <= high < math.inf,
              "top_lr_factors": bool(settings.top_lr_factors) and all(0 < v <= 1 for v in settings.top_lr_factors),
              "dropouts": bool(settings.dropouts) and all(0 <= v < 1 for v in settings.dropouts),
              "l2s": bool(settings.l2s) and all(0 <= v < math.inf for v in settings.l2s),
              "max_unfreeze": settings.max_unfreeze >= 0, "first_epochs": settings.first_epochs >= 1,
              "max_epochs": 0 <= settings.max_epochs <= 1000, "epoch_factor": settings.epoch_factor >= 2,
              "finetune_budget": settings.finetune_budget >= 1}
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise SettingsError("TuneConfig needs 0 < lr_range[0] <= lr_range[1], top_lr_factors in (0, 1], dropouts "
                            "in [0, 1), l2s >= 0, max_unfreeze >= 0, first_epochs >= 1, max_epochs 0-1000, "
                            "epoch_factor >= 2, finetune_budget >= 1. Received: "
                            + ", ".join(f"{name}={getattr(settings, name)}" for name in wrong))
    n = n_stages(ctx)
    top = min(settings.max_unfreeze or n, n)
    most = settings.max_epochs or recipe.epochs
    return walk.FinetuneSpace((float(low), float(high)), tuple(sorted(map(float, settings.top_lr_factors))),
                              tuple(sorted(map(float, settings.dropouts))), tuple(sorted(map(float, settings.l2s))),
                              tuple(range(1, top + 1)), (min(settings.first_epochs, most), most))


def trial_split(ctx: Context, fraction: float, seed: int):
    """(trial training scan, trial validation scan): a stratified seeded `fraction` of the searched images.

    Raises:
        FolderError: a class has fewer than 2 searched images.
    """
    counts = np.bincount(ctx.labels(ctx.train.images), minlength=len(ctx.classes))
    if counts.min() < 2:
        raise FolderError(f"a class has {int(counts.min())} image(s) outside the held-out set: fine-tuning trials "
                          "need at least 2 per class (one to train on, one to score on); add images")
    return split(ctx.train, None, fraction, seed=seed)


@dataclasses.dataclass(frozen=True)
class Decider:
    """Makes the plan of a recipe as `train` would (`strategy.decide.decide`), for this folder and backbone."""

    size_category: str
    similarity: str
    n_stages: int

    def plan(self, recipe: recipe_files.Recipe):
        return decide(self.size_category, self.similarity, self.n_stages, recipe, overridden=True)


def trial_recipe(base: recipe_files.Recipe, params: dict, epochs: int) -> recipe_files.Recipe:
    """`base` with a candidate's parameters and `epochs`."""
    return dataclasses.replace(base, learning_rate=params["learning_rate"], top_lr_factor=params["top_lr_factor"],
                               dropout=params["dropout"], l2=params["l2"],
                               unfreeze_stages=params["unfreeze_stages"], epochs=epochs)


@dataclasses.dataclass
class Fitted:
    """One fine-tuning run (a trial, or the estimate's).

    Attributes:
        history: the engine's rows (epoch, loss, val_loss, val_accuracy, ...); [] when it diverged.
        best_epoch: the epoch of the lowest validation loss (1-based; 0 when it diverged).
        rate_factor: 1, or 0.1, 0.01 when the NaN guard lowered every rate.
        status: `ok` or `diverged` (still NaN after `TrainConfig.max_retries` retries).
        probs: (n_val, k) validation probabilities after the last epoch; labels (n_val,). None for a trial.
    """

    history: list
    best_epoch: int
    rate_factor: float
    status: str
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None


def fit_once(ctx: Context, scans: tuple, recipe, plan, balanced: bool, settings: TrainConfig, *,
             select: bool) -> Fitted:
    """Fine-tune a fresh copy of the backbone on scans = (training, validation) as `train` would; drop it after.

    `select` True: the engine's early stopping and plateau decay watch the
    validation images (a trial). False: exactly `plan.epochs` epochs and
    nothing chosen on the validation images, which are scored once at the
    end (the estimate).
    """
    try:
        return _fit_fresh(ctx, scans, recipe, plan, balanced, settings, select)
    finally:
        gc.collect()  # Keras layers and nodes refer to each other: free the trial's model now, not some time later


def _fit_fresh(ctx: Context, scans: tuple, recipe, plan, balanced: bool, settings: TrainConfig,
               select: bool) -> Fitted:
    from finetune_cli.train.finetune import start_fine_tuning
    from finetune_cli.train.setup import finetuner, predict_batches

    reporter = ctx.reporter
    # a backbone of its own: fresh pretrained weights and trainable flags, and the shared one is never trained
    fresh = dataclasses.replace(ctx, run=None, train=scans[0], val=scans[1], backbone=build(ctx.backbone.ref),
                                reporter=_ProgressOnly(reporter))
    model, trainable, train_data, val_data = start_fine_tuning(fresh, plan, recipe, balanced, settings)
    trainer, validate = finetuner(trainable, plan, recipe, val_data, whole=model, schedule=select,
                                  metric=selection_metric(balanced), progress=lambda state, total: reporter.on_epoch(state.history[-1], total))
    factor = [1.0]

    def retry(exc, lowered: float) -> None:
        factor[0] = lowered
        reporter.on_note(f"{exc}: retrying this trial at every rate x{lowered:g}")

    try:
        state = fit_with_retries(trainer, train_data, validate, plan.epochs, retries=settings.max_retries,
                                 on_retry=retry)
    except Diverged:
        return Fitted([], 0, factor[0], "diverged")
    probs, labels = (None, None) if select else predict_batches(trainable, val_data)
    return Fitted(state.history, state.best_epoch, factor[0], "ok", probs, labels)


class Trials:
    """Runs fine-tuning trials on the trial split: each logged, skipped when trials.csv already has it.

    Attributes:
        stopped: the --time limit was reached (no trial starts after it).
    """

    def __init__(self, ctx: Context, recipe, scans: tuple, log: TrialLog, decider: Decider, balanced: bool,
                 deadline: float | None, settings: TrainConfig, engine=None):
        self.ctx, self.recipe, self.scans, self.log, self.decider = ctx, recipe, scans, log, decider
        self.balanced, self.deadline, self.settings, self.stopped = balanced, deadline, settings, False
        self.engine = engine

    @property
    def metric(self) -> str:
        """What ranks trials first: "accuracy" (then the cross-entropy leads), or "macro_f1" when imbalanced."""
        return selection_metric(self.balanced)

    def time_up(self) -> bool:
        self.stopped = self.stopped or (self.deadline is not None and time.perf_counter() >= self.deadline)
        return self.stopped

    def trial(self, params: dict, epochs: int, rung: int) -> dict | None:
        """The row of `params` trained for `epochs`: from trials.csv, or run now; None when the time is up."""
        done = self.log.get({**params, "epochs": epochs})
        if done is not None:
            return done
        if self.time_up():
            return None
        recipe = trial_recipe(self.recipe, params, epochs)
        self.ctx.reporter.on_phase(f"trial {len(self.log.rows) + 1} (rung {rung + 1}, {epochs} epoch(s)): "
                                   f"{walk.finetune_key(params).replace('|', ', ')}")
        start, writes = time.perf_counter(), self.writes()
        fitted = fit_once(self.ctx, self.scans, recipe, self.decider.plan(recipe), self.balanced, self.settings,
                          select=True)
        best = fitted.history[fitted.best_epoch - 1] if fitted.best_epoch else {}
        return self.log.add({"rung": rung, "epochs": epochs, **params, "best_epoch": fitted.best_epoch,
                             "val_loss": best.get("val_loss", math.inf), "val_accuracy": best.get("val_accuracy", 0.0),
                             "val_macro_f1": best.get("val_macro_f1", 0.0),
                             "train_loss": best.get("loss", math.inf), "n_train": len(self.scans[0].images),
                             "n_val": len(self.scans[1].images), "rate_factor": fitted.rate_factor,
                             "status": fitted.status, "computed": self.writes() - writes,
                             "seconds": round(time.perf_counter() - start, 3)})

    def writes(self) -> int:
        """Vectors the feature cache has been given so far (0 without a cache)."""
        return getattr(self.ctx.cache, "writes", 0)


def run_rungs(trials: Trials, candidates: list[dict], rungs: list[tuple[int, int]]) -> None:
    """Successive halving: each rung's survivors trained for its epochs, the best (`finetune_rank`) go on.

    With `trials.engine` (`scale.ray_tune`), a rung's trials run at once on the cluster; else here, one by one.
    """
    survivors, total, done = candidates, sum(k for k, _ in rungs), 0
    for rung, (keep, epochs) in enumerate(rungs):
        if trials.engine is not None:
            rows = trials.engine.run(trials, [(params, epochs, rung) for params in survivors[:keep]])
        else:
            rows = []
            for params in survivors[:keep]:
                rows.append(trials.trial(params, epochs, rung))
                if rows[-1] is None:
                    break
                done += 1
                trials.ctx.reporter.on_progress(done, total)
        if None in rows:
            return
        scored = list(zip(survivors[:keep], rows))
        survivors = [p for p, _ in sorted(scored, key=lambda pair: walk.finetune_rank(pair[1], trials.metric))]


def search_notes(trials: Trials, rungs: list[tuple[int, int]], ctx: Context) -> list[str]:
    """Lines for the user: how trials were scored, stops, divergences, and --no-cache."""
    n_val = len(trials.scans[1].images)
    score = ("validation macro-F1 (the classes are imbalanced), ties by cross-entropy," if trials.metric == "macro_f1"
             else "validation cross-entropy")
    notes = [f"each trial is scored by its {score} on {n_val} of the searched images (one split; "
             "cross-validating fine-tuning would cost a run per fold, so --cv does not apply)"]
    if len(rungs) > 1:
        notes.append("halving: " + ", then ".join(f"{k} candidate(s) x {e} epoch(s)" for k, e in rungs)
                     + "; each rung restarts its survivors from the linear head on pretrained weights")
    diverged = sum(r["status"] == "diverged" for r in trials.log.rows)
    if diverged:
        notes.append(f"{diverged} trial(s) diverged even at lr/100 (val_loss inf in trials.csv): lower "
                     "TuneConfig.lr_range")
    if ctx.cache is None:
        notes.append("--no-cache: the frozen stages ran in every epoch of every trial")
    if trials.stopped:
        notes.append("stopped at the --time limit: rerun with the same --out (and more time) to continue")
    return notes


def held_out_estimate(trials: Trials, recipe: recipe_files.Recipe) -> dict:
    """`recipe` (best.toml's) trained on all searched images for its epochs, scored once on the held-out ones."""
    ctx = trials.ctx
    ctx.reporter.on_phase(f"estimate: the best configuration on all {len(ctx.train.images)} searched images for "
                          f"{recipe.epochs} epoch(s), then scored on {len(ctx.val.images)} held-out images")
    fitted = fit_once(ctx, (ctx.train, ctx.val), recipe, trials.decider.plan(recipe), trials.balanced,
                      trials.settings, select=False)
    if fitted.status != "ok":
        raise SettingsError("the best configuration diverged when trained on all searched images: lower "
                            "TuneConfig.lr_range and rerun with the same --out")
    n = len(fitted.labels)
    hits = int((fitted.probs.argmax(1) == fitted.labels).sum())
    low, high = walk.wilson(hits, n)
    return {"kind": "held-out", "accuracy": hits / n if n else None, "n_correct": hits, "n_images": n,
            "interval95": [round(low, 4), round(high, 4)],
            "cross_entropy": nll(fitted.probs, fitted.labels, floor=1e-7) if n else None,
            "epochs": recipe.epochs, "rate_factor": fitted.rate_factor,
            "label": f"{n} held-out images the search never saw (those `finetune train --seed {ctx.seed}` validates "
                     f"on), scored once by best.toml's configuration trained on the {len(ctx.train.images)} "
                     f"searched images for {recipe.epochs} epoch(s)"}


def finish(folder: TuneFolder, trials: Trials, space: walk.FinetuneSpace, recipe, rungs: list, notes: list[str],
           facts: dict, started: float, settings: TuneConfig) -> dict:
    """Choose the best trial, write best.toml, estimate it honestly, write search.png and summary.json (last)."""
    from shlex import quote

    log = trials.log
    metric = trials.metric
    best = walk.best_finetune_trial(log.rows, metric)
    if best is None:
        raise SettingsError("no fine-tuning trial finished with a finite loss: give more --time, or lower "
                            "TuneConfig.lr_range")
    header = [f"finetune tune: best of {len(log.rows)} fine-tuning trials on {facts['folder']} (base {facts['base']}): "
              f"validation cross-entropy {best['val_loss']:.4f}, accuracy {best['val_accuracy']:.3f}, "
              f"macro-F1 {best['val_macro_f1']:.3f} "
              f"after {best['best_epoch']} of {best['epochs']} epoch(s)"]
    text = finetune_recipe_text(recipe, best, header)
    folder.write_text("best.toml", text)  # before the estimate's run: an interrupted estimate leaves it
    estimate = held_out_estimate(trials, recipe_files.parse(text, "best.toml"))
    folder.save_figure("search.png", finetune_figure(log.rows, best, space))
    summary = {**facts, "kind": "fine-tuning", "tune_folder": str(folder.path), "space": space.to_dict(),
               "parameters": space.varying(), "objective": metric,
               "score": ("validation macro-F1 (higher is better; the classes are imbalanced), then cross-entropy"
                         if metric == "macro_f1" else "validation cross-entropy (lower is better)"),
               "n_searched": len(trials.ctx.train.images), "n_trial_train": len(trials.scans[0].images),
               "n_trial_val": len(trials.scans[1].images), "n_held_out": len(trials.ctx.val.images),
               "rungs": [{"candidates": k, "epochs": e} for k, e in rungs],
               "trials": {"total": len(log.rows), "new": len(log.rows) - log.n_old, "earlier": log.n_old},
               "best": best, "estimate": estimate,
               "carried_by_recipe": ["learning_rate", "top_lr_factor", "dropout", "l2", "unfreeze_stages", "epochs"],
               "warnings": walk.finetune_edge_warnings(best, space, trials.decider.n_stages, settings.edge_fraction),
               "notes": notes,
               "leaderboard": [finite(r) for r in sorted(log.rows, key=lambda r: walk.finetune_rank(r, metric))
                               [: settings.top]],
               "train_command": f"{facts['train_command']} --recipe {quote(str(folder.file('best.toml')))}",
               "files": {name: str(folder.file(name)) for name in ("trials.csv", "best.toml", "search.png",
                                                                  "summary.json")}}
    summary["timings_s"] = {"trials": round(sum(r["seconds"] for r in log.rows[log.n_old:]), 3),
                            "total": round(time.perf_counter() - started, 3)}
    folder.write_json("summary.json", summary)
    return summary


def finite(row: dict) -> dict:
    """`row` with infinite numbers (a diverged trial's loss) as None: summary.json stays strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
