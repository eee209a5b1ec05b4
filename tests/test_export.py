"""`finetune export`: every format round-trips a run trained by `finetune train`, verified by its own runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import ExportError, ModelFileError, OutputError, SettingsError
from tests.conftest import save_tiny_backbone

# Keras' tf2onnx shim probes numpy for `np.object`, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, its training folder): a linear head on a tiny random conv base, 32 px, 3 classes x 8."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
        patch.setenv("FINETUNE_MODELS_DIR", str(root / "models"))
        data = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
        base = save_tiny_backbone(root / "tiny.keras")
        result = CliRunner().invoke(cli, ["train", str(data), "--base", str(base), "--image-size", "32",
                                          "--out", str(root / "run")])
        assert result.exit_code == 0, result.output
    return root / "run", data


def _labels(run):
    return json.loads((run / "labels.json").read_text())


@pytest.mark.parametrize("fmt", ["keras", "savedmodel", "tflite", "onnx"])
def test_every_float_format_round_trips_with_full_agreement(trained, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    run, data = trained
    report = api.export(run, format=fmt, data=data, out=tmp_path / "out")
    out = tmp_path / "out"
    assert report["agreement"] == 1.0 and report["max_prob_diff"] < 1e-4
    assert report["accuracy"] == report["accuracy_keras"] and report["n_images"] == 5  # the 20 % split of 24
    assert json.loads((out / "export.json").read_text()) == report
    assert json.loads((out / "labels.json").read_text()) == _labels(run) == report["classes"]
    assert report["bytes"] > 0 and report["ms_per_image"] > 0 and report["ms_per_image_keras"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    from finetune_cli.models import formats

    written = out / formats.FILE_NAME[fmt]
    if fmt == "onnx":
        assert json.loads(formats.onnx_metadata(written)["classes"]) == _labels(run)
    elif fmt == "tflite":
        assert formats.tflite_metadata(written)["classes"] == _labels(run)
    elif fmt == "savedmodel":
        assert json.loads((written / "assets" / "labels.json").read_text()) == _labels(run)


def test_the_exported_file_runs_on_its_own_and_matches_keras(trained, tmp_path):
    """Not the exporter's own check: load the .tflite afresh and compare it with the Keras run on a photo."""
    import numpy as np

    from finetune_cli.data.pipeline import decoded_arrays as decoded
    from finetune_cli.models import formats
    from finetune_cli.runs.run import Run

    run, data = trained
    api.export(run, format="tflite", data=data, out=tmp_path)
    paths = sorted((data / "circle").iterdir())[:2]
    pixels, ok = decoded(paths, 32)
    assert ok.all() and pixels.dtype == np.float32 and pixels.max() > 1  # raw 0-255, not rescaled
    keras_probs = np.asarray(Run.load(run).model([pixels], training=False))
    tflite_probs = formats.runtime("tflite", tmp_path / "model.tflite")(pixels)
    np.testing.assert_allclose(tflite_probs, keras_probs, atol=1e-5)
    np.testing.assert_allclose(tflite_probs.sum(1), 1, atol=1e-5)


def test_tflite_int8_calibrates_on_the_training_images_and_is_smaller(trained, tmp_path):
    run, data = trained
    float_report = api.export(run, format="tflite", data=data, out=tmp_path / "float")
    report = api.export(run, format="tflite", quantize="int8", data=data, out=tmp_path / "int8", calibration=7,
                        force=True)
    assert report["calibration_images"] == 7 and report["quantize"] == "int8"
    assert report["bytes"] < float_report["bytes"]
    assert 0 < report["max_prob_diff"] < 0.5 and 0 <= report["agreement"] <= 1


