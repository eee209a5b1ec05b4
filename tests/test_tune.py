"""`finetune tune`: a linear search on cached features with a tiny real backbone; resume; best.toml; the pure parts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TRAIN, TUNE
from finetune_cli.errors import OutputError, SettingsError
from finetune_cli.strategy import recipes
from finetune_cli.tasks.tune import space as search
from finetune_cli.tasks.tune.space import Space

TUNE_FILES = {"tune.json", "trials.csv", "best.toml", "search.png", "summary.json"}
SPACE = Space((1e-3, 1e2), ("2", "3", "final"), ("avg", "max"), (0, 1, 2, 3, 4))


def test_linear_search_writes_everything_resumes_and_train_takes_best_toml(shapes, tiny_base, tmp_path):
    out = tmp_path / "search"
    first = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=4)
    assert TUNE_FILES <= {p.name for p in out.iterdir()}
    trials = pd.read_csv(out / "trials.csv", dtype={"stage": str})
    assert len(trials) == 4 and list(trials["trial"]) == [1, 2, 3, 4]
    assert trials["mean_accuracy"].between(0, 1).all() and (trials["std_accuracy"] >= 0).all()
    assert (trials["n_images"] == 19).all() and (trials["n_splits"] == 15).all()  # 5 folds x 3: 6-7 per class
    assert first["method"] == "random" and first["parameters"] == ["C", "stage", "pooling", "views"]
    estimate = first["estimate"]
    assert estimate["kind"] == "held-out" and "never saw" in estimate["label"]
    assert estimate["n_images"] == 5 and first["n_searched"] == 19  # the 20 % train --seed 0 validates on
    assert estimate["accuracy"] == estimate["n_correct"] / 5
    assert estimate["interval95"][0] <= estimate["accuracy"] <= estimate["interval95"][1]
    assert first["best"]["mean_accuracy"] == trials["mean_accuracy"].max()
    assert json.loads((out / "summary.json").read_text())["best"] == first["best"]
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"

    resumed = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=7)
    longer = pd.read_csv(out / "trials.csv", dtype={"stage": str})
    assert len(longer) == 7 and resumed["trials"] == {"total": 7, "new": 3, "earlier": 4}
    pd.testing.assert_frame_equal(longer.head(4), trials)  # earlier rows untouched, seconds included
    assert len(set(zip(longer["C"], longer["stage"], longer["pooling"], longer["views"]))) == 7
    with pytest.raises(OutputError, match="different"):
        api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=8, seed=1)

    best = recipes.load(str(out / "best.toml"))[0]
    assert (best.strategy, best.feature_views) == ("linear", resumed["best"]["views"])
    assert best.feature_stage == resumed["best"]["stage"]
    assert (best.pooling, best.linear_c) == (resumed["best"]["pooling"], resumed["best"]["C"])
    # with the hold-out kept (a linear plan otherwise validates out-of-fold on every image), train sees the
    # same held-out images as the estimate
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, recipe=str(out / "best.toml"),
                        settings=dataclasses.replace(TRAIN, cross_validate=False))
    assert metrics["recipe"] == "linear-tuned" and metrics["n_val"] == estimate["n_images"]
    assert metrics["C"] == resumed["best"]["C"]  # train runs the configuration that was searched and estimated
    assert metrics["val_accuracy"] == pytest.approx(resumed["estimate"]["accuracy"])
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]
    assert plan["feature_views"] == best.feature_views and plan["feature_stage"] == best.feature_stage


def test_auto_grid_for_two_parameters_is_a_nested_log_grid_and_continues(shapes, tiny_base, tmp_path):
    settings = dataclasses.replace(TUNE, max_views=0, poolings=("avg",), stages=1)  # only C varies
    out = tmp_path / "grid"
    first = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=5, settings=settings)
    assert first["method"] == "grid" and first["parameters"] == ["C"]
    assert sorted(pd.read_csv(out / "trials.csv")["C"]) == [0.001, 0.0178, 0.316, 5.62, 100.0]
    finer = api.tune(shapes, str(tiny_base), out=out, image_size=32, budget=9, settings=settings)
    assert finer["trials"] == {"total": 9, "new": 4, "earlier": 5}  # a 9-point grid holds the 5 points
    assert len(pd.read_csv(out / "trials.csv")["C"].unique()) == 9


def test_cli_tune_renders_the_leaderboard_and_halving_runs(shapes, tiny_base, tmp_path):
    out = tmp_path / "search"
    result = CliRunner().invoke(cli, ["tune", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                      "--budget", "3", "--method", "halving", "--cv", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", " ")
    assert "honest estimate (held-out)" in text and "best.toml" in text and "trial" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "halving" and summary["cv"].startswith("3-fold")


@pytest.mark.parametrize("args, message", [
    (["--time", "5x"], "--time must be a duration"),
    (["--time", "0s"], "--time must be longer than 0"),
    (["--budget", "ten"], "--budget must be a whole number"),
    (["--budget", "0"], "--budget must be a whole number"),
    (["--method", "bayes"], "--method must be one of auto, grid, random, halving"),
    (["--recipe", "partial", "--method", "grid"], "grid searches linear plans only"),
])
def test_bad_options_are_one_line_errors(shapes, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["tune", str(shapes), *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ") and message in result.output
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_a_folder_holding_something_else_is_refused(shapes, tiny_base, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a search"):
        api.tune(shapes, str(tiny_base), out=tmp_path / "taken", image_size=32, budget=2)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_auto_picks_grid_for_one_or_two_parameters_and_random_from_three():
    assert search.pick_method("auto", Space((1e-3, 1e2), ("final",), ("avg",), (0,))) == "grid"
    assert search.pick_method("auto", Space((1e-3, 1e2), ("3", "final"), ("avg",), (0,))) == "grid"
    assert search.pick_method("auto", Space((1.0, 1.0), ("3", "final"), ("avg", "max"), (0,))) == "grid"
    assert search.pick_method("auto", Space((1e-3, 1e2), ("3", "final"), ("avg", "max"), (0,))) == "random"
    assert search.pick_method("auto", SPACE) == "random" and search.pick_method("halving", SPACE) == "halving"
    with pytest.raises(SettingsError, match="--method"):
        search.pick_method("bayes", SPACE)


def test_random_candidates_are_distinct_and_a_larger_budget_extends_them():
    few, more = search.random_candidates(SPACE, 8, seed=3), search.random_candidates(SPACE, 30, seed=3)
    assert more[:8] == few and len({search.key(p) for p in more}) == 30
    assert all(1e-3 <= p["C"] <= 1e2 and p["C"] == search.round_c(p["C"]) for p in more)
    assert search.random_candidates(SPACE, 8, seed=4) != few
    small = Space((1.0, 1.0), ("final",), ("avg", "max"), (0, 1))
    assert len(search.random_candidates(small, 10, seed=0)) == 4  # the space runs out: no repeats


def test_edge_warnings_fire_only_on_the_edges():
    best = {"C": 0.001, "stage": "final", "pooling": "avg", "views": 2}
    assert any("low edge" in w and "c_range" in w for w in search.edge_warnings(best, SPACE, 0.1))
    assert any("high edge" in w for w in search.edge_warnings({**best, "C": 95.0}, SPACE, 0.1))
    assert search.edge_warnings({**best, "C": 0.3}, SPACE, 0.1) == []
    assert any("views" in w for w in search.edge_warnings({**best, "C": 0.3, "views": 4}, SPACE, 0.1))
    assert any("earliest" in w for w in search.edge_warnings({**best, "C": 0.3, "stage": "2"}, SPACE, 0.1))
    first_stage = Space((1e-3, 1e2), ("1", "final"), ("avg",), (0,))
    assert search.edge_warnings({**best, "C": 0.3, "stage": "1"}, first_stage, 0.1) == []  # nothing earlier


def test_halving_schedule_and_nested_stratified_subsamples():
    assert search.halving_schedule(27, 270, 10, 3) == [(27, 10), (9, 30), (3, 90), (1, 270)]
    assert search.halving_schedule(20, 270, 10, 3) == [(20, 30), (7, 90), (3, 270)]
    assert search.halving_schedule(27, 40, 30, 3) == [(27, 40)]  # tiny data: one rung
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    small, large = search.subsample(labels, 30, seed=0), search.subsample(labels, 60, seed=0)
    assert set(small) < set(large) and np.bincount(labels[small]).tolist() == [18, 9, 3]
    folds = search.cv_folds(np.repeat([0, 1], [4, 12]), 5, 10, 3, seed=0)
    assert (folds.folds, folds.repeats, len(folds.splits)) == (4, 3, 12)  # the smallest class has 4: repeated


def test_durations_and_budgets_parse():
    assert [search.parse_duration(t) for t in ("90", "90s", "5m", "1h30m", "1.5h")] == [90, 90, 300, 5400, 5400]
    for bad in ("", "m", "5x", "-1m", "5m10", "0"):
        with pytest.raises(SettingsError, match="--time"):
            search.parse_duration(bad)
    assert search.parse_budget(" 12 ") == 12
    with pytest.raises(SettingsError, match="--budget"):
        search.parse_budget("1.5")
