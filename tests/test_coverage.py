"""How sure: prediction sets with a coverage guarantee, intervals on every score, and `compare`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.analysis import conformal
from finetune_cli.analysis.scores import bootstrap_intervals
from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import SettingsError
from finetune_cli.tasks.compare import mcnemar_p, paired


def calibrated_draws(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n, k) of a calibrated model, and labels drawn from them."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.4), n)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_sets_cover_the_true_class_at_the_target_rate(target):
    cal_probs, cal_labels = calibrated_draws(1000, 6, seed=1)
    probs, labels = calibrated_draws(5000, 6, seed=2)
    sets, facts = conformal.calibrated_sets(cal_probs, cal_labels, probs, target)
    covered = np.mean([y in s for y, s in zip(labels, sets)])
    assert target - 0.02 <= covered <= target + 0.03
    assert facts["n_calibration"] == 1000 and facts["coverage_target"] == target
    sizes = np.array([len(s) for s in sets])
    assert sizes.min() >= 1 and 1 < sizes.mean() < 6  # adaptive: neither one class nor all of them
    assert all(probs[i, s[0]] == probs[i].max() for i, s in enumerate(sets[:200]))  # most probable first


def test_empty_sets_give_the_target_coverage_where_the_top_class_alone_would_cover_more():
    rng = np.random.default_rng(4)
    def sharp(n):  # a model right about 90 % of the time, calibrated: labels drawn from its probabilities
        probs = rng.dirichlet(np.full(5, 0.05), n)
        return probs, np.array([rng.choice(5, p=p) for p in probs])
    (cal_probs, cal_labels), (probs, labels) = sharp(2000), sharp(5000)
    q, _ = conformal.calibrate(cal_probs, cal_labels, 0.8)
    floor, exact = conformal.prediction_sets(probs, q), conformal.prediction_sets(probs, q, empty=True)
    top1 = float(np.mean(probs.argmax(1) == labels))
    covered = [float(np.mean([y in s for y, s in zip(labels, sets)])) for sets in (floor, exact)]
    assert top1 > 0.85 and covered[0] >= top1  # never empty: floored at the top-1 accuracy, above the target
    assert 0.78 <= covered[1] <= 0.83 and min(len(s) for s in exact) == 0


def test_too_few_calibration_images_or_a_coverage_outside_0_1_is_refused():
    with pytest.raises(SettingsError, match="needs at least 9 validation images; this run has 5"):
        conformal.threshold(np.linspace(0.1, 0.9, 5), 0.9)
    assert conformal.threshold(np.linspace(0.1, 0.9, 9), 0.9) == pytest.approx(0.9)
    for bad in (0, 1, 1.5, -0.2, "x", True):
        with pytest.raises(SettingsError, match="--coverage between 0 and 1"):
            conformal.checked_coverage(bad)


@pytest.mark.parametrize("n,target", [(30, 0.8), (180, 0.9)])
def test_the_stated_spread_is_where_one_calibration_s_coverage_falls(n, target):
    # Uniform scores: the sets' coverage given a calibration is its threshold q itself (P(score <= q) = q).
    # Over 4,000 calibration draws the middle 90 % of q is the spread `calibrate` states.
    rng = np.random.default_rng(3)
    qs = [conformal.threshold(rng.random(n), target) for _ in range(4000)]
    low, high = conformal.spread(n, target)
    assert np.percentile(qs, 5) == pytest.approx(low, abs=0.01)
    assert np.percentile(qs, 95) == pytest.approx(high, abs=0.01)
    assert low < target < high and high - low > conformal.spread(10 * n, target)[1] - conformal.spread(10 * n, target)[0]


def test_the_interval_of_a_tiny_set_is_wide_and_of_a_large_one_narrow():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 2000)
    guess = np.where(rng.random(2000) < 0.8, truth, (truth + 1) % 3)
    small, large = (bootstrap_intervals(truth[:n], guess[:n], [0, 1, 2]) for n in (20, 2000))
    width = {name: (s[1] - s[0], l[1] - l[0]) for name, s, l in
             ((m, small[m], large[m]) for m in ("accuracy", "macro_f1", "balanced_accuracy"))}
    for tiny, big in width.values():
        assert tiny > 0.2 and big < 0.05
    low, high = large["accuracy"]
    assert low <= (truth == guess).mean() <= high


def test_mcnemar_and_the_paired_interval():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(10, 1) == pytest.approx(2 * 12 / 2 ** 11)
    a = np.array([True] * 90 + [False] * 10)
    assert paired(a, a.copy())["verdict"] == "no difference beyond noise"
    worse = a.copy()
    worse[:40] = False
    result = paired(a, worse)
    assert result["verdict"] == "A is better" and result["only_a_right"] == 40 and result["p_value"] < 1e-6
    assert result["difference_interval95"][0] > 0.25


@pytest.fixture
def linear_run(shapes, tiny_base, tmp_path):
    """A real linear run on the 24 shapes (out-of-fold validation on all of them) and a held-out folder."""
    run = tmp_path / "run"
    api.train(shapes, str(tiny_base), out=run, image_size=32, strategy="linear")
    return run, make_shapes_folder(tmp_path / "held", per_class=6, size=32, seed=7)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_predict_and_evaluate_with_coverage(linear_run, tmp_path):
    run, held = linear_run
    result = invoke("predict", run, held, "--coverage", "0.8", "--abstain", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "p.csv", dtype={"set": str})
    assert len(frame) == 18 and {"set", "set_size", "abstain"} <= set(frame.columns)
    assert all(s.split(";")[0] == p for s, p in zip(frame["set"], frame["predicted"]))
    assert (frame["abstain"] == (frame["set_size"] > 1)).all()
    evaluated = invoke("evaluate", run, held, "--coverage", "0.8", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)
    assert 0 <= scores["coverage"] <= 1 and 1 <= scores["mean_set_size"] <= 3
    assert scores["n_calibration"] == 24 and scores["coverage_target"] == 0.8
    assert scores["coverage_spread90"] == [round(v, 4) for v in conformal.spread(24, 0.8)]
    assert "one run's sets hold it" in result.stderr and "24 calibration images" in result.stderr
    exact = invoke("evaluate", run, held, "--coverage", "0.8", "--empty-sets", "--json")
    assert exact.exit_code == 0, exact.output
    found = json.loads(exact.stdout)
    assert found["empty_sets"] is True and 0 <= found["empty_share"] <= 1
    assert found["mean_set_size"] <= scores["mean_set_size"] and found["coverage"] <= scores["coverage"]
    empties = invoke("predict", run, held, "--coverage", "0.8", "--empty-sets", "--abstain", "--out",
                     tmp_path / "e.csv")
    frame = pd.read_csv(tmp_path / "e.csv", dtype={"set": str}, keep_default_na=False)
    assert empties.exit_code == 0 and (frame["abstain"] == (frame["set_size"] != 1)).all()
    assert ((frame["set"] == "") == (frame["set_size"] == 0)).all()
    assert scores["accuracy_interval95"][0] <= scores["accuracy"] <= scores["accuracy_interval95"][1]
    assert {"macro_f1", "balanced_accuracy", "macro_f1_interval95"} <= set(scores)
    assert all("f1_interval95" in row for row in scores["per_class"])


def test_coverage_refusals_are_one_line(linear_run, tmp_path):
    run, held = linear_run
    for args, expected in ((("--coverage", "1.5"), "--coverage"), (("--abstain",), "give --coverage"),
                           (("--empty-sets",), "--empty-sets is about the prediction sets of --coverage"),
                           (("--coverage", "0.8", "--tta", "2"), "use --tta 1 with --coverage"),
                           (("--coverage", "0.99"), "needs at least 99 validation images; this run has 24")):
        result = invoke("predict", run, held, *args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback" not in result.output
    frame = pd.read_csv(run / "predictions_val.csv")
    frame[[c for c in frame.columns if not c.startswith("prob_")]].to_csv(run / "predictions_val.csv", index=False)
    result = invoke("evaluate", run, held, "--coverage", "0.8")
    assert result.exit_code == 2 and "keeps no validation probabilities" in result.output


def test_compare_two_seeds_of_one_plan_is_no_difference(shapes, tiny_base, tmp_path):
    runs = [tmp_path / f"seed{s}" for s in (0, 1)]
    for seed, run in enumerate(runs):
        api.train(shapes, str(tiny_base), out=run, image_size=32, strategy="linear", seed=seed)
    held = make_shapes_folder(tmp_path / "held", per_class=6, size=32, seed=7)
    result = invoke("compare", runs[0], runs[1], held, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["n_images"] == 18 and found["n_left_out"] == 0
    assert found["verdict"] == "no difference beyond noise" and found["p_value"] >= 0.05
    on_training = invoke("compare", runs[0], runs[1], shapes)
    assert on_training.exit_code == 2 and "no image" in on_training.output and "held out" in on_training.output
