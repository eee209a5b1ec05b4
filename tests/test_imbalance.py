"""Imbalanced classes (3x or more): the run's choices go by macro-F1, not accuracy, and say so."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from finetune_cli import api
from finetune_cli.analysis.scores import best_c, metric_value, selection_metric
from finetune_cli.config import TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.train.compare import compare_on_validation
from finetune_cli.train.engine import EarlyStopping, LoopState
from finetune_cli.train.linear import fit_linear
from tests.test_train import recipe_file

NO_CALIBRATION = dataclasses.replace(TRAIN, calibrate=False)


def imbalanced_shapes(root, big: int = 24, small: int = 6):
    """Three shape classes, the last cut to `small` images (big / small x imbalance)."""
    root = make_shapes_folder(root, per_class=big, size=32, seed=3)
    last = sorted(p for p in root.iterdir() if p.is_dir())[-1]
    for path in sorted(last.iterdir())[small:]:
        path.unlink()
    return root


def minority_case():
    """90 validation images of class 0 and 10 of class 1: a head that calls everything 0 (accuracy 0.90,
    confident on the majority) against one that finds every minority image and misses 12 majority ones
    (accuracy 0.88)."""
    labels = np.array([0] * 90 + [1] * 10)
    majority = np.tile([0.95, 0.05], (100, 1))
    majority[90:] = [0.7, 0.3]
    finder = np.tile([0.9, 0.1], (100, 1))
    finder[78:90] = [0.05, 0.95]
    finder[90:] = [0.1, 0.9]
    return labels, majority, finder


def test_the_keep_rule_goes_by_macro_f1_when_the_classes_are_imbalanced():
    labels, majority, finder = minority_case()
    assert metric_value("accuracy", labels, finder.argmax(1)) < metric_value("accuracy", labels, majority.argmax(1))
    by_accuracy = compare_on_validation(finder, labels, majority, labels)
    assert by_accuracy["kept"] == "linear-head" and by_accuracy["metric"] == "accuracy"
    by_f1 = compare_on_validation(finder, labels, majority, labels, metric="macro_f1")
    assert by_f1["kept"] == "fine-tuned" and by_f1["decided_by"] == "macro-F1"
    assert by_f1["difference_interval"][0] > 0 and "accuracy_difference_interval" not in by_f1
    assert by_f1["fine_tuned"]["macro_f1"] == pytest.approx(metric_value("macro_f1", labels, finder.argmax(1)))
    assert "macro-F1" in by_f1["note"] and selection_metric(True) == "macro_f1" and selection_metric(False) == "accuracy"


def test_early_stopping_can_keep_the_epoch_of_the_best_macro_f1(tiny_base):
    import keras

    model = keras.saving.load_model(tiny_base)
    trainer = type("T", (), {"model": model})()
    epochs = [(0.5, 1.0), (0.6, 1.2), (0.6, 1.1), (0.55, 0.9)]  # (val_macro_f1, val_loss)
    best = {}
    for monitor in (None, "val_macro_f1"):
        stopping, state = EarlyStopping(patience=10, monitor=monitor), LoopState()
        for epoch, (f1, loss) in enumerate(epochs, 1):
            state.epoch = epoch
            stopping.on_epoch_end(trainer, state, {"epoch": epoch, "val_loss": loss, "val_macro_f1": f1})
        best[monitor] = state.best_epoch
    # by the loss: epoch 4 (0.9); by macro-F1: epoch 3 (0.6, tied with epoch 2, and the lower loss)
    assert best == {None: 4, "val_macro_f1": 3}


def test_a_weighted_linear_head_chooses_c_by_out_of_fold_macro_f1():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 60 + [1] * 12)
    features = rng.normal(0, 1, (72, 5)) + labels[:, None] * 1.2
    head = fit_linear(features, labels, 2, balanced=True)
    assert head.metric == "macro_f1" and head.C == best_c(head.scores, "macro_f1")
    chosen = next(s for s in head.scores if s["C"] == head.C)
    assert chosen["cv_macro_f1"] == pytest.approx(metric_value("macro_f1", labels, head.oof.argmax(1)))
    assert fit_linear(features, labels, 2).metric == "accuracy"


def test_an_imbalanced_run_chooses_by_macro_f1_and_says_so(tmp_path, tiny_base):
    root = imbalanced_shapes(tmp_path / "shapes")
    metrics = api.train(root, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                        recipe=recipe_file(tmp_path, epochs=3),
                        settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=0, headroom_check=False))
    assert metrics["selection_metric"] == "macro_f1" and metrics["profile"]["imbalance"] >= 3
    assert any("chooses by macro-F1" in w for w in metrics["profile"]["warnings"])
    assert metrics["comparison"]["metric"] == "macro_f1" and "macro-F1" in metrics["comparison"]["note"]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["val_macro_f1"].between(0, 1).all()
    balanced = make_shapes_folder(tmp_path / "even", per_class=12, size=32, seed=3)
    plain = api.train(balanced, str(tiny_base), out=tmp_path / "even_run", image_size=32, similarity="similar",
                      strategy="linear", settings=NO_CALIBRATION)
    assert plain["selection_metric"] == "accuracy"


def test_tune_maximises_macro_f1_on_imbalanced_classes(tmp_path, tiny_base):
    root = imbalanced_shapes(tmp_path / "shapes", big=30, small=8)
    summary = api.tune(root, str(tiny_base), out=tmp_path / "search", image_size=32, budget=4, cv=2)
    assert summary["objective"] == "macro_f1"
    trials = pd.read_csv(tmp_path / "search" / "trials.csv")
    full = trials[trials["n_images"] == summary["n_searched"]]
    assert summary["best"]["mean_macro_f1"] == pytest.approx(full["mean_macro_f1"].max())
    assert summary["estimate"]["macro_f1"] is not None


def test_the_pilot_bar_is_the_linear_heads_macro_f1_on_imbalanced_classes(tmp_path, tiny_base):
    root = imbalanced_shapes(tmp_path / "shapes")
    frozen = recipe_file(tmp_path, learning_rate=1e-12, epochs=6, patience=6, dropout=0.0, l2=0.0)
    metrics = api.train(root, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar", recipe=frozen,
                        settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=2, headroom_check=False))
    pilot = metrics["pilot"]
    assert pilot["metric"] == "macro_f1" and pilot["abandoned"] and metrics["kept"] == "linear-head"
    assert pilot["best"]["val_macro_f1"] <= pilot["linear_head"]["val_macro_f1"]
    assert metrics["refit"] == "all labels"  # the kept head, refitted on every label, validated out-of-fold
    assert any("validation macro-F1" in note for note in metrics["notes"])
