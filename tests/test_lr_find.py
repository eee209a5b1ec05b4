"""The learning-rate sweep: schedule, early stop, restored weights, suggestions, files, `lr-find` and `train --lr`.

The sweep runs on a tiny real Keras classifier (the 3-stage tiny backbone and
a softmax head) through the engine's compiled step; the suggestions are
checked on constructed loss curves whose answers are known.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import LR_FIND, OUTPUT_MARKER, LrFindConfig
from finetune_cli.runtime.keras import import_keras
from finetune_cli.strategy.decide import decide
from finetune_cli.strategy.recipes import Recipe
from finetune_cli.train import lr_sweep as lr_find
from tests.conftest import Recorder, save_tiny_backbone
from tests.test_train import recipe_file

FULL = Recipe(name="t", strategy="full", unfreeze_stages=0, top_stages=1, dropout=0.2, batch_size=8)


def tiny_classifier(tmp_path, recipe: Recipe = FULL):
    """(model, trainer, plan, batches): every stage trains, head / top / intermediate groups, 2 batches of 8."""
    import tensorflow as tf

    from finetune_cli.models.heads import classifier
    from finetune_cli.train.setup import finetuner

    keras = import_keras()
    backbone = keras.saving.load_model(save_tiny_backbone(tmp_path / "tiny.keras", size=32))
    model = classifier(backbone, backbone.layers[-1].name, 3, dropout=recipe.dropout, l2=recipe.l2)
    plan = decide("large", "different", 3, recipe)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    y = (np.arange(16) % 3).astype(np.int32)
    batches = [(tf.constant(x[s:s + 8]), tf.constant(y[s:s + 8]), tf.ones(8)) for s in (0, 8)]
    trainer, _ = finetuner(model, plan, recipe, batches)
    return model, trainer, plan, batches


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_rates_grow_exponentially_from_start_to_end_and_reach_every_group(tmp_path):
    rates = lr_find.schedule(LR_FIND)
    assert len(rates) == 100 and rates[0] == pytest.approx(1e-7) and rates[-1] == pytest.approx(10.0)
    np.testing.assert_allclose(rates[1:] / rates[:-1], (10 / 1e-7) ** (1 / 99))

    model, trainer, plan, batches = tiny_classifier(tmp_path)
    config = LrFindConfig(start_lr=1e-5, end_lr=1e-2, steps=12)
    result = lr_find.sweep_trainer(trainer, batches, plan.learning_rates["head"], config)
    assert result.stop == "end" and len(result.rates) == 12
    np.testing.assert_allclose(result.rates, lr_find.schedule(config))
    # the engine's optimizers ran the last step at the swept head rate, the other groups at their ratio
    applied = {g.name: float(o.learning_rate.numpy()) for g, o in zip(trainer.groups, trainer.optimizers)}
    assert set(applied) == {"head", "top", "intermediate"}
    assert applied == pytest.approx({"head": 1e-2, "top": 1e-3, "intermediate": 1e-4}, rel=1e-5)


def test_the_sweep_stops_early_when_the_loss_diverges(tmp_path):
    sgd = Recipe(name="t", strategy="full", unfreeze_stages=0, top_stages=1, optimizer="sgd", batch_size=8)
    _, trainer, plan, batches = tiny_classifier(tmp_path, sgd)
    config = LrFindConfig(end_lr=1e6)
    result = lr_find.sweep_trainer(trainer, batches, plan.learning_rates["head"], config)
    assert result.stop in ("diverged", "not finite") and len(result.rates) < 100
    assert result.rates[-1] < 1e6 and np.isfinite(result.smoothed).all()
    if result.stop == "diverged":
        assert result.smoothed[-1] > 4 * result.smoothed.min()


def test_the_weights_are_bit_identical_after_the_sweep(tmp_path):
    model, trainer, plan, batches = tiny_classifier(tmp_path)
    before = model.get_weights()
    config = LrFindConfig(steps=30)
    # the sweep's steps do move the weights...
    lr_find.sweep(lambda batch, rate: trainer.train_step(batch, rate / plan.learning_rates["head"]), batches, config)
    assert not same(model.get_weights(), before)
    model.set_weights(before)
    # ...and `sweep_trainer` puts every one of them back, also after a divergence
    lr_find.sweep_trainer(trainer, batches, plan.learning_rates["head"], config)
    assert same(model.get_weights(), before)
    lr_find.sweep_trainer(trainer, batches, plan.learning_rates["head"], LrFindConfig(end_lr=1e6))
    assert same(model.get_weights(), before)


def valley_curve():
    """100 rates 1e-7..10; loss flat at 2 below 1e-5, a cosine descent to 0.5 at 1e-2 (steepest at 10^-3.5), then up."""
    rates = np.logspace(-7, 1, 100)
    x = np.log10(rates)
    descent = 1.25 + 0.75 * np.cos(np.pi * np.clip((x + 5) / 3, 0, 1))
    return rates, np.where(x <= -2, descent, 0.5 + (x + 2) ** 2)


def test_suggestions_on_a_constructed_curve_with_a_known_minimum():
    rates, loss = valley_curve()
    s = lr_find.suggest(rates, loss)
    step = 10 ** (8 / 99)  # one step's factor
    assert 1e-3 / step <= s.minimum <= 1e-3 * step  # the minimum is at 1e-2
    assert s.minimum == rates[np.argmin(loss)] / 10
    assert 10 ** -3.5 / step <= s.steepest <= 10 ** -3.5 * step  # the cosine falls fastest halfway down
    # valley: the strictly decreasing run spans 1e-5 .. 1e-2; about halfway along it
    assert 10 ** -3.5 / step ** 2 <= s.valley <= 10 ** -3.5 * step ** 2
    assert not s.disagree and s.spread == pytest.approx(s.minimum / s.steepest, rel=0.5)


def test_one_noisy_step_does_not_break_the_valley():
    rates, loss = valley_curve()
    bumped = loss.copy()
    bumped[np.searchsorted(rates, 1e-4)] += 0.2  # an upward blip inside the descent
    assert lr_find.suggest(rates, bumped).valley == lr_find.suggest(rates, loss).valley


def test_disagreement_is_flagged_on_a_constructed_curve():
    rates = np.logspace(-7, 1, 100)
    x = np.log10(rates)
    # a long shallow descent, a bump, then a short deep dip near 0.5: valley early, minimum late
    loss = np.select([x <= -3, x <= -1, x <= -0.3], [3 - 0.1 * (x + 7), 2.6 + 0.45 * (x + 3), 3.5 - 3.5 * (x + 1)],
                     1.05 + 2 * (x + 0.3))
    s = lr_find.suggest(rates, loss)
    assert s.valley < 1e-2 and s.minimum > 1e-2 and s.disagree and s.spread > 10
    finding = lr_find.LrFinding(lr_find.LrSweep(rates, loss, loss, "end"), s, "partial", "partial", {"head": 1e-3},
                                LR_FIND, 0.0)
    assert any(f"disagree by {s.spread:.0f}x" in line for line in lr_find.notes(finding))
    assert not any("disagree" in line for line in lr_find.notes(
        lr_find.LrFinding(finding.sweep, lr_find.suggest(*valley_curve()), "partial", "partial", {}, LR_FIND, 0.0)))


def test_lr_find_writes_the_curve_and_the_suggestions(shapes, tmp_path):
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    out = tmp_path / "sweep"
    finding = api.lr_find(shapes, str(base), out=out, image_size=32)
    assert {p.name for p in out.iterdir()} == {"lr.csv", "lr.png", "lr.json", OUTPUT_MARKER}
    frame = pd.read_csv(out / "lr.csv")
    assert list(frame.columns) == ["step", "lr", "loss", "smoothed"]
    assert frame["step"].tolist() == list(range(1, len(frame) + 1)) and frame["lr"].iloc[0] == pytest.approx(1e-7)
    assert (np.diff(frame["lr"]) > 0).all()
    # the smoothed column is the bias-corrected exponential moving average of the loss column
    beta, average = LR_FIND.beta, 0.0
    for t, loss in enumerate(frame["loss"], start=1):
        average = beta * average + (1 - beta) * loss
        assert frame["smoothed"].iloc[t - 1] == pytest.approx(average / (1 - beta ** t))
    assert (out / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "lr.json").read_text())
    assert saved["valley"] == finding.suggestions.valley and saved["steps"] == len(frame)
    assert min(frame["lr"]) <= finding.suggestions.valley <= max(frame["lr"])


def test_cli_lr_find_into_a_new_numbered_folder(shapes, tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["lr-find", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                      "--weights", "imagenet"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "shapes-lr-1"
    assert (folder / "lr.csv").exists() and (folder / "lr.png").exists()
    valley = json.loads((folder / "lr.json").read_text())["valley"]
    assert "valley" in result.stdout and f"{valley:.2e}" in result.stdout and "minimum/10" in result.stdout
    again = CliRunner().invoke(cli, ["lr-find", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                     "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["folder"].endswith("shapes-lr-2")


def test_train_lr_auto_sweeps_and_trains_at_the_valley(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    recorder = Recorder()
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", lr="auto",
                        recipe=recipe_file(tmp_path, epochs=1, top_stages=1), reporter=recorder)
    valley = json.loads((out / "lr.json").read_text())["valley"]
    assert len(pd.read_csv(out / "lr.csv")) >= 2 and (out / "lr.png").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["lr"]["requested"] == "auto" and plan["lr"]["head_rate"] == valley
    assert plan["plan"]["learning_rates"] == pytest.approx({"head": valley, "top": valley / 10,
                                                           "intermediate": valley / 100})
    assert metrics["lr"]["sweep"]["valley"] == valley
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["lr"]["head_rate"] == valley and saved["learning_rates"]["head"] == pytest.approx(valley)
    history = pd.read_csv(out / "history.csv")  # the epoch really ran at the chosen rates
    assert history["lr_head"].iloc[0] == pytest.approx(valley)
    assert history["lr_top"].iloc[0] == pytest.approx(valley / 10)
    assert any(n.startswith("lr-find: ") for n in recorder.notes)


def test_train_lr_number_sets_the_head_rate_and_a_linear_plan_ignores_lr(shapes, tiny_base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32", "--out",
                                 str(out), "--similarity", "similar", "--lr", "5e-3",
                                 "--recipe", recipe_file(tmp_path, epochs=1, top_stages=1)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["lr"] == {"requested": 5e-3, "head_rate": 5e-3, "learning_rates": plan["plan"]["learning_rates"]}
    assert plan["plan"]["learning_rates"] == pytest.approx({"head": 5e-3, "top": 5e-4, "intermediate": 5e-5})
    assert not (out / "lr.csv").exists()

    recorder = Recorder()
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "linear", image_size=32, lr="auto", reporter=recorder)
    assert metrics["strategy"] == "linear" and "lr" not in metrics
    assert any("does not apply to a linear plan" in n for n in recorder.notes)
    assert not (tmp_path / "linear" / "lr.csv").exists()
    assert "lr" not in json.loads((tmp_path / "linear" / "plan.json").read_text())


@pytest.mark.parametrize("value", ["fast", "-1", "0", "nan", "inf", "1e-3x"])
def test_a_bad_lr_is_one_error_line_and_exit_2_before_any_work(shapes, tiny_base, tmp_path, value):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--out", str(out),
                                      "--lr", value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "--lr" in errors[0] and value in errors[0], result.stderr
    assert not out.exists()


def test_checked_rate_accepts_auto_and_positive_numbers():
    assert lr_find.checked_rate(None) is None and lr_find.checked_rate(" AUTO ") == "auto"
    assert lr_find.checked_rate("1e-3") == 1e-3 and lr_find.checked_rate(0.5) == 0.5
    assert math.isclose(lr_find.with_head_rate(decide("large", "different", 3, FULL), 2e-2).learning_rates["top"],
                        2e-3)
