"""`finetune tune --engine ray`: the local search, with its trials run as Ray Tune trials on a cluster.

    driver   every step of the local search (`tasks.tune`, `tasks.tune.finetune`): scan, split, features,
             candidates, rungs, ranking, best.toml, the held-out estimate, summary.json
    trials   each batch the local search runs one by one (all random or grid candidates, or one rung
             of halving) goes to Ray Tune at once (`RayTrials.run`): a `tune.Tuner` over the batch's
             indices, a function trainable under `tune.with_resources`, at most --max-concurrent at a time.
             Each Tune trial calls the local trial function (`Searcher.trial`: a cross-validated
             logistic regression on cached features; `Trials.trial`: a fine-tuning run from a fresh
             backbone) on a copy of the search that travels once per batch through the object store,
             and reports the trials.csv row it made
    rows     the driver adds the rows to trials.csv in candidate order, so the file numbers and holds
             the same trials as a local search with the same seed and budget (only `seconds` differs;
             `computed`, fine-tuning: the vectors each trial's backbone pass wrote to the shared cache);
             rows already in trials.csv are not run again, as locally

Halving is the local one, rung by rung: every rung is one Tuner run of its candidates, and the best
1/factor by the local ranking go on to the next. Not Ray's ASHA scheduler: ASHA promotes trials
asynchronously, so which candidates reach the last rung depends on which finish first, and it
continues a trial where the local search restarts it from the same start (`tasks.tune.finetune`);
running the same rungs keeps trials.csv reproducible and a search resumable by either engine. The
price: a rung waits for its slowest trial.

--time: no batch starts after the limit, and a batch gets the time left (Tune's `time_budget_s`);
trials it stops are missing from trials.csv, and a rerun with the same --out continues.

On a cluster of several machines, every node needs the package (same version), the image folder
and the feature cache at the same paths (shared storage), as each trial reads images and cached
features there. Ray Tune keeps its own trial folders in a temporary folder on the driver (removed
after each batch); the trials write no checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

from finetune_cli.errors import FinetuneError, SettingsError
from finetune_cli.progress import QUIET
from finetune_cli.scale.backend import checked_trials, connected


@dataclass(frozen=True)
class RayTrials:
    """Runs batches of a search's trials as Ray Tune trials (the `engine` of `tasks.tune.tune`).

    Attributes:
        max_concurrent: Tune trials running at once, at most; None: as many as the cluster's free
            CPUs allow (one CPU per trial).
        cpus, gpus: resources one trial asks for (`tune.with_resources`).
    """

    max_concurrent: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def run(self, owner, calls: list[tuple]) -> list[dict | None]:
        """The row of `owner.trial(*call)` for each call, in order; None for those the time limit stopped.

        Args:
            owner: a `tasks.tune.Searcher` (calls: (params, rows, folds)) or a
                `tasks.tune.finetune.Trials` (calls: (params, epochs, rung)).
        """
        rows = [owner.log.get(_identity(owner, call)) for call in calls]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo and not owner.time_up():
            new = self._tune(_portable(owner, [calls[i] for i in todo]), [calls[i] for i in todo],
                             owner.deadline, _reporter(owner))
            for i, row in zip(todo, new):
                rows[i] = None if row is None else owner.log.add({k: v for k, v in row.items() if k != "trial"})
        if None in rows:
            owner.stopped = True
        return rows

    def _tune(self, portable, calls: list[tuple], deadline: float | None, reporter) -> list[dict | None]:
        """Rows (or None: stopped by the time budget) of `portable.trial(*call)`, one Tune trial per call."""
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter, which verbose=0 silences
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        from ray import tune

        left = None if deadline is None else max(deadline - time.perf_counter(), 1.0)
        reporter.on_phase(f"Ray Tune: {len(calls)} trial(s) on the cluster"
                          + (f", at most {self.max_concurrent} at a time" if self.max_concurrent else ""))
        trainable = tune.with_resources(tune.with_parameters(_trainable, search=portable, calls=calls),
                                        {"cpu": self.cpus, "gpu": self.gpus})
        with tempfile.TemporaryDirectory(prefix="finetune-tune-") as storage:
            tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(calls))))},
                               tune_config=tune.TuneConfig(max_concurrent_trials=self.max_concurrent,
                                                           time_budget_s=left),
                               run_config=tune.RunConfig(name="trials", storage_path=storage, verbose=0))
            results = tuner.fit()
            rows: list[dict | None] = [None] * len(calls)
            for result in results:
                if result.error is not None:  # a user's mistake keeps its one-line message; a bug its traceback
                    cause = getattr(result.error, "cause", None)
                    raise cause if isinstance(cause, FinetuneError) else result.error
                if result.metrics and "row" in result.metrics:
                    rows[result.config["index"]] = json.loads(result.metrics["row"])
        reporter.on_progress(sum(row is not None for row in rows), len(calls))
        return rows


def _trainable(config: dict, search, calls: list[tuple]) -> None:
    """A Tune trial: the local trial function on the search's copy; reports its trials.csv row (as JSON)."""
    from ray import tune

    row = search.trial(*calls[config["index"]])
    tune.report({"row": json.dumps(row, default=lambda value: value.item())})  # numpy numbers as Python's


class _RowOnly:
    """A trial log that keeps nothing: on a worker, `trial` runs and returns its row (the driver logs it)."""

    rows: list = []

    def get(self, trial: dict) -> None:
        return None

    def add(self, row: dict) -> dict:
        return {"trial": 0, **row}


def _identity(owner, call: tuple) -> dict:
    """What `owner.log.get` looks a call's trial up by (as `trial` does)."""
    params, second, _ = call
    if hasattr(owner, "bank"):  # a linear Searcher: (params, rows, folds)
        return {**params, "n_images": owner.n_full if second is None else len(second)}
    return {**params, "epochs": second}


def _reporter(owner):
    return owner.reporter if hasattr(owner, "bank") else owner.ctx.reporter


def _portable(owner, calls: list[tuple]):
    """A copy of `owner` that pickles and runs `trial` anywhere: no log, deadline, engine, reporter or model.

    Linear: the bank's augmented views the calls need are loaded first (the copy
    holds features, not the backbone). Fine-tuning: the context keeps the
    backbone's reference only; each trial builds its own backbone from it.
    """
    portable = copy.copy(owner)
    portable.log, portable.deadline, portable.engine, portable.stopped = _RowOnly(), None, None, False
    if hasattr(owner, "bank"):
        owner.bank.ensure(max(params["views"] for params, _, _ in calls))
        portable.bank = copy.copy(owner.bank)
        portable.bank.ctx, portable.reporter = None, QUIET
    else:
        backbone = dataclasses.replace(owner.ctx.backbone, model=None, classifier=None)
        portable.ctx = dataclasses.replace(owner.ctx, run=None, backbone=backbone, reporter=QUIET)
    return portable


@contextlib.contextmanager
def engine(engine: str = "local", address: str | None = None, max_concurrent: int | None = None):
    """The trial engine of a search: None (local) or a `RayTrials` connected to the cluster at `address`
    (None: a Ray instance started here and stopped after; a caller's running Ray is used as it is).

    Raises:
        SettingsError: see `backend.checked_trials`; Ray or Ray Tune missing (naming the extra), no cluster at `address`.
    """
    checked_trials(engine, address, max_concurrent)
    if engine == "local":
        yield None
        return
    try:
        importlib.import_module("ray.tune")
    except ImportError:
        raise SettingsError("--engine ray needs Ray Tune: pip install 'finetune-cli[ray]'") from None

    with connected(address):
        yield RayTrials(max_concurrent)
