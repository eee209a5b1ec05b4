"""`finetune tune` of a fine-tuning plan: successive halving over epochs on the tiny real backbone, the shared
activation cache, no model kept between trials, resume, best.toml into `train`; and the pure parts."""

from __future__ import annotations

import dataclasses
import gc
import json
import math

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TUNE, ScanConfig
from finetune_cli.errors import OutputError, SettingsError
from finetune_cli.strategy import recipes
from finetune_cli.tasks.tune import space as search
from finetune_cli.tasks.tune.files import FINETUNE_TABLE, TrialLog, TuneFolder
from finetune_cli.tasks.tune.space import FinetuneSpace
from tests.conftest import Recorder
from tests.test_train import recipe_file

TUNE_FILES = {"tune.json", "trials.csv", "best.toml", "search.png", "summary.json"}
SPACE = FinetuneSpace((1e-4, 1e-2), (0.01, 0.1), (0.0, 0.2), (0.0, 1e-4), (1, 2, 3), (1, 8))
TRIAL_MODELS = ("finetune_classifier", "finetune_top")


class Census(Recorder):
    """Counts the trial models still alive whenever a trial starts (the last one's must be gone)."""

    def __init__(self):
        super().__init__()
        self.alive = []

    def on_phase(self, name):
        super().on_phase(name)
        if name.startswith(("trial ", "estimate")):
            from finetune_cli.runtime.keras import import_keras

            keras = import_keras()
            gc.collect()
            self.alive.append(sum(isinstance(o, keras.Model) and o.name in TRIAL_MODELS for o in gc.get_objects()))


def partial_recipe(tmp_path):
    """Partial fine-tuning of the top stage, 2 epochs at most, one cached view."""
    return recipe_file(tmp_path, unfreeze_stages=1, top_stages=1, epochs=2, feature_views=1, augmentation="none")


def test_finetune_search_halves_reuses_activations_keeps_no_model_resumes_and_train_takes_best_toml(
        shapes, tiny_base, tmp_path):
    out, census = tmp_path / "search", Census()
    settings = dataclasses.replace(TUNE, epoch_factor=2)
    first = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=4, recipe=partial_recipe(tmp_path),
                     settings=settings, reporter=census)
    assert TUNE_FILES <= {p.name for p in out.iterdir()}
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["rung"]) == [0, 0, 0, 0, 1, 1] and list(trials["epochs"]) == [1, 1, 1, 1, 2, 2]
    rows = trials.to_dict("records")
    survivors = sorted(rows[:4], key=search.finetune_rank)[:2]  # the best half of rung 1 goes on, twice the epochs
    assert [search.finetune_key(r) for r in rows[4:]] == [search.finetune_key(r) for r in survivors]
    assert (trials["n_train"] == 15).all() and (trials["n_val"] == 4).all()  # 19 searched: 4 score the trials
    assert_each_cut_computed_once(rows)
    assert census.alive == [0] * 7  # 6 trials and the estimate: the model before each is gone

    assert first["kind"] == "fine-tuning" and first["method"] == "halving"
    assert first["rungs"] == [{"candidates": 4, "epochs": 1}, {"candidates": 2, "epochs": 2}]
    best = first["best"]
    assert best == min(rows[4:], key=search.finetune_rank)
    estimate = first["estimate"]
    assert estimate["kind"] == "held-out" and estimate["n_images"] == 5 and first["n_searched"] == 19
    assert estimate["accuracy"] == estimate["n_correct"] / 5 and estimate["epochs"] == best["best_epoch"]
    assert math.isfinite(estimate["cross_entropy"])
    assert json.loads((out / "summary.json").read_text())["best"] == best
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"

    tuned = recipes.load(str(out / "best.toml"))[0]
    assert (tuned.strategy, tuned.unfreeze_stages, tuned.epochs) == ("partial", best["unfreeze_stages"],
                                                                     best["best_epoch"])
    assert (tuned.learning_rate, tuned.top_lr_factor) == (best["learning_rate"], best["top_lr_factor"])
    assert (tuned.dropout, tuned.l2, tuned.feature_views) == (best["dropout"], best["l2"], 1)

    resumed = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=6, recipe=partial_recipe(tmp_path),
                       settings=settings)
    longer = pd.read_csv(out / "trials.csv")
    pd.testing.assert_frame_equal(longer.head(6), trials)  # earlier rows untouched
    assert resumed["trials"] == {"total": len(longer), "new": len(longer) - 6, "earlier": 6}
    keys = lambda frame: [search.finetune_key(r) for r in sorted(frame.to_dict("records"), key=search.finetune_rank)]
    assert (longer["epochs"] == 1).sum() == 6  # rungs 6 x 1, then the best 3 x 2 (some of them run before)
    assert set(keys(longer[longer["epochs"] == 1])[:3]) <= set(keys(longer[longer["epochs"] == 2]))
    assert not longer.duplicated(["learning_rate", "top_lr_factor", "dropout", "l2", "unfreeze_stages",
                                  "epochs"]).any()
    with pytest.raises(OutputError, match="different .*seed"):
        api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=6, seed=1, recipe=partial_recipe(tmp_path))
    with pytest.raises(OutputError, match="different .*kind, recipe"):
        api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=2)  # a linear search

    assert_train_runs_best_toml(shapes, tiny_base, out, tmp_path / "run", resumed["estimate"])


