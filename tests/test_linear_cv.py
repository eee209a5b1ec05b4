"""The linear head uses every label: out-of-fold validation, a refit on all images, a C search that
does not stop at an arbitrary edge, and a diagnosis that says when it did."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from finetune_cli import api
from finetune_cli.analysis.diagnose import diagnose_history
from finetune_cli.analysis.scores import best_c
from finetune_cli.config import LINEAR, TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.linear import fit_linear


def blobs(n_per_class: int, d: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes in d dimensions, centres 1 apart, each point `spread` around its centre."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    centres = rng.normal(size=(3, d))
    return centres[labels] + spread * rng.normal(size=(len(labels), d)), labels


def test_a_linear_run_trains_on_every_image_and_validates_out_of_fold(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=8, size=32, seed=1)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar")
    assert metrics["strategy"] == "linear"
    assert metrics["n_train"] == metrics["n_val"] == 24  # no image held out
    assert metrics["validation"]["method"] == "out-of-fold" and metrics["validation"]["n_images"] == 24
    assert metrics["calibration"]["n_val"] == 24  # the temperature is fitted on out-of-fold probabilities
    val = pd.read_csv(out / "predictions_val.csv")
    assert len(val) == 24
    # the saved head is the refit on all 24: the same head fitted here on the same features at the chosen C
    keras = import_keras()
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    classifier = model.get_layer("classifier")
    trunk = keras.Model(model.inputs, classifier.input)
    images = np.stack([np.asarray(keras.utils.load_img(p)) for p in val["path"]]).astype("float32")
    features = trunk.predict(images, verbose=0)
    labels = val["true"].map({c: i for i, c in enumerate(metrics["classes"])}).to_numpy()
    refit = fit_linear(features, labels, 3, config=dataclasses.replace(LINEAR, c_grid=(metrics["C"],)))
    kernel, _ = classifier.get_weights()
    temperature = metrics["calibration"]["temperature"]  # folded in: the saved kernel is the head's / T
    assert np.allclose(kernel * temperature, refit.kernel, atol=2e-3 * np.abs(refit.kernel).max())
    # the recorded validation probabilities are not the saved model's own: each image was out of its fold
    own = model.predict(images, verbose=0)[np.arange(24), labels]
    assert not np.allclose(val["p_true"].to_numpy(), own, atol=1e-3)


def test_a_val_dir_still_wins_and_the_hold_out_stays_for_fine_tuning(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=8, size=32, seed=1)
    val = make_shapes_folder(tmp_path / "val", per_class=4, size=32, seed=7)
    given = api.train(shapes, str(tiny_base), out=tmp_path / "a", image_size=32, similarity="similar", val_dir=val)
    assert "validation" not in given and given["n_train"] == 24 and given["n_val"] == 12
    held = api.train(shapes, str(tiny_base), out=tmp_path / "b", image_size=32, similarity="similar",
                     settings=dataclasses.replace(TRAIN, cross_validate=False))
    assert "validation" not in held and held["n_train"] + held["n_val"] == 24 and held["n_val"] < 24


def test_out_of_fold_probabilities_come_from_heads_that_never_saw_the_image():
    x, y = blobs(12, 8, spread=0.6)
    head = fit_linear(x, y, 3)
    assert head.oof.shape == (36, 3) and np.allclose(head.oof.sum(1), 1, atol=1e-5)
    # a duplicated point memorised in-sample is not memorised out-of-fold: move one point far into class 1's
    # territory but label it 0; in-sample it pulls the head, out of fold it is predicted as class 1
    x2 = x.copy()
    x2[0] = x[y == 1].mean(0) * 3
    head2 = fit_linear(x2, y, 3, config=dataclasses.replace(LINEAR, c_grid=(1000.0,)))
    assert head2.oof[0].argmax() == 1
    # only the first n_primary rows (the images, not their augmented views) get out-of-fold rows
    views = np.concatenate([x, x + 0.01])
    groups = np.concatenate([np.arange(36), np.arange(36)])
    with_views = fit_linear(views, np.concatenate([y, y]), 3, groups=groups, n_primary=36)
    assert with_views.oof.shape == (36, 3)


def test_the_c_grid_is_extended_until_the_best_c_is_inside():
    separable, labels = blobs(20, 40, spread=0.6)  # separable classes: weaker regularisation keeps lowering the loss
    head = fit_linear(separable, labels, 3)
    tried = [s["C"] for s in head.scores]
    assert max(tried) > max(LINEAR.c_grid)  # extended beyond the first grid's top
    assert tried == sorted(tried) and head.C == best_c(head.scores)
    # a weak signal in 100 noisy dimensions, 10 images per class: only strong regularisation generalises
    rng = np.random.default_rng(0)
    weak_labels = np.repeat(np.arange(3), 10)
    weak = 0.3 * rng.normal(size=(3, 100))[weak_labels]
    shrunk = fit_linear(weak + rng.normal(size=(30, 100)), weak_labels, 3)
    tried = [s["C"] for s in shrunk.scores]
    assert min(tried) < min(LINEAR.c_grid) <= shrunk.C  # extended below the first grid's bottom
    assert min(tried) >= LINEAR.c_range[0] * 0.999
    fixed = fit_linear(separable, labels, 3, config=dataclasses.replace(LINEAR, c_grid=(0.5,)))
    assert [s["C"] for s in fixed.scores] == [0.5]  # a recipe's linear_c is never extended


def test_ties_in_accuracy_are_broken_by_the_log_loss_not_by_the_smallest_c():
    rows = [{"C": 0.01, "cv_accuracy": 1.0, "cv_log_loss": 0.9}, {"C": 0.1, "cv_accuracy": 1.0, "cv_log_loss": 0.2},
            {"C": 1.0, "cv_accuracy": 0.9, "cv_log_loss": 0.1}]
    assert best_c(rows) == 0.1


def test_the_diagnosis_says_on_the_edge_when_the_best_c_is_on_an_end():
    plateau = [{"C": 0.001, "cv_accuracy": 0.80, "cv_log_loss": 0.5}, {"C": 0.01, "cv_accuracy": 0.80,
                                                                       "cv_log_loss": 0.6},
               {"C": 0.1, "cv_accuracy": 0.70, "cv_log_loss": 0.9}]
    verdict = diagnose_history(plateau, classes=3)
    assert "on the edge of the grid" in verdict.reason and "inside" not in verdict.reason
    inside = [{"C": 0.001, "cv_accuracy": 0.70, "cv_log_loss": 0.9}, {"C": 0.01, "cv_accuracy": 0.80,
                                                                      "cv_log_loss": 0.5},
              {"C": 0.1, "cv_accuracy": 0.70, "cv_log_loss": 0.9}]
    assert "inside the grid" in diagnose_history(inside, classes=3).reason
    limit = [{"C": 0.001, "cv_accuracy": 0.70}, {"C": 0.01, "cv_accuracy": 0.90}]
    edge = diagnose_history(limit, classes=3)
    assert edge.verdict == "linear" and "on the edge of the grid" in edge.reason
