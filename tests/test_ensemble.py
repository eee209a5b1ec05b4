"""`train --ensemble N`: one model.keras averaging its members, the keep rule, and real tiny runs."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.ensemble import average_model, choose
from tests.conftest import Recorder
from tests.test_train import recipe_file

NO_CALIBRATION = dataclasses.replace(TRAIN, calibrate=False)


def pixels(n=6, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def heads_on(backbone, n=3):
    """n softmax heads with random weights on `backbone`'s last two layers, sharing its graph."""
    from finetune_cli.models.heads import classifier

    rng = np.random.default_rng(0)
    members = []
    for i in range(n):
        layer = backbone.layers[-1 - i % 2]
        d = layer.output.shape[-1]
        members.append(classifier(backbone, layer.name, 3, kernel=rng.normal(0, 1, (d, 3)).astype("float32"),
                                  bias=rng.normal(0, 1, 3).astype("float32"), suffix=f"_m{i}"))
    return members


def test_ensemble_model_is_the_mean_of_its_members_and_loads_in_safe_mode(tmp_path, tiny_base):
    keras = import_keras()
    backbone = keras.saving.load_model(tiny_base)
    members = heads_on(backbone)
    x = pixels()
    expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    assert np.abs(members[0].predict(x, verbose=0) - expected).max() > 1e-3  # the members do differ
    shared = average_model(members)  # one graph: the backbone runs once
    assert sum(type(layer).__name__ == "Conv2D" for layer in shared.layers) == 3
    np.testing.assert_allclose(shared.predict(x, verbose=0), expected, atol=1e-6)
    shared.save(tmp_path / "shared.keras")
    loaded = keras.saving.load_model(tmp_path / "shared.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    # whole networks (fine-tuning members) are nested models called on one new input
    from finetune_cli.train.ensemble import copy_member

    copies = [copy_member(m, i) for i, m in enumerate(members[:2])]
    separate = average_model(copies)
    separate.save(tmp_path / "separate.keras")
    loaded = keras.saving.load_model(tmp_path / "separate.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.mean([m.predict(x, verbose=0) for m in members[:2]],
                                                                     axis=0), atol=1e-6)


def test_keep_rule_on_constructed_cases():
    labels = np.array([0, 1, 0, 1])
    # two members confidently wrong on different images: their mean hedges and wins on cross-entropy
    a = np.array([[0.99, 0.01], [0.99, 0.01], [0.9, 0.1], [0.1, 0.9]])
    b = np.array([[0.01, 0.99], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    choice = choose([a, b], labels)
    assert choice["kept"] == "ensemble"
    assert choice["ensemble_val_loss"] <= min(m["val_loss"] for m in choice["members"])
    # the plain run's member is good, another bad: the mean is worse than the plain one, which is kept
    good = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    bad = np.array([[0.2, 0.8], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]])
    choice = choose([good, bad], labels)
    assert choice["kept"] == "member 0" and choice["fallback"] == 0
    assert choice["members"][0]["val_accuracy"] == 1.0 and choice["members"][1]["val_accuracy"] == 0.0
    # the fallback is the reference member, never the luckiest other one: a bad plain run loses to the mean
    assert choose([bad, good], labels)["kept"] == "ensemble"
    assert choose([bad, good], labels, reference=1)["kept"] == "member 1"
    assert choose([good, good], labels)["kept"] == "ensemble"  # a tie keeps the ensemble (at least as good)


def test_calibration_skips_an_ensemble_with_a_note(tiny_base):
    from finetune_cli.train.calibrate import calibrate
    from finetune_cli.train.context import TrainResult

    keras = import_keras()
    model = average_model(heads_on(keras.saving.load_model(tiny_base)))
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]] * 3, np.float32)
    labels = np.array([0, 1, 1, 2] * 3)
    recorder = Recorder()
    result = TrainResult(model, None, [], probs, labels, {}, lambda scan: None)
    calibrated = calibrate(SimpleNamespace(reporter=recorder), result, TRAIN)
    assert calibrated.model is model and not calibrated.calibration.applied
    assert "ensemble" in calibrated.notes[-1] and calibrated.notes[-1] in recorder.notes
    assert calibrated.calibration.facts()["ece_before"] == calibrated.calibration.facts()["ece_after"]