def assert_each_cut_computed_once(rows: list[dict]) -> None:
    """The frozen prefix's activations are computed by the first trial with its cut, then read from the cache."""
    seen = set()
    for row in rows:
        if row["unfreeze_stages"] in seen:
            assert row["computed"] == 0, row
        elif row["unfreeze_stages"] < 3:  # a cut below the trained stages (3 of 3: end to end, no cut)
            assert row["computed"] > 0, row
        seen.add(row["unfreeze_stages"])


def assert_train_runs_best_toml(shapes, tiny_base, search_folder, run, estimate: dict) -> None:
    """`train --recipe best.toml` plans the searched values and trains the estimate's model epoch for epoch."""
    tuned = recipes.load(str(search_folder / "best.toml"))[0]
    api.train(shapes, str(tiny_base), out=run, image_size=32, recipe=str(search_folder / "best.toml"))
    plan = json.loads((run / "plan.json").read_text())["plan"]
    assert plan["recipe"] == "recipe-tuned" and plan["epochs"] == tuned.epochs
    assert plan["train_stages"] == list(range(4 - tuned.unfreeze_stages, 4))
    assert plan["learning_rates"]["head"] == tuned.learning_rate
    assert plan["learning_rates"]["top"] == pytest.approx(tuned.learning_rate * tuned.top_lr_factor)
    last = pd.read_csv(run / "history.csv").iloc[tuned.epochs - 1]  # the same images, seed and configuration
    assert last["val_accuracy"] == estimate["accuracy"]
    assert last["val_loss"] == pytest.approx(estimate["cross_entropy"], rel=1e-5)


def test_a_large_folder_searches_the_plan_train_would_decide(shapes, tiny_base, tmp_path):
    recorder = Recorder()
    summary = api.tune(shapes, str(tiny_base), out=tmp_path / "s", image_size=32, budget=2,
                       config=ScanConfig(small_max_per_class=2), settings=dataclasses.replace(TUNE, max_epochs=1),
                       reporter=recorder)
    assert summary["kind"] == "fine-tuning" and summary["recipe"] in ("partial", "full")
    assert summary["rungs"] == [{"candidates": 2, "epochs": 1}]
    assert any("this folder is large: train would fine-tune" in note for note in recorder.notes)


