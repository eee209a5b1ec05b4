"""Knowledge distillation: the loss by hand, cached teacher outputs, the run folder, the built-in students."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import SettingsError
from finetune_cli.features import FeatureCache
from finetune_cli.runs.run import Run
from finetune_cli.train.distill import per_image_loss, soft_targets
from tests.conftest import Recorder, save_tiny_backbone

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]], np.float32)
TEACHER = np.array([[0.7, 0.1, 0.2], [0.05, 0.9, 0.05]], np.float32)
LABELS = np.array([0, 2], np.int32)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A shapes folder (3 classes x 8, 32 px), a transfer set, and a linear teacher run trained on the folder."""
    root = tmp_path_factory.mktemp("distill")
    data = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
    extra = make_shapes_folder(root / "extra", per_class=2, size=32, seed=2)
    base = save_tiny_backbone(root / "tiny.keras")
    api.train(data, str(base), out=root / "teacher", image_size=32, use_cache=False)
    return data, extra, root / "teacher"


@pytest.mark.parametrize("temperature, alpha", [(4.0, 0.5), (2.0, 0.0), (1.0, 0.3)])
def test_loss_equals_hand_computation_with_t_squared(temperature, alpha):
    soft = soft_targets([TEACHER], temperature)
    # by hand: softmax(log p / T) for the teacher, softmax(z / T) for the student, KL, times T^2
    expected_soft = softmax(np.log(TEACHER) / temperature)
    np.testing.assert_allclose(soft, expected_soft, rtol=1e-5)
    student_t = softmax(LOGITS / temperature)
    kl = (expected_soft * np.log(expected_soft / student_t)).sum(axis=1)
    ce = -np.log(softmax(LOGITS)[np.arange(2), LABELS])
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    got = np.asarray(per_image_loss(LOGITS, LABELS, soft, np.ones(2, np.float32), temperature, alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # without the T^2 factor it would be off by T^2 on the soft term (keras-io#869)
    if alpha < 1 and temperature != 1:
        assert not np.allclose(got, alpha * ce + (1 - alpha) * kl, rtol=1e-3)


def test_soft_term_matches_keras_logits_distillation():
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    # an explicit KLDivergence instance: with the default loss="kl_divergence" (a string), Keras 3.15 resolves
    # the plain function, skips its softmax + T^2 branch and compares the raw scaled logits (about 0 here)
    reference = keras.distillation.LogitsDistillation(temperature=3.0, loss=keras.losses.KLDivergence())
    expected = float(reference.compute_loss(np.log(TEACHER), LOGITS))
    soft = soft_targets([TEACHER], 3.0)
    got = np.asarray(per_image_loss(LOGITS, LABELS, soft, np.ones(2, np.float32), 3.0, 0.0)).mean()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_alpha_one_is_plain_cross_entropy_and_unlabeled_images_have_the_soft_term_only():
    import tensorflow as tf

    soft = soft_targets([TEACHER], 4.0)
    got = np.asarray(per_image_loss(LOGITS, LABELS, soft, np.ones(2, np.float32), 4.0, 1.0))
    expected = tf.keras.losses.sparse_categorical_crossentropy(LABELS, LOGITS, from_logits=True).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    unlabeled = np.asarray(per_image_loss(LOGITS, np.array([-1, -1], np.int32), soft, np.zeros(2, np.float32), 4.0, 0.5))
    soft_only = np.asarray(per_image_loss(LOGITS, LABELS, soft, np.ones(2, np.float32), 4.0, 0.0)) * 0.5
    np.testing.assert_allclose(unlabeled, soft_only, rtol=1e-5)


def test_two_teachers_are_averaged_as_probabilities():
    other = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float32)
    got = soft_targets([TEACHER, other], 2.0)
    np.testing.assert_allclose(got, softmax(np.log((TEACHER + other) / 2) / 2.0), rtol=1e-5)
    assert not np.allclose(got, soft_targets([TEACHER], 2.0), atol=1e-2)


def test_distill_end_to_end_writes_a_loadable_run_and_caches_teacher_outputs(teacher, tmp_path):
    data, extra, teacher_run = teacher
    cache_dir = tmp_path / "cache"
    recorder = Recorder()
    metrics = api.distill(data, [teacher_run], "lenet", out=tmp_path / "student", unlabeled=extra, epochs=2,
                          cache_dir=cache_dir, reporter=recorder)
    out = tmp_path / "student"
    assert {"model.keras", "student_hard.keras", "labels.json", "history.csv", "distill.json",
            "metrics.json"} <= {p.name for p in out.iterdir()}
    table = json.loads((out / "distill.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["teacher teacher", "student (hard)", "student (distilled)"]
    for row in table["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["params"] > 0 and row["bytes"] > 0
        assert row["ms_batch1"] > 0 and row["ms_batch32"] > 0
    # the train split (19 images) and the transfer set (6), each scored once by the teacher
    assert table["teacher_images_computed"] == 19 + 6 and table["unlabeled_images"] == 6
    assert FeatureCache.at(cache_dir).info()["entries"] == 25
    assert len(recorder.epochs) == 4 and metrics["distill"] == table

    run = Run.load(out)
    assert run.classes == ["circle", "square", "triangle"] and run.image_size == 32
    frame, _ = api.predict([data / "circle"], out)
    assert len(frame) == 8
    np.testing.assert_allclose(frame[["p_circle", "p_square", "p_triangle"]].sum(axis=1), 1, atol=1e-4)

    # a rerun (two teachers now: the same run twice, so one namespace) runs no teacher
    again = api.distill(data, [teacher_run, teacher_run], "lenet", out=tmp_path / "again", unlabeled=extra,
                        epochs=1, cache_dir=cache_dir)
    assert again["distill"]["teacher_images_computed"] == 0
    assert FeatureCache.at(cache_dir).info()["entries"] == 25


def test_train_base_lenet_on_32_px(shapes, tmp_path):
    metrics = api.train(shapes, "lenet", out=tmp_path / "run", image_size=32)
    assert 0 <= metrics["val_accuracy"] <= 1
    run = Run.load(tmp_path / "run")
    assert run.image_size == 32 and run.model.get_layer("c5") is not None


def test_builtin_networks_start_fresh_even_when_imagenet_is_asked():
    from finetune_cli.models.backbones import resolve

    ref = resolve("alexnet", "imagenet", 32)
    assert ref.weights == "none" and ":seed0" in ref.identity


@pytest.mark.parametrize("args, message", [
    (["--alpha", "1.5"], "Expected --alpha in [0, 1]"),
    (["--alpha", "nan"], "Expected --alpha in [0, 1]"),
    (["--temperature", "0"], "Expected --temperature > 0"),
])
def test_bad_settings_are_one_line_errors(teacher, tmp_path, args, message):
    data, _, teacher_run = teacher
    result = CliRunner().invoke(cli, ["distill", str(data), "--teacher", str(teacher_run), "--student", "lenet",
                                      "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_teacher_that_is_not_a_run_is_a_one_line_error(teacher, tmp_path):
    data, extra, _ = teacher
    result = CliRunner().invoke(cli, ["distill", str(data), "--teacher", str(extra), "--student", "lenet",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "is not a finished run" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(SettingsError, match="--teacher is required"):
        api.distill(data, [], "lenet", out=tmp_path / "y")


def test_cli_distill_prints_the_table(teacher, tmp_path):
    data, _, teacher_run = teacher
    result = CliRunner().invoke(cli, ["distill", str(data), "--teacher", str(teacher_run), "--student", "lenet",
                                      "--epochs", "1", "--temperature", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "student (distilled)" in result.output and "T=2, alpha=0.5" in result.output
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["temperature"] == 2.0


def test_a_teacher_with_other_classes_is_refused(teacher, tmp_path):
    """A teacher trained on other class folders would teach the wrong labels: one line, exit 2, nothing written."""
    import shutil

    data, _, teacher_run = teacher
    fewer = tmp_path / "fewer"
    for name in sorted(p.name for p in data.iterdir() if p.is_dir())[:2]:
        shutil.copytree(data / name, fewer / name)
    result = CliRunner().invoke(cli, ["distill", str(fewer), "--teacher", str(teacher_run), "--student", "lenet",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "knows the classes" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
