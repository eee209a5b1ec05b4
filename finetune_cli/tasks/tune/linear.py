"""Hyper-parameter search of a linear plan on cached frozen features (`finetune tune`).

    prepare   scan, split off the held-out images, build the backbone (tasks.train.prepare)
    features  one backbone pass per augmented view, through the feature cache (ctx.features)
    search    trials of (C, stage, pooling, views), each scored by the same stratified
              cross-validation on the searched images (tasks.tune.space walks the space)
    estimate  the best trial refitted on all searched images, scored on the held-out
              images the search never saw: the honest estimate
    write     trials.csv (after every trial), best.toml, search.png, summary.json

A trial fits only a logistic regression on features already in memory, so
after the backbone passes a search costs seconds, and no model outlives its
trial. Fine-tuning plans (recipes partial, partial-2, full, or a large folder)
are searched by `tasks.tune.finetune`: successive halving over epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from shlex import quote

import numpy as np

from finetune_cli.analysis.scores import metric_value, selection_metric
from finetune_cli.config import LINEAR, SCAN, TRAIN, TUNE, ScanConfig, TrainConfig, TuneConfig
from finetune_cli.data.scan import Scan, check_out_outside
from finetune_cli.data.splits import content_groups
from finetune_cli.errors import SettingsError
from finetune_cli.features import FeatureCache
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.scale.ray_tune import engine as trial_engine
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.tasks.tune import space as walk
from finetune_cli.tasks.tune.files import TrialLog, TuneFolder, best_recipe_text, search_figure
from finetune_cli.tasks.tune.finetune import search_finetune
from finetune_cli.train.context import Context
from finetune_cli.train.logistic import standardised_logistic
from finetune_cli.train.session import choose, n_stages, prepare


def tune(
    root, base: str, *, out=None, method: str = TUNE.method, budget: int | None = None,
    time_limit: float | None = None, cv: int = TUNE.cv, seed: int = 0, recipe: str | None = None,
    weights: str = "imagenet", image_size: int | None = None, batch_size: int = 32, cache_dir=None,
    use_cache: bool = True, config: ScanConfig = SCAN, settings: TuneConfig = TUNE,
    train_settings: TrainConfig = TRAIN, reporter: Reporter = QUIET, engine: str = "local",
    address: str | None = None, max_concurrent: int | None = None,
) -> dict:
    """Search a plan's hyper-parameters: a linear plan's (C, feature stage, pooling, augmented views) on cached
    features, or a fine-tuning plan's (learning rate, top_lr_factor, dropout, l2, unfrozen stages, epochs).

    Linear trials are scored by one stratified cross-validation (repeated for tiny classes) on the training
    split; fine-tuning trials (successive halving over epochs, `tasks.tune.finetune`) by their validation
    cross-entropy on one stratified split of it. The best is trained again and scored once on the held-out
    split the search never saw (the images `train --seed seed` validates on): summary["estimate"].
    Methods: `tasks.tune.space`; steps: `tasks.tune`.

    Args:
        out: a new search folder, or an earlier search's to continue; None: a new `runs/<folder>-tune-<N>`.
        method: auto (grid for 1-2 varying parameters, random from 3; fine-tuning: halving), grid (linear
            only), random or halving.
        budget: trials at most (halving: first-rung candidates); None: `settings.budget`,
            or with `time_limit` alone `settings.max_trials`; fine-tuning: `settings.finetune_budget`.
        time_limit: seconds after which no new trial starts. cv: folds (2-100; fewer for small classes).
        recipe: the recipe whose plan is searched (linear, trouble, partial, partial-2, full or a .toml
            file); None: `linear` for a small folder, else the recipe `train` would decide.
        settings: the space and defaults (`config.TuneConfig`); train_settings: its val_fraction
            (and for fine-tuning trials its retries and activation cache).
        engine: local, or ray: batches of trials as Ray Tune trials at `address` (`scale.ray_tune`).

    Returns the summary (also out/summary.json): best, estimate (held-out accuracy, n_images,
    interval95), leaderboard, warnings, notes, trials, files (trials.csv, best.toml, search.png).

    Raises:
        SettingsError, FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError.
    """
    started = time.perf_counter()
    with trial_engine(engine, address, max_concurrent) as trials:
        check_options(method, budget, time_limit, cv)
        chosen = recipe_files.load(recipe)[0] if recipe is not None else None
        if chosen is not None and chosen.strategy != "linear":
            walk.pick_finetune_method(method)  # grid is refused before any work
        cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
        check_out_outside(out, root)
        folder = TuneFolder.open(out, root)
        reporter.on_phase(f"tune folder: {folder.path}" + (" (continuing its search)" if folder.continued else ""))
        with folder.guarded():
            ctx, profile, _ = prepare(folder, root, base, weights=weights, image_size=image_size, saved=None,
                                      recipe=None, val_dir=None, test_dir=None, seed=seed, cache=cache,
                                      batch_size=batch_size, config=config, settings=train_settings,
                                      reporter=reporter)
            chosen, similarity = (chosen, "similar") if chosen is not None else default_recipe(ctx, profile, method)
            facts = {"method": method, "method_asked": method, "budget": budget, "time_limit_s": time_limit,
                     "seed": seed, "base": base, **search_facts(ctx, root, base, image_size, seed, chosen)}
            search = dict(method=method, budget=budget, time_limit=time_limit, seed=seed, started=started,
                          settings=settings, train_settings=train_settings, engine=trials)
            if chosen.strategy != "linear":
                return search_finetune(folder, ctx, profile, chosen, similarity, facts,
                                       definition(ctx, seed, cv, settings), **search)
            return search_linear(folder, ctx, profile, chosen, facts, cv=cv, **search)


def search_linear(folder: TuneFolder, ctx, profile, chosen, facts: dict, *, cv: int, method: str,
                  budget: int | None, time_limit: float | None, seed: int, started: float, settings: TuneConfig,
                  train_settings: TrainConfig, engine) -> dict:
    """The linear head's search on cached features; returns the summary (see `tune`)."""
    space = space_for(ctx, settings)
    folder.record_definition(definition(ctx, seed, cv, settings))  # a mismatch is refused before any pass
    bank = FeatureBank(ctx, space)
    folds = walk.cv_folds(bank.labels, cv, settings.repeat_below, settings.repeats, seed, bank.groups)
    searcher = Searcher(bank, folds, TrialLog(folder, reporter=ctx.reporter),
                        profile.imbalance >= ctx.config.imbalance_warn_ratio,
                        started + time_limit if time_limit else None, ctx.reporter, engine)
    used = walk.pick_method(method, space)
    notes = run(searcher, used, space, budget, time_limit, seed, settings)
    return finish(folder, searcher, space, chosen, notes, {**facts, "method": used}, started, settings)