def test_cli_renders_a_finetuning_search(shapes, tiny_base, tmp_path):
    out = tmp_path / "search"
    recipe = recipe_file(tmp_path, unfreeze_stages=1, top_stages=1, epochs=1, augmentation="none")
    result = CliRunner().invoke(cli, ["tune", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                      "--recipe", recipe, "--budget", "2", "--method", "random", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "fine-tuning random search" in text and "honest estimate (held-out)" in text
    assert "best: head lr" in text and "best.toml" in text and "--cv does not apply" in text
    assert len(pd.read_csv(out / "trials.csv")) == 2


def test_a_finetuning_space_out_of_range_is_one_error(shapes, tiny_base, tmp_path):
    with pytest.raises(SettingsError, match=r"Received: lr_range=\(0.0, 0.01\), epoch_factor=1"):
        api.tune(shapes, str(tiny_base), out=tmp_path / "s", image_size=32, recipe="partial",
                 settings=dataclasses.replace(TUNE, lr_range=(0.0, 1e-2), epoch_factor=1))


def test_epoch_rungs_halve_candidates_and_multiply_epochs_up_to_the_recipes():
    assert search.epoch_rungs(4, 1, 2, 2) == [(4, 1), (2, 2)]
    assert search.epoch_rungs(9, 1, 8, 3) == [(9, 1), (3, 3), (1, 8)]
    assert search.epoch_rungs(6, 1, 8, 3) == [(6, 1), (2, 3), (1, 8)]
    assert search.epoch_rungs(20, 2, 8, 2) == [(20, 2), (10, 4), (5, 8)]
    assert search.epoch_rungs(1, 1, 8, 3) == [(1, 1)] and search.epoch_rungs(5, 3, 2, 2) == [(5, 2)]


def test_finetune_candidates_are_distinct_in_range_and_a_larger_budget_extends_them():
    few, more = search.finetune_candidates(SPACE, 5, seed=2), search.finetune_candidates(SPACE, 40, seed=2)
    assert more[:5] == few and len({search.finetune_key(p) for p in more}) == 40
    assert all(1e-4 <= p["learning_rate"] <= 1e-2 and p["learning_rate"] == search.round_c(p["learning_rate"])
               for p in more)
    assert {p["unfreeze_stages"] for p in more} == {1, 2, 3} and {p["dropout"] for p in more} == {0.0, 0.2}
    fixed = dataclasses.replace(SPACE, lr_range=(1e-3, 1e-3))
    assert len(search.finetune_candidates(fixed, 100, seed=0)) == 2 * 2 * 2 * 3  # the space runs out
    assert search.pick_finetune_method("auto") == "halving" and search.pick_finetune_method("random") == "random"
    with pytest.raises(SettingsError, match="grid searches linear plans only"):
        search.pick_finetune_method("grid")


def test_the_best_trial_comes_from_the_last_rung_and_edges_are_warned():
    row = {"learning_rate": 1e-3, "top_lr_factor": 0.1, "dropout": 0.0, "l2": 0.0, "unfreeze_stages": 1,
           "val_accuracy": 0.5, "best_epoch": 1}
    rows = [{**row, "epochs": 1, "val_loss": 0.1}, {**row, "epochs": 8, "val_loss": 0.9},
            {**row, "epochs": 8, "val_loss": 0.5, "unfreeze_stages": 2}, {**row, "epochs": 8, "val_loss": math.inf}]
    assert search.best_finetune_trial(rows) == rows[2]
    assert search.best_finetune_trial([rows[3]]) is None
    # imbalanced classes: a higher validation macro-F1 outranks a lower cross-entropy; balanced ones: the reverse
    scored = [{**rows[2], "val_macro_f1": 0.4}, {**rows[1], "val_macro_f1": 0.6}]
    assert search.best_finetune_trial(scored, "macro_f1") == scored[1]
    assert search.best_finetune_trial(scored) == scored[0]
    assert search.finetune_edge_warnings({**row, "epochs": 3}, SPACE, 5, 0.1) == []
    lines = search.finetune_edge_warnings({**row, "learning_rate": 1e-4, "unfreeze_stages": 3, "best_epoch": 8,
                                           "epochs": 8}, SPACE, 5, 0.1)
    assert len(lines) == 3 and "low edge" in lines[0] and "max_unfreeze" in lines[1] and "epochs" in lines[2]
    assert search.finetune_edge_warnings({**row, "unfreeze_stages": 3, "epochs": 3}, SPACE, 3, 0.1) == []


def test_a_finetuning_trial_table_reads_back_exactly_with_a_diverged_trial(tmp_path):
    folder = TuneFolder.open(tmp_path / "s", tmp_path)
    log = TrialLog(folder, FINETUNE_TABLE)
    params = {"learning_rate": 0.00123, "top_lr_factor": 0.03, "dropout": 0.2, "l2": 1e-4, "unfreeze_stages": 2}
    log.add({"rung": 0, "epochs": 1, **params, "best_epoch": 0, "val_loss": math.inf, "val_accuracy": 0.0,
             "val_macro_f1": 0.0, "train_loss": math.inf, "n_train": 15, "n_val": 4, "rate_factor": 0.01, "status": "diverged",
             "computed": 34, "seconds": 0.25})
    again = TrialLog(folder, FINETUNE_TABLE)
    assert again.rows == log.rows and again.get({**params, "epochs": 1}) == log.rows[0]
    assert again.get({**params, "epochs": 2}) is None
