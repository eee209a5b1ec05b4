"""The training engine alone: early stopping, the NaN guard, plateau decay, retries (a tiny real Keras model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.engine import (Diverged, Each, EarlyStopping, Group, NanGuard, PlateauDecay, Trainer,
                                       fit_with_retries)


def tiny_trainer(callbacks, rate=0.1):
    import tensorflow as tf

    keras = import_keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])

    def loss(x, y):
        error = tf.reduce_mean(tf.square(model(x, training=True)[:, 0] - y))
        return error, tf.cast(tf.shape(x)[0], tf.float32), {}

    signature = [tf.TensorSpec((None, 4), tf.float32), tf.TensorSpec((None,), tf.float32)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    data = [(x[i:i + 16], x[i:i + 16].sum(1)) for i in range(0, 64, 16)]
    trainer = Trainer(model, loss, [Group("all", model.trainable_variables, rate)], signature,
                      optimizer=lambda r: keras.optimizers.SGD(r), callbacks=callbacks)
    return trainer, model, data


def scripted(losses):
    """A validate() that returns the given validation losses in turn."""
    it = iter(losses)
    return lambda: {"val_loss": next(it)}


def test_early_stopping_stops_and_ends_on_the_best_epochs_weights():
    seen = {}
    trainer, model, data = tiny_trainer([])
    trainer.callbacks = [EarlyStopping(patience=2), Each(lambda t, s, logs: seen.update({s.epoch: model.get_weights()}))]
    state = trainer.fit(data, scripted([1.0, 0.5, 0.8, 0.9, 0.1]), epochs=5)
    assert state.epoch == 4 and state.best_epoch == 2 and state.stop  # stopped after 2 stale epochs
    for got, best in zip(model.get_weights(), seen[2]):
        np.testing.assert_array_equal(got, best)
    assert [row["improved"] for row in state.history] == [True, True, False, False]


def test_the_nan_guard_watches_the_validation_loss_too():
    trainer, _, data = tiny_trainer([NanGuard(), EarlyStopping(patience=5)])
    with pytest.raises(Diverged, match="validation loss became NaN or infinite at epoch 2"):
        trainer.fit(data, scripted([1.0, math.nan]), epochs=3)


def test_plateau_decay_lowers_every_rate_after_stale_epochs():
    trainer, _, data = tiny_trainer([EarlyStopping(patience=10), PlateauDecay(0.1, 2)], rate=0.01)
    state = trainer.fit(data, scripted([1.0, 1.0, 1.0, 1.0, 1.0]), epochs=5)
    rates = [row["lr_all"] for row in state.history]
    assert rates == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])
    assert float(trainer.optimizers[0].learning_rate) == pytest.approx(1e-4)


def test_retries_restart_from_the_starting_weights_at_a_tenth_of_the_rate():
    trainer, model, data = tiny_trainer([NanGuard()], rate=1e30)
    start = model.get_weights()
    factors = []
    with pytest.raises(Diverged):
        fit_with_retries(trainer, data, lambda: {"val_loss": 1.0}, 2, retries=2,
                         on_retry=lambda exc, factor: factors.append(factor))
    assert factors == pytest.approx([0.1, 0.01]) and trainer.groups[0].rate == pytest.approx(1e28)
    trainer.callbacks = []
    trainer.groups[0].rate = 0.01
    model.set_weights(start)
    state = fit_with_retries(trainer, data, lambda: {"val_loss": 1.0}, 3, retries=2)
    assert state.epoch == 3 and state.history[-1]["loss"] < state.history[0]["loss"]


def test_ctrl_c_during_training_always_stops_it_between_steps():
    """SIGINT lands wherever the main thread is (often inside TensorFlow's iterator, which could swallow a
    KeyboardInterrupt); the engine holds it and raises at the next step, then restores the handler."""
    import os
    import signal
    import threading

    import tensorflow as tf

    trainer, _, batches = tiny_trainer([])
    data = tf.data.Dataset.from_tensor_slices((np.concatenate([b[0] for b in batches]),
                                               np.concatenate([b[1] for b in batches]))).batch(4)
    second, during = threading.Event(), []
    trainer.callbacks = [Each(lambda t, s, logs: during.append(signal.getsignal(signal.SIGINT))),
                         Each(lambda t, s, logs: second.set() if s.epoch >= 2 else None)]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits it ignored
    try:
        threading.Thread(target=lambda: second.wait(60) and os.kill(os.getpid(), signal.SIGINT), daemon=True).start()
        state = None
        with pytest.raises(KeyboardInterrupt):
            state = trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=100_000)
        assert state is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert during and signal.default_int_handler not in during  # held by the engine while it trains
        mine = signal.signal(signal.SIGINT, lambda *_: None)  # an embedding program's own handler is left alone
        seen = []
        trainer.callbacks = [Each(lambda t, s, logs: seen.append(signal.getsignal(signal.SIGINT)))]
        trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=2)
        assert seen and all(h is signal.getsignal(signal.SIGINT) for h in seen) and mine is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_mixup_mixes_pairs_of_images_and_their_labels():
    """On a batch of copies of one example mixup changes nothing; on distinct ones the loss is that of
    mixed inputs against mixed targets, so it differs from the plain loss; a recipe's alpha is checked."""
    import tensorflow as tf

    from finetune_cli.errors import RecipeError
    from finetune_cli.strategy.recipes import parse
    from finetune_cli.train.setup import cross_entropy

    keras = import_keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    plain, mixed = cross_entropy(model), cross_entropy(model, mixup=0.4)
    same = (tf.ones((8, 4)), tf.fill((8,), 2), tf.ones((8,)))
    assert float(mixed(*same)[0]) == pytest.approx(float(plain(*same)[0]), rel=1e-6)
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)) * 3, tf.float32)
    distinct = (x, tf.constant([0, 1, 2, 0, 1, 2, 0, 1]), tf.ones((8,)))
    assert max(abs(float(mixed(*distinct)[0]) - float(plain(*distinct)[0])) for _ in range(5)) > 0.01  # lam varies
    assert parse("mixup = 0.4").mixup == 0.4
    with pytest.raises(RecipeError, match="mixup"):
        parse("mixup = 5.0")


def test_a_trainer_going_on_from_its_own_state_keeps_its_optimizer_and_a_new_state_starts_fresh():
    """Epoch 1, then epochs 2-3 on the same trainer, give the weights of epochs 1-3 in one go (the momentum
    carries over); a fresh start (a new state) or a new trainer from the same state restarts the momentum."""
    keras = import_keras()
    momentum = lambda r: keras.optimizers.SGD(r, momentum=0.9)  # noqa: E731: state a restart would lose
    runs = {}
    for name in ("whole", "going on", "new trainer"):
        trainer, model, data = tiny_trainer([], rate=0.01)
        trainer.optimizer = momentum
        if name == "whole":
            trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=3)
        else:
            state = trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=1)
            if name == "new trainer":
                trainer, _, _ = tiny_trainer([], rate=0.01)
                trainer.model.set_weights(model.get_weights())
                trainer.optimizer, model = momentum, trainer.model
            trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=3, state=state)
        runs[name] = np.concatenate([w.ravel() for w in model.get_weights()])
    np.testing.assert_allclose(runs["going on"], runs["whole"], rtol=1e-6, atol=1e-7)
    assert np.abs(runs["new trainer"] - runs["whole"]).max() > 1e-4
