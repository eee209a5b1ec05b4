"""`train --average swa|ema`: engine callbacks over real tiny runs, and the keep-if-not-worse rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from finetune_cli import api
from finetune_cli.config import ENSEMBLE, TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import TrainingError
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.averaging import CosineSnapshots, WeightAverage
from tests.conftest import Recorder
from tests.test_train import recipe_file


def run_engine(tiny_base, callback, epochs=5):
    """Train a tiny classifier on random pixels with the engine; returns the weights after each epoch."""
    import tensorflow as tf

    from finetune_cli.models.heads import classifier
    from finetune_cli.train.engine import Each, Group, Trainer
    from finetune_cli.train.setup import cross_entropy

    keras = import_keras()
    backbone = keras.saving.load_model(tiny_base)
    model = classifier(backbone, backbone.layers[-1].name, 3)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (12, 32, 32, 3)).astype("float32"))
    y, w = tf.constant(rng.integers(0, 3, 12).astype("int32")), tf.ones(12)
    signature = [tf.TensorSpec((None, 32, 32, 3), tf.float32), tf.TensorSpec((None,), tf.int32),
                 tf.TensorSpec((None,), tf.float32)]
    seen = []
    trainer = Trainer(model, cross_entropy(model), [Group("all", model.trainable_variables, 0.01)], signature,
                      callbacks=[Each(lambda t, s, logs: seen.append(t.model.get_weights())), callback])
    trainer.fit([(x[:6], y[:6], w[:6]), (x[6:], y[6:], w[6:])], lambda: {"val_loss": 1.0}, epochs)
    return seen


def test_swa_is_exactly_the_mean_of_the_last_epochs_weights(tiny_base):
    swa = WeightAverage("swa")
    seen = run_engine(tiny_base, swa)
    k = ENSEMBLE.swa_epochs
    assert swa.epochs == [5 - k + 1 + i for i in range(k)]
    assert np.abs(seen[-1][0] - seen[-2][0]).max() > 1e-6  # the weights did move between epochs
    for averaged, *snapshots in zip(swa.averaged, *seen[-k:]):
        expected = np.mean([s.astype(np.float64) for s in snapshots], axis=0).astype(snapshots[0].dtype)
        np.testing.assert_array_equal(averaged, expected)


def test_ema_follows_its_recursion_per_epoch(tiny_base):
    ema = WeightAverage("ema")
    seen = run_engine(tiny_base, ema, epochs=4)
    d = ENSEMBLE.ema_decay
    for i, averaged in enumerate(ema.averaged):
        expected = seen[0][i].astype(np.float64)
        for epoch in seen[1:]:
            expected = d * expected + (1 - d) * epoch[i]
        np.testing.assert_allclose(averaged, expected.astype(averaged.dtype), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(ema.averaged[0], seen[-1][0])


def test_averaging_refuses_trainable_batchnorm():
    keras = import_keras()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs)))

    class Stub:
        pass

    trainer = Stub()
    trainer.model = model
    with pytest.raises(TrainingError, match="frozen BatchNorm"):
        WeightAverage("swa").on_train_begin(trainer, None)
    model.layers[-1].trainable = False
    WeightAverage("swa").on_train_begin(trainer, None)  # frozen: accepted


def test_cosine_snapshot_schedule():
    schedule = CosineSnapshots(cycle=4, floor=0.1)
    assert schedule.scale(1) == 1.0 and schedule.scale(5) == 1.0  # every cycle restarts at the full rate
    assert schedule.scale(3) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.scale(4) == pytest.approx(0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2)
    assert schedule.scale(2) > schedule.scale(3) > schedule.scale(4) >= 0.1


@pytest.mark.parametrize("method", ["swa", "ema"])
def test_averaged_fine_tuning_run_keeps_the_better_weights(shapes, tiny_base, tmp_path, method):
    val = make_shapes_folder(tmp_path / "val", per_class=4, size=32, seed=3)
    out = tmp_path / "run"
    settings = dataclasses.replace(TRAIN, calibrate=False, keep_better=False)
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", val_dir=val,
                        recipe=recipe_file(tmp_path, epochs=4), average=method, settings=settings)
    facts = metrics["averaging"]
    assert facts["method"] == method
    assert facts["epochs"] == [2, 3, 4] if method == "swa" else facts["decay"] == ENSEMBLE.ema_decay
    better = facts["averaged_val_loss"] <= facts["best_epoch_val_loss"]
    assert facts["kept"] == ("averaged" if better else "best epoch")
    kept = facts["averaged_val_loss"] if better else facts["best_epoch_val_loss"]
    # the saved model is the kept one (validation there ran on float16 cached activations)
    assert api.evaluate(val, out)["nll"] == pytest.approx(kept, rel=1e-2)
    assert any(note.startswith(method.upper()) for note in metrics["notes"])


def test_average_on_a_linear_plan_is_ignored_with_a_note(shapes, tiny_base, tmp_path):
    recorder = Recorder()
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                        average="swa", reporter=recorder)
    assert "averaging" not in metrics and any("--average swa" in n and "ignored" in n for n in recorder.notes)