def search_facts(ctx, root, base: str, image_size: int | None, seed: int, chosen) -> dict:
    """What summary.json says the search ran on: backbone, input size, folder, recipe, the train command."""
    return {"backbone": ctx.backbone.ref.label, "image_size": ctx.backbone.ref.image_size, "folder": str(root),
            "recipe": chosen.name, "train_command": train_command(root, base, image_size, seed)}


def train_command(root, base: str, image_size: int | None, seed: int) -> str:
    """The `finetune train` command line that validates on the held-out images (best.toml's --recipe follows)."""
    size = f" --image-size {image_size}" if image_size else ""
    return f"finetune train {quote(str(root))} --base {quote(base)}{size}" + (f" --seed {seed}" if seed else "")


def check_options(method: str, budget: int | None, time_limit: float | None, cv: int) -> None:
    """Validate the search's options before any work.

    Raises:
        SettingsError: naming the option.
    """
    if method not in walk.METHODS:
        raise SettingsError(f"--method must be one of {', '.join(walk.METHODS)}. Received: --method={method!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise SettingsError(f"--budget must be a whole number of trials, at least 1. Received: --budget={budget!r}")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and 0 < time_limit < math.inf):
        raise SettingsError(f"--time must be a duration longer than 0 s. Received: --time={time_limit!r}")
    if isinstance(cv, bool) or not isinstance(cv, int) or not 2 <= cv <= 100:
        raise SettingsError(f"--cv must be a number of folds from 2 to 100. Received: --cv={cv!r}")


def default_recipe(ctx: Context, profile, method: str) -> tuple[recipe_files.Recipe, str]:
    """(recipe, similarity verdict): the shipped `linear` for a small folder; for a large one, the recipe
    `train` would decide (`tasks.train.choose`: similarity measured, then the table: partial or full).

    Raises:
        SettingsError: a large folder with --method grid (a fine-tuning space is sampled).
    """
    if profile.size_category == "small":
        return recipe_files.load("linear")[0], "similar"

    evidence, plan, recipe, _ = choose(ctx, profile, "auto", "auto", None)
    if recipe.strategy != "linear":
        walk.pick_finetune_method(method)
        ctx.reporter.on_note(f"this folder is large: train would fine-tune (recipe '{recipe.name}', similarity "
                             f"{evidence.verdict}), so that plan is searched; --recipe linear searches a linear head")
    return recipe, evidence.verdict


def space_for(ctx: Context, settings: TuneConfig) -> walk.Space:
    """The space of `settings` for this backbone: its last `settings.stages` stages (`final` last).

    Raises:
        SettingsError: a setting out of range.
    """
    low, high = settings.c_range
    if not (0 < low <= high < math.inf) or not 0 <= settings.max_views <= 16 or settings.stages < 1:
        raise SettingsError(f"TuneConfig needs 0 < c_range[0] <= c_range[1], max_views 0-16 and stages >= 1. "
                            f"Received: c_range={settings.c_range}, max_views={settings.max_views}, "
                            f"stages={settings.stages}")
    if not settings.poolings or not set(settings.poolings) <= {"avg", "max"}:
        raise SettingsError(f"TuneConfig.poolings must name avg and/or max. Received: {settings.poolings}")
    n = n_stages(ctx)
    stages = tuple(str(k) for k in range(max(1, n - settings.stages + 1), n)) + ("final",)
    return walk.Space((float(low), float(high)), stages, tuple(settings.poolings), tuple(range(settings.max_views + 1)))


class FeatureBank:
    """Frozen features of every (stage, pooling) of a space, from the feature cache, one backbone pass per view.

    Attributes:
        searched: the images cross-validated on (the training split, minus
            files that failed to decode); `labels` int (n,) their classes;
            `groups` int (n,) their content groups (identical files share a fold).
        held_out: the images the search never sees (the validation split).
        seconds: time spent getting features (backbone passes and cache reads).
    """

    def __init__(self, ctx: Context, space: walk.Space):
        self.ctx, self.space, self.seconds = ctx, space, 0.0
        start = time.perf_counter()
        ctx.reporter.on_phase(f"features of {len(ctx.scan.images)} images (stages {', '.join(space.stages)}; "
                              f"pooling {', '.join(space.poolings)})")
        first, rows = self._extract(ctx.scan, 0)
        self.searched = [r for r in ctx.train.images if r.path in rows]
        self.held_out = [r for r in ctx.val.images if r.path in rows]
        self.labels = ctx.labels(self.searched)
        self.groups = content_groups(r.digest for r in self.searched)
        pick = lambda records: {k: m[[rows[r.path] for r in records]] for k, m in first.items()}
        everywhere = lambda records: np.ones(len(records), bool)
        self.views = {0: (pick(self.searched), everywhere(self.searched))}
        self.held_out_features = pick(self.held_out)
        self.seconds += time.perf_counter() - start

    def _extract(self, scan: Scan, view: int) -> tuple[dict, dict]:
        """({(stage, pooling): float32 (rows, d)}, {image path: row}) of one view, in one backbone pass."""
        pairs = [(s, p) for s in self.space.stages for p in self.space.poolings]
        layers = [None if s == "final" else int(s) for s, _ in pairs]
        tables = self.ctx.features(scan, layers, view, pooling=tuple(p for _, p in pairs))
        rows = {r.path: i for i, r in enumerate(tables[0].records)}
        return {pair: t.features for pair, t in zip(pairs, tables)}, rows

    def ensure(self, views: int) -> None:
        """Load augmented views 1..`views` of the searched images (cached, so computed once ever)."""
        for view in range(1, views + 1):
            if view in self.views:
                continue
            start = time.perf_counter()
            self.ctx.reporter.on_phase(f"features of augmented view {view} of {len(self.searched)} images")
            scan = dataclasses.replace(self.ctx.train, images=tuple(self.searched))
            matrices, rows = self._extract(scan, view)
            where = np.array([rows.get(r.path, -1) for r in self.searched])
            aligned = {k: np.where((where >= 0)[:, None], m[np.maximum(where, 0)], 0) for k, m in matrices.items()}
            self.views[view] = (aligned, where >= 0)
            self.seconds += time.perf_counter() - start

    def training_rows(self, params: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (m, d), labels (m,)) of images `rows` (into `searched`) and their first `views` views."""
        self.ensure(params["views"])
        pair = (params["stage"], params["pooling"])
        parts = [(self.views[v][0][pair][rows][self.views[v][1][rows]], self.labels[rows][self.views[v][1][rows]])
                 for v in range(params["views"] + 1)]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    def plain(self, params: dict, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), d) of the images as they are (view 0): what is scored."""
        return self.views[0][0][(params["stage"], params["pooling"])][rows]


def fit_head(x: np.ndarray, y: np.ndarray, c: float, balanced: bool):
    """A standardised L2 logistic regression (train's linear head, at a fixed C), fitted on (x (n, d), y (n,))."""
    from sklearn.exceptions import ConvergenceWarning

    model = standardised_logistic(c, floor=LINEAR.scale_floor, tol=LINEAR.tol,
                                  class_weight="balanced" if balanced else None)
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a large C may stop at max_iter: still a model
        return model.fit(x, y)


class Searcher:
    """Runs trials: each one cross-validated on the same folds, logged, skipped when already in trials.csv."""

    def __init__(self, bank: FeatureBank, folds: walk.Folds, log: TrialLog, balanced: bool,
                 deadline: float | None, reporter: Reporter, engine=None):
        self.bank, self.folds, self.log, self.balanced = bank, folds, log, balanced
        self.deadline, self.reporter, self.stopped, self.engine = deadline, reporter, False, engine

    @property
    def n_full(self) -> int:
        return len(self.bank.searched)

    def time_up(self) -> bool:
        self.stopped = self.stopped or (self.deadline is not None and time.perf_counter() >= self.deadline)
        return self.stopped

    def trial(self, params: dict, rows: np.ndarray | None = None, folds: walk.Folds | None = None) -> dict | None:
        """The row of `params` scored on `rows` (default all searched images): from trials.csv, or run now.

        None when the time is up before it could run.
        """
        rows = np.arange(self.n_full) if rows is None else rows
        done = self.log.get({**params, "n_images": len(rows)})
        if done is not None:
            return done
        if self.time_up():
            return None
        self.bank.ensure(params["views"])  # a backbone pass is not the trial's time
        start, scores = time.perf_counter(), []
        for train, test in (folds or self.folds).splits:
            model = fit_head(*self.bank.training_rows(params, rows[train]), params["C"], self.balanced)
            predicted, truth = model.predict(self.bank.plain(params, rows[test])), self.bank.labels[rows[test]]
            scores.append([metric_value(m, truth, predicted) for m in ("accuracy", "macro_f1")])
        mean, std = np.mean(scores, axis=0), np.std(scores, axis=0)
        return self.log.add({**params, "n_images": len(rows), "mean_accuracy": float(mean[0]),
                             "std_accuracy": float(std[0]), "mean_macro_f1": float(mean[1]),
                             "std_macro_f1": float(std[1]), "n_splits": len(scores),
                             "seconds": round(time.perf_counter() - start, 4)})

    @property
    def metric(self) -> str:
        """What the search maximises: "accuracy", or "macro_f1" when the classes are imbalanced."""
        return selection_metric(self.balanced)

    def trials(self, candidates: list[dict], rows: np.ndarray | None = None,
               folds: walk.Folds | None = None) -> list[dict | None]:
        """`trial` of each candidate, in order: here one by one, or all at once by the engine (`scale.ray_tune`)."""
        if self.engine is not None:
            return self.engine.run(self, [(params, rows, folds) for params in candidates])
        return [self.trial(params, rows, folds) for params in candidates]

    def run_list(self, candidates: list[dict]) -> list[dict]:
        """Trials of `candidates` in order, until the time is up; returns their rows."""
        if self.engine is not None:
            return [row for row in self.trials(candidates) if row is not None]
        rows = []
        for i, params in enumerate(candidates):
            row = self.trial(params)
            if row is None:
                break
            rows.append(row)
            self.reporter.on_progress(i + 1, len(candidates))
        return rows


def run(searcher: Searcher, method: str, space: walk.Space, budget: int | None, time_limit: float | None,
        seed: int, settings: TuneConfig) -> list[str]:
    """Walk the space with `method` (grid, random or halving); returns notes for the user."""
    n = budget or (settings.max_trials if time_limit and method != "halving" else settings.budget)
    notes = []
    if method == "grid":
        grid = walk.grid_candidates(space, n, seed, settings.max_grid_points)
        if len(grid) > n:
            notes.append(f"the grid has {len(grid)} points and the budget {n}: {n} were tried, in a seeded order; "
                         "a larger --budget with the same --out continues")
        candidates = grid[:n]
    else:
        candidates = walk.random_candidates(space, n, seed)
    searcher.reporter.on_phase(f"searching ({method}): {len(candidates)} candidates, "
                               f"{', '.join(space.varying()) or 'nothing'} varying; "
                               f"{searcher.folds.describe()} cross-validation on {searcher.n_full} images")
    if method == "halving":
        notes += halving(searcher, candidates, seed, settings)
    else:
        searcher.run_list(candidates)
    if searcher.stopped:
        notes.append("stopped at the --time limit: rerun with the same --out (and more time) to continue")
    return notes


def halving(searcher: Searcher, candidates: list[dict], seed: int, settings: TuneConfig) -> list[str]:
    """Successive halving over images (see `tasks.tune.space`); the last rung scores on all searched images."""
    labels, folds = searcher.bank.labels, searcher.folds
    smallest = len(np.unique(labels)) * folds.folds * 2
    schedule = walk.halving_schedule(len(candidates), searcher.n_full, smallest, settings.halving_factor)
    survivors = candidates
    for rung_index, (keep, n_images) in enumerate(schedule):
        survivors = survivors[:keep]
        rows = walk.subsample(labels, n_images, seed)
        rung = folds if len(rows) == searcher.n_full else walk.cv_folds(
            labels[rows], folds.folds, settings.repeat_below, settings.repeats, seed, searcher.bank.groups[rows])
        scored = list(zip(survivors, searcher.trials(survivors, rows, rung)))
        scored = [(p, r) for p, r in scored if r is not None]
        survivors = [p for p, _ in sorted(scored, key=lambda pr: -pr[1][f"mean_{searcher.metric}"])]
        searcher.reporter.on_progress(rung_index + 1, len(schedule))
        if searcher.stopped:
            break
    if len(schedule) == 1:
        return ["halving: too few images to score candidates on subsamples, so one rung on all of them "
                "(a random search)"]
    return [f"halving: rungs of {', '.join(f'{k} candidates on {n} images' for k, n in schedule)}"]


def definition(ctx: Context, seed: int, cv: int, settings: TuneConfig) -> dict:
    """What the search's scores depend on (tune.json): a continued search must match it."""
    digest = lambda records: hashlib.blake2b("\n".join(sorted(f"{r.digest} {r.label}" for r in records)).encode(),
                                             digest_size=12).hexdigest()
    ref = ctx.backbone.ref
    return {"classes": ctx.classes, "searched_images": digest(ctx.train.images),
            "held_out_images": digest(ctx.val.images), "backbone": ref.identity, "base": ref.label,
            "image_size": ref.image_size, "seed": seed,
            "folds": {"cv": cv, "repeat_below": settings.repeat_below, "repeats": settings.repeats},
            "n_searched": len(ctx.train.images), "n_held_out": len(ctx.val.images)}


def held_out_estimate(searcher: Searcher, best: dict) -> dict:
    """The best trial refitted on all searched images (and views), scored on the held-out images."""
    bank = searcher.bank
    model = fit_head(*bank.training_rows(best, np.arange(searcher.n_full)), best["C"], searcher.balanced)
    n = len(bank.held_out)
    truth = bank.ctx.labels(bank.held_out)
    guess = model.predict(bank.held_out_features[(best["stage"], best["pooling"])]) if n else truth
    hits = int((guess == truth).sum())
    low, high = walk.wilson(hits, n)
    return {"kind": "held-out", "accuracy": hits / n if n else None,
            "macro_f1": metric_value("macro_f1", truth, guess) if n else None, "n_correct": hits, "n_images": n,
            "interval95": [round(low, 4), round(high, 4)],
            "label": f"{n} held-out images the search never saw (those `finetune train --seed {bank.ctx.seed}` "
                     f"validates on), scored once by the best trial refitted on the {searcher.n_full} searched images"}


def finish(folder: TuneFolder, searcher: Searcher, space: walk.Space, recipe, notes: list[str], facts: dict,
           started: float, settings: TuneConfig) -> dict:
    """Choose the best trial, estimate it honestly, write best.toml, search.png and summary.json (last)."""
    log = searcher.log
    full = [r for r in log.rows if r["n_images"] == searcher.n_full] or \
        [r for r in log.rows if r["n_images"] == max(r["n_images"] for r in log.rows)]
    metric = searcher.metric
    best = walk.best_trial(full, metric)
    if best is None:
        raise SettingsError("no trial finished within --time: give more time (e.g. --time 5m)")
    best = {k: best[k] for k in ("trial", *walk.PARAMETERS, "n_images", "mean_accuracy", "std_accuracy",
                                 "mean_macro_f1", "std_macro_f1", "n_splits")}
    estimate = held_out_estimate(searcher, best)
    header = [f"finetune tune: best of {len(full)} trials on {facts['folder']} (base {facts['base']}) by "
              f"{metric}, cross-validated {metric} {best[f'mean_{metric}']:.3f} +/- {best[f'std_{metric}']:.3f}",
              f"honest estimate ({estimate['kind']}): accuracy {estimate['accuracy']:.3f} on {estimate['n_images']} "
              "images the search never saw"]
    folder.write_text("best.toml", best_recipe_text(recipe, best, header))
    folder.save_figure("search.png", search_figure(full, best, space))
    ranked = sorted(full, key=lambda r: (-r[f"mean_{metric}"], r[f"std_{metric}"]))
    summary = {**facts, "objective": metric, "tune_folder": str(folder.path), "space": space.to_dict(), "parameters": space.varying(),
               "cv": searcher.folds.describe(), "n_searched": searcher.n_full,
               "n_held_out": len(searcher.bank.held_out),
               "trials": {"total": len(log.rows), "new": len(log.rows) - log.n_old, "earlier": log.n_old},
               "best": best, "estimate": estimate, "carried_by_recipe": ["feature_stage", "feature_views", "pooling", "linear_c"],
               "warnings": walk.edge_warnings(best, space, settings.edge_fraction), "notes": notes,
               "leaderboard": ranked[: settings.top],
               "train_command": f"{facts['train_command']} --recipe {quote(str(folder.file('best.toml')))}",
               "files": {name: str(folder.file(name)) for name in ("trials.csv", "best.toml", "search.png",
                                                                  "summary.json")}}
    summary["timings_s"] = {"features": round(searcher.bank.seconds, 3),
                            "total": round(time.perf_counter() - started, 3)}
    folder.write_json("summary.json", summary)
    return summary
