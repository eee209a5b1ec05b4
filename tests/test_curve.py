"""The learning curve and label forecast: nested subsets, the power law, the verdicts, and the run's record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune_cli import api
from finetune_cli.analysis.curve import fit_power_law, law, stratified_resamples
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.train.curve import learning_curve, measure, nested


def blobs(per_class: int, k: int = 4, d: int = 40, spread: float = 3.0, seed: int = 0):
    """Gaussian classes in d dimensions: features (n, d), labels (n,); larger `spread` is harder."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    labels = np.repeat(np.arange(k), per_class)
    return (centres[labels] + spread * rng.normal(size=(len(labels), d))).astype(np.float32), labels


def test_the_power_law_is_recovered_from_its_own_points():
    n = np.array([5, 8, 12, 20, 35, 60.0])
    a, b, c = fit_power_law(n, law(n, 0.05, 0.8, 0.6))
    assert a == pytest.approx(0.05, abs=0.01) and b == pytest.approx(0.8, rel=0.1) and c == pytest.approx(0.6, rel=0.1)
    assert fit_power_law(n, np.full(6, 0.3)) == (pytest.approx(0.3), 0.0, 1.0)  # a curve that does not fall is flat
    assert fit_power_law(n, np.linspace(0.1, 0.3, 6))[1] == 0.0  # nor does one that rises


def test_subsets_are_nested_stratified_and_resamples_keep_each_class_share():
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    order = np.random.default_rng(0).permutation(len(labels))
    small, large = set(nested(order, labels, 0.3)), set(nested(order, labels, 0.6))
    assert small < large
    assert np.bincount(labels[list(small)]).tolist() == [3, 6, 9]
    resampled = labels[stratified_resamples(labels, 5, seed=1)]
    assert all(np.bincount(row).tolist() == [10, 20, 30] for row in resampled)


def test_every_image_is_scored_by_heads_that_never_saw_it_at_every_fraction():
    x, y = blobs(30)
    found = measure(x, y, 4, 1.0, seed=0)
    assert found.hits.shape == (2, len(found.fractions), len(y))
    assert np.all(np.diff(found.sizes) > 0) and found.sizes[-1] == pytest.approx(30 * 4 / 5)
    assert found.hits[:, 0].mean() < found.hits[:, -1].mean()  # more labels, fewer errors on held-out images


def test_a_rising_curve_forecasts_more_accuracy_with_an_interval_and_names_the_limiting_class():
    x, y = blobs(40, spread=2.5)
    hard = y == 3
    x[hard] += np.random.default_rng(5).normal(scale=3.0, size=x[hard].shape)  # class 3 is noisier
    record = learning_curve(x, y, ["a", "b", "c", "d"], 1.0)
    assert record["verdict"] == "rising", record["message"]
    assert 0 < record["gain_if_doubled"]["low"] <= record["gain_if_doubled"]["accuracy"]
    ahead = {r["multiple"]: r for r in record["forecast"]}
    assert ahead[1.0]["accuracy"] < ahead[2.0]["accuracy"] < ahead[4.0]["accuracy"] <= 1
    assert all(r["low"] <= r["accuracy"] <= r["high"] for r in record["forecast"] + record["points"])
    assert ahead[2.0]["images_per_class"] == 80
    assert record["limiting_class"] == "d" and "class `d` limits you most: 40 more" in record["message"]
    json.dumps(record)  # goes into metrics.json as it is


def test_flat_curves_say_so_and_too_few_images_refuse_to_forecast():
    x, y = blobs(40)
    chance = learning_curve(x, np.random.default_rng(0).permutation(y), list("abcd"), 1.0)
    assert chance["verdict"] == "flat" and "try fine-tuning" in chance["message"]
    for seed in (1, 2):  # labels that carry nothing never promise a gain, even where noise tilts the curve
        noise = learning_curve(x, np.random.default_rng(seed).permutation(y), list("abcd"), 1.0)
        assert noise["verdict"] in ("flat", "uncertain"), noise["message"]
        assert noise["gain_if_doubled"]["low"] < 0.01
    easy = learning_curve(*blobs(40, spread=0.2), list("abcd"), 1.0)
    assert easy["verdict"] == "flat" and "near its top" in easy["message"]
    few = learning_curve(*blobs(5), list("abcd"), 1.0)
    assert few["verdict"] == "too few" and few["forecast"] == []
    assert "the smallest class has 5 distinct images" in few["message"] and "needs about 8" in few["message"]


def test_a_training_run_records_its_curve_plots_it_and_shows_it_on_the_report(tmp_path, tiny_base):
    data = make_shapes_folder(tmp_path / "shapes", per_class=12, size=32, seed=3)
    metrics = api.train(data, str(tiny_base), out=tmp_path / "run", strategy="linear")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["learning_curve"]
    assert record == json.loads(json.dumps(metrics["learning_curve"]))
    assert record["verdict"] in ("rising", "flat") and len(record["forecast"]) == 3
    assert record["forecast"][0]["images_per_class"] == 12  # out-of-fold: the run trained on every image
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Learning curve and label forecast" in page and record["message"].split(":")[0] in page


def test_the_curve_command_forecasts_a_folder_and_says_when_it_has_too_few(tmp_path, tiny_base):
    from click.testing import CliRunner

    from finetune_cli.cli import cli

    enough = make_shapes_folder(tmp_path / "enough", per_class=12, size=32, seed=4)
    result = CliRunner().invoke(cli, ["curve", str(enough), "--base", str(tiny_base), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["n_images"] == 36 and [r["multiple"] for r in found["forecast"]] == [1.0, 2.0, 4.0]
    assert found["forecast"][1]["images_per_class"] == 24 and found["verdict"] in ("rising", "flat", "uncertain")
    few = make_shapes_folder(tmp_path / "few", per_class=4, size=32, seed=4)
    result = CliRunner().invoke(cli, ["curve", str(few), "--base", str(tiny_base)])
    assert result.exit_code == 0 and "too few labelled images to forecast" in result.output
    result = CliRunner().invoke(cli, ["curve", str(tmp_path / "missing"), "--base", str(tiny_base)])
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
