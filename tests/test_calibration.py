"""Temperature scaling: the math on constructed cases, the fold into a Keras model, and real tiny runs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.analysis.calibration import ece, fit_temperature, nll, reliability, temper
from finetune_cli.cli import cli
from finetune_cli.config import TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.runs.run import Run
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.calibrate import fold_temperature, refusal
from tests.test_train import recipe_file


def softmax(logits):
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def test_temperature_recovers_a_constructed_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])  # the labels follow softmax(logits)
    assert fit_temperature(softmax(3 * logits), labels) == pytest.approx(3.0, rel=0.08)
    assert fit_temperature(softmax(logits / 2), labels) == pytest.approx(0.5, rel=0.08)
    assert fit_temperature(softmax(logits), labels) == pytest.approx(1.0, rel=0.08)
    # at the fitted T the NLL is lower than as given, and temper is softmax(logits / T)
    fitted = fit_temperature(softmax(3 * logits), labels)
    assert nll(temper(softmax(3 * logits), fitted), labels) < nll(softmax(3 * logits), labels)
    np.testing.assert_allclose(temper(softmax(3 * logits), 3.0), softmax(logits), atol=1e-9)


def test_ece_and_nll_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 0])  # confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.6 (wrong)
    # 10 bins: (0.8, 0.9] acc 1/2 conf 0.9; (0.6, 0.7] acc 1 conf 0.7; (0.5, 0.6] acc 0 conf 0.6
    assert ece(probs, labels, bins=10) == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.3 + 1 / 4 * 0.6)
    assert ece(probs, labels, bins=1) == pytest.approx(abs(2 / 4 - (0.9 + 0.9 + 0.7 + 0.6) / 4))
    table = reliability(probs, labels, bins=10)
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 2, 0]
    assert nll(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.7, 0.4])))
    assert ece(np.eye(3), np.arange(3)) == 0.0  # certain and right: perfectly calibrated


def test_a_fit_on_the_edge_or_one_raising_nll_is_refused():
    perfect = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # no errors: T -> 0 keeps lowering the NLL
    labels = np.array([0, 1, 0])
    fitted = fit_temperature(perfect, labels, TRAIN.temperature_range)
    assert fitted == pytest.approx(TRAIN.temperature_range[0], rel=1e-3)
    assert "edge" in refusal(fitted, perfect, labels, TRAIN.temperature_range)
    mixed = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    wrong = np.array([0, 1, 1])
    good = fit_temperature(mixed, wrong, TRAIN.temperature_range)
    assert refusal(good, mixed, wrong, TRAIN.temperature_range) == ""
    assert refusal(good * 4, mixed, wrong, TRAIN.temperature_range) == "it would raise the validation NLL"


def test_folded_temperature_is_exact_standard_layers_and_leaves_the_original(tmp_path, tiny_base):
    from finetune_cli.models.heads import classifier

    keras = import_keras()
    backbone = keras.saving.load_model(tiny_base)
    model = classifier(backbone, backbone.layers[-1].name, 3, dropout=0.2, l2=1e-3)
    pixels = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    plain = model.predict(pixels, verbose=0)
    folded = fold_temperature(model, 2.5)
    np.testing.assert_allclose(folded.predict(pixels, verbose=0), temper(plain, 2.5), atol=1e-6)
    np.testing.assert_array_equal(model.predict(pixels, verbose=0), plain)  # the original keeps its own output
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), temper(plain, 2.5), atol=1e-6)
    assert fold_temperature(backbone, 2.5) is None  # no softmax `classifier` layer: nothing to fold into


def validation_pixels(folder):
    from finetune_cli.data.pipeline import batched_images
    from finetune_cli.data.scan import scan_folder

    scan = scan_folder(folder, labelled=True, for_training=False)
    return np.concatenate([x.numpy() for x, _ in batched_images(scan.paths(), 32, 64)]).astype("float32")


def test_linear_run_is_calibrated_in_model_keras(shapes, tiny_base, tmp_path):
    val = make_shapes_folder(tmp_path / "val", per_class=8, size=32, seed=3)
    common = dict(image_size=32, similarity="similar", val_dir=val)
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "on", **common)
    plain = api.train(shapes, str(tiny_base), out=tmp_path / "off",
                      settings=dataclasses.replace(TRAIN, calibrate=False), **common)
    facts = metrics["calibration"]
    assert facts["applied"] and facts["n_val"] == 24 and facts["ece_bins"] == 15
    assert facts["temperature"] != pytest.approx(1.0, abs=0.05)
    assert facts["nll_after"] < facts["nll_before"] and facts["ece_after"] < facts["ece_before"]
    assert json.loads((tmp_path / "on" / "metrics.json").read_text())["calibration"] == facts
    assert (tmp_path / "on" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "calibration" not in plain and not (tmp_path / "off" / "reliability.png").exists()
    assert metrics["val_accuracy"] == plain["val_accuracy"]  # a temperature never changes the argmax

    # the saved model outputs the calibrated probabilities of the uncalibrated head, from raw pixels
    pixels = validation_pixels(val)
    calibrated = Run.load(tmp_path / "on").model.predict(pixels, verbose=0)
    uncalibrated = Run.load(tmp_path / "off").model.predict(pixels, verbose=0)
    np.testing.assert_allclose(calibrated, temper(uncalibrated, facts["temperature"]), atol=1e-5)
    import_keras().saving.load_model(tmp_path / "on" / "model.keras", safe_mode=True)
    # evaluate on the validation folder sees what calibration measured
    assert api.evaluate(val, tmp_path / "on")["nll"] == pytest.approx(facts["nll_after"], abs=1e-4)
    assert api.evaluate(val, tmp_path / "off")["nll"] == pytest.approx(facts["nll_before"], abs=1e-4)
    assert api.evaluate(val, tmp_path / "on")["ece"] == pytest.approx(facts["ece_after"], abs=1e-4)


def mirrored_copy(root, out):
    """Every image of `root` mirrored left-right into `out`, same class folders (new bytes, same shapes)."""
    from PIL import Image, ImageOps

    for path in sorted(root.rglob("*.jpg")):
        target = out / path.relative_to(root).parent / f"mirrored_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(path)).save(target, quality=90)
    return out


def test_fine_tuning_calibrates_the_kept_model_after_the_comparison(shapes, tiny_base, tmp_path):
    # The tiny random base does not generalise to new draws of shapes (at chance, T runs to the top of its
    # range and is refused). The validation images are the training shapes mirrored: new files (no content
    # is shared, so the overlap check accepts them) that the model scores above chance, so T is pinned down.
    # (Drawn with the training seed, as before, six of them were byte-identical training images.)
    val = mirrored_copy(shapes, tmp_path / "val")
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", val_dir=val,
                        recipe=recipe_file(tmp_path, epochs=2))
    facts, comparison = metrics["calibration"], metrics["comparison"]
    kept = "fine_tuned" if metrics["kept"] == "fine-tuned" else "linear_head"
    # the comparison saw the uncalibrated probabilities; calibration started from the kept model's
    assert comparison[kept]["cross_entropy"] == pytest.approx(facts["nll_before"], rel=1e-6)
    assert facts["applied"], facts
    assert api.evaluate(val, out)["nll"] == pytest.approx(facts["nll_after"], rel=1e-3)  # the saved model is it

    # the fine-tuned model itself (shares its layers with the top trained on cached activations)
    tuned = api.train(shapes, str(tiny_base), out=tmp_path / "tuned", image_size=32, similarity="similar",
                      val_dir=val, recipe=recipe_file(tmp_path, epochs=2),
                      settings=dataclasses.replace(TRAIN, keep_better=False))
    facts = tuned["calibration"]
    assert "comparison" not in tuned and facts["applied"], facts
    # its validation scores come from float16 cached activations, the saved model's from float32 pixels
    saved = api.evaluate(val, tmp_path / "tuned")["nll"]
    assert saved == pytest.approx(facts["nll_after"], rel=1e-3)
    assert saved != pytest.approx(facts["nll_before"], rel=1e-3)


def test_cli_evaluate_json_has_ece_and_nll_and_train_can_skip_calibration(shapes, tiny_base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    trained = runner.invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                  "--similarity", "similar", "--out", str(out), "--no-calibrate"])
    assert trained.exit_code == 0, trained.output
    assert "calibration" not in json.loads((out / "metrics.json").read_text())
    evaluated = runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out), "--json"])
    result = json.loads(evaluated.output)
    assert 0 <= result["ece"] <= 1 and result["nll"] > 0 and result["tta"] == 1
    shown = runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out)])
    assert shown.exit_code == 0 and "ECE" in shown.output and "NLL" in shown.output