def _dark_folder(root, classes):
    """The run's classes, each three near-black images: a representative set that misleads int8."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (i, i, i)).save(root / name / f"{i}.png")
    return root


def test_low_agreement_is_refused_and_nothing_is_written_unless_forced(trained, tmp_path):
    """int8 ranges taken from black images clip every real photo: the file disagrees with Keras."""
    run, data = trained
    dark = _dark_folder(tmp_path / "dark", _labels(run))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", str(run), "--format", "tflite", "--quantize", "int8", "--data", str(dark),
            "--check-dir", str(data), "--out", str(out)]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2, refused.output
    message = refused.output.strip().splitlines()[-1]
    assert message.startswith("Error: export refused") and "--min-agreement 98%" in message
    assert sorted(os.listdir(out)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["dark", "out"]
    forced = CliRunner().invoke(cli, args + ["--force", "--json"])
    assert forced.exit_code == 0, forced.output
    report = json.loads(forced.output[forced.output.index("{"):])
    assert report["forced"] and report["agreement"] < 0.98 and report["n_images"] == 24
    assert sorted(os.listdir(out)) == ["export.json", "labels.json", "model.tflite", "notes.txt"]
    again = CliRunner().invoke(cli, args + ["--force"])
    assert again.exit_code == 2 and "already holds model.tflite" in again.output  # --overwrite replaces


def test_a_folder_that_is_not_a_run_is_one_clear_line(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nothing"), "--format", "keras",
                                      "--check-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert "model.keras not found" in result.output
    with pytest.raises(ModelFileError):
        api.export(tmp_path / "nothing", format="keras", check_dir=tmp_path)


def test_bad_choices_are_refused_before_any_work(trained, tmp_path):
    run, data = trained
    with pytest.raises(SettingsError, match="--format keras takes --quantize none"):
        api.export(run, format="keras", quantize="int8", data=data)
    with pytest.raises(SettingsError, match="--format onnx takes --quantize none or int8: onnxruntime's dynamic"):
        api.export(run, format="onnx", quantize="dynamic", data=data)
    with pytest.raises(SettingsError, match="--min-agreement"):
        api.export(run, format="keras", data=data, min_agreement=1.5)
    bare = tmp_path / "bare-run"  # a run that recorded neither its validation images nor its folder
    shutil.copytree(run, bare)
    (bare / "predictions_val.csv").unlink()
    metrics = json.loads((bare / "metrics.json").read_text())
    (bare / "metrics.json").write_text(json.dumps({**metrics, "data_root": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="--data DIR"):
        api.export(bare, format="keras")
    with pytest.raises(ExportError, match="full int8 takes its representative images"):
        api.export(bare, format="tflite", quantize="int8", check_dir=data)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        api.export(run, format="keras", data=data, out=tmp_path / "file")


def test_by_default_the_runs_own_validation_images_are_checked_and_int8_calibrates_on_the_rest(trained, tmp_path):
    _, data = trained
    run = tmp_path / "held"  # a run with a hold-out: its validation images never trained the model
    api.train(data, str(save_tiny_backbone(tmp_path / "tiny.keras")), out=run, image_size=32,
              cache_dir=tmp_path / "cache", settings=dataclasses.replace(TRAIN, cross_validate=False))
    recorded = pd.read_csv(run / "predictions_val.csv")
    assert len(recorded) < 24
    report = api.export(run, format="keras", out=tmp_path / "k")
    assert report["checked_on"] == "the run's validation images (predictions_val.csv)"
    assert report["n_images"] == len(recorded) and report["agreement"] == 1.0
    assert report["accuracy_keras"] == pytest.approx((recorded["true"] == recorded["predicted"]).mean())
    int8 = api.export(run, format="tflite", quantize="int8", out=tmp_path / "q", force=True)
    training_images = sum(1 for p in data.rglob("*") if p.is_file()) - len(recorded)
    assert int8["calibration_images"] == training_images


def test_a_run_that_trained_on_every_image_is_not_checked_on_them_as_if_held_out(trained, tmp_path):
    run, data = trained  # a linear run: validated out-of-fold, its head refitted on all 24 images
    assert json.loads((run / "metrics.json").read_text())["validation"]["method"] == "out-of-fold"
    report = api.export(run, format="keras", out=tmp_path / "k")
    assert report["held_out"] is False and "which the run trained on" in report["checked_on"]
    assert report["n_images"] < 24 and report["agreement"] == 1.0
    given = api.export(run, format="keras", check_dir=data, out=tmp_path / "c")  # the training folder itself
    assert given["held_out"] is False and "24 of its 24 images are training images" in given["checked_on"]
    other = make_shapes_folder(tmp_path / "other", per_class=3, size=32, seed=9)
    assert api.export(run, format="keras", check_dir=other, out=tmp_path / "o")["held_out"] is True


def test_default_output_is_a_numbered_folder_inside_the_run(trained):
    run, data = trained
    first = api.export(run, format="keras", data=data)
    second = api.export(run, format="keras", data=data)
    assert first["out"] == str(run / "exports" / "keras-none-1") and second["out"].endswith("keras-none-2")


@pytest.mark.parametrize("fmt,quantize", [("tflite", "fp16"), ("tflite", "dynamic"), ("onnx", "int8")])
def test_quantised_formats_stay_close_to_keras(trained, tmp_path, fmt, quantize):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    run, data = trained
    report = api.export(run, format=fmt, quantize=quantize, data=data, out=tmp_path, force=True)
    assert report["max_prob_diff"] < (1e-3 if quantize == "fp16" else 0.1)
    assert report["calibration_images"] == (19 if quantize == "int8" else 0)


def test_split_head_keeps_the_function_and_groups_rows_by_weight_scale():
    """A folded linear head with a few huge rows (near-constant features): split into per-scale Dense layers."""
    import numpy as np

    from finetune_cli.models import formats
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    rng = np.random.default_rng(0)
    kernel = (rng.uniform(0.4, 0.6, (6, 3)) * rng.choice([-1, 1], (6, 3))).astype("float32")
    kernel[2] *= 100  # one near-constant feature's row, as measured on a real run (252 against 0.5)
    model.layers[-1].set_weights([kernel, np.array([0.1, -0.2, 0.3], "float32")])
    split = formats.split_head(model)
    x = np.random.default_rng(1).uniform(0, 1, (8, 6)).astype("float32")
    np.testing.assert_allclose(split.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    parts = [layer for layer in split.layers if isinstance(layer, keras.layers.Dense)]
    assert len(parts) == 2 and [p.get_weights()[0].shape[0] for p in parts] == [1, 5]
    model.layers[-1].set_weights([kernel / np.abs(kernel).max(1, keepdims=True), np.zeros(3, "float32")])
    assert formats.split_head(model) is model  # rows within a factor 8: nothing to split