def test_linear_ensemble_run(shapes, tiny_base, tmp_path):
    val = make_shapes_folder(tmp_path / "val", per_class=6, size=32, seed=3)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", val_dir=val,
                        ensemble=3, settings=NO_CALIBRATION)
    facts = metrics["ensemble"]
    assert facts["mode"] == "linear" and len(facts["members"]) == 3
    assert [m["stage"] for m in facts["members"]] == ["final", 2, 1]
    assert [m["views"] for m in facts["members"]] == [0, 1, 2]
    planned = json.loads((out / "plan.json").read_text())["ensemble"]
    assert [m["features"] for m in planned["members"]] == ["final stage", "stage 2", "stage 1"]
    assert planned["kept"] == facts["kept"]
    # the keep rule compares with the plain run's model (member 0 here), not with the luckiest member
    plain = facts["members"][facts["fallback"]]["val_loss"]
    assert facts["fallback"] == 0
    kept_loss = facts["ensemble_val_loss"] if facts["kept"] == "ensemble" else plain
    assert (facts["kept"] == "ensemble") == (facts["ensemble_val_loss"] <= plain)
    # evaluate and predict take the saved model unchanged, and see what the choice measured
    assert api.evaluate(val, out)["nll"] == pytest.approx(kept_loss, abs=1e-4)
    frame, _ = api.predict([val / "circle"], out)
    assert len(frame) == 6
    model = import_keras().saving.load_model(out / "model.keras", safe_mode=True)
    assert ("ensemble_average" in [layer.name for layer in model.layers]) == (facts["kept"] == "ensemble")


def test_linear_ensemble_kept_is_the_average_of_its_heads(shapes, tiny_base, tmp_path):
    """Where the ensemble is kept, model.keras's output is exactly its members' mean (read back from the file)."""
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                        ensemble=2, seed=4, settings=NO_CALIBRATION)
    model = import_keras().saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    assert metrics["ensemble"]["kept"] == "ensemble", metrics["ensemble"]  # on this split (seed 4) the mean wins
    average = model.get_layer("ensemble_average")
    members = import_keras().Model(model.inputs, average.input)
    x = pixels()
    np.testing.assert_allclose(model.predict(x, verbose=0), np.mean(members.predict(x, verbose=0), axis=0), atol=1e-6)


def test_snapshot_ensemble_of_a_fine_tuning_run(shapes, tiny_base, tmp_path):
    val = make_shapes_folder(tmp_path / "val", per_class=4, size=32, seed=3)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", val_dir=val,
                        recipe=recipe_file(tmp_path, epochs=2), ensemble=2, ensemble_mode="snapshots",
                        settings=dataclasses.replace(NO_CALIBRATION, keep_better=False))
    facts = metrics["ensemble"]
    assert facts["mode"] == "snapshots" and [m["epoch"] for m in facts["members"]] == [2, 4]
    assert (out / "history.csv").read_text().count("\n") == 5  # header + 2 cycles x 2 epochs
    model = import_keras().saving.load_model(out / "model.keras", safe_mode=True)
    x = pixels()
    if facts["kept"] == "ensemble":
        members = [model.get_layer(f"member_{i}") for i in range(2)]
        expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)
    assert 0 <= api.evaluate(val, out)["accuracy"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--ensemble", "0"], "--ensemble takes 1 to 10"),
    (["--ensemble", "11"], "--ensemble takes 1 to 10"),
    (["--ensemble", "two"], "--ensemble takes 1 to 10"),
    (["--ensemble-mode", "bagging"], "--ensemble-mode takes seeds or snapshots"),
    (["--average", "mean"], "--average takes none, swa, ema"),
    (["--ensemble", "3", "--average", "swa"], "cannot be combined"),
])
def test_bad_ensemble_or_average_values_are_one_line_errors(shapes, tiny_base, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                      "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_seed_ensemble_of_fine_tuning_runs_via_the_cli(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                      "--similarity", "similar", "--recipe", recipe_file(tmp_path, epochs=1),
                                      "--ensemble", "2", "--ensemble-mode", "seeds", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    facts = metrics["ensemble"]
    assert facts["mode"] == "seeds" and [m["seed"] for m in facts["members"]] == [0, 1]
    assert facts["members"][0]["val_loss"] != facts["members"][1]["val_loss"]  # the seeds made different models
    assert any("not compared with the linear head" in n for n in metrics["notes"])
    assert json.loads((out / "plan.json").read_text())["ensemble"]["kept"] == facts["kept"]
    assert api.evaluate(shapes, out)["n_images"] == 24


def test_linear_ensemble_keeps_the_plans_own_choice_as_member_0(shapes, tiny_base, tmp_path):
    """A `trouble` plan compares features by cross-validation; member 0 is that choice (here raw pixels),
    and the kept ensemble joins a raw-pixel head and a stage head in one graph."""
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="different",
                        ensemble=2, seed=4, settings=NO_CALIBRATION)
    facts = metrics["ensemble"]
    chosen = next(c["features"] for c in metrics["candidates"] if c["chosen"])
    assert facts["members"][0]["features"] == chosen == "raw pixels 16x16"
    assert facts["kept"] == "ensemble", facts  # on this split the mean wins
    model = import_keras().saving.load_model(out / "model.keras", safe_mode=True)
    names = [layer.name for layer in model.layers]
    assert {"pixels_m0", "classifier_m0", "classifier_m1", "ensemble_average"} <= set(names)
    members = import_keras().Model(model.inputs, model.get_layer("ensemble_average").input)
    x = pixels()
    np.testing.assert_allclose(model.predict(x, verbose=0), np.mean(members.predict(x, verbose=0), axis=0), atol=1e-6)
    assert len(api.predict([shapes / "circle"], out)[0]) == 8
