"""Engine callbacks over the weights of a fine-tuning run: averaging (SWA, EMA) and snapshots.

    WeightAverage     `--average swa`: the mean of the weights after each of the last
                      `swa_epochs` epochs; `--average ema`: after each epoch,
                      average = decay x average + (1 - decay) x weights (per epoch,
                      not per step: the engine's hooks are per epoch)
    CosineSnapshots   `--ensemble N --ensemble-mode snapshots`: the rate follows a
                      cosine from the recipe's down to `snapshot_floor` of it over each
                      cycle of `snapshot_cycle` epochs, then restarts; the weights at
                      every cycle's end are one member

BatchNorm layers are frozen in this project's fine-tuning (`train.setup.set_trainable`
freezes every one), so their moving statistics never change during a run and an
average of weights needs no statistics recomputed. A model whose BatchNorm layers
train is refused (`TrainingError`) rather than averaged with stale statistics.

`keep_average` then keeps the averaged weights only when their validation
cross-entropy is at least as good as the best epoch's.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from finetune_cli.analysis.calibration import nll
from finetune_cli.config import ENSEMBLE, EnsembleConfig
from finetune_cli.errors import TrainingError
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.engine import Callback


def refuse_training_batchnorm(model) -> None:
    """Raise `TrainingError` when a BatchNormalization layer of `model` trains (its statistics would move)."""
    keras = import_keras()

    def walk(layers):
        for layer in layers:
            yield layer
            yield from walk(getattr(layer, "layers", ()))

    if any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in walk(model.layers)):
        raise TrainingError("weight averaging needs frozen BatchNorm layers (their statistics would have to be "
                            "recomputed); this model trains them")


class WeightAverage(Callback):
    """SWA or EMA of `trainer.model`'s weights (every weight, `get_weights()` order); see the module docstring.

    Attributes:
        averaged: after training, the averaged weights (a list of arrays), or None before.
        epochs: the epochs that went into it (SWA), or the count of epochs averaged (EMA).
    """

    def __init__(self, method: str, config: EnsembleConfig = ENSEMBLE):
        if method not in ("swa", "ema"):
            raise ValueError(f"Expected method swa or ema. Received: method={method!r}")
        self.method, self.config = method, config
        self.recent, self.ema, self.averaged, self.epochs = None, None, None, []

    def on_train_begin(self, trainer, state):
        refuse_training_batchnorm(trainer.model)
        self.recent = collections.deque(maxlen=self.config.swa_epochs)
        self.ema, self.averaged, self.epochs = None, None, []

    def on_epoch_end(self, trainer, state, logs):
        weights = [np.array(w, np.float64) for w in trainer.model.get_weights()]
        self.epochs.append(logs["epoch"])
        if self.method == "swa":
            self.recent.append(weights)
            self.epochs = self.epochs[-self.config.swa_epochs:]
        elif self.ema is None:
            self.ema = weights
        else:
            d = self.config.ema_decay
            self.ema = [d * a + (1 - d) * w for a, w in zip(self.ema, weights)]

    def on_train_end(self, trainer, state):
        if self.method == "swa" and self.recent:
            self.averaged = [np.mean(ws, axis=0) for ws in zip(*self.recent)]
        elif self.ema is not None:
            self.averaged = self.ema
        dtypes = [w.dtype for w in trainer.model.get_weights()]
        if self.averaged is not None:
            self.averaged = [a.astype(t) for a, t in zip(self.averaged, dtypes)]


class CosineSnapshots(Callback):
    """Cosine-restart rates, and `trainer.model`'s weights at each cycle's end in `snapshots`.

    Epoch e (1-based) runs at scale floor + (1 - floor) x (1 + cos(pi x p / L)) / 2
    of every group's rate, p = (e - 1) mod L, L = `cycle` epochs.
    """

    def __init__(self, cycle: int, floor: float):
        self.cycle, self.floor = max(1, cycle), floor
        self.snapshots: list = []

    def scale(self, epoch: int) -> float:
        """The rate multiplier of `epoch` (1-based), in [floor, 1]."""
        p = (epoch - 1) % self.cycle
        return self.floor + (1 - self.floor) * (1 + math.cos(math.pi * p / self.cycle)) / 2

    def on_train_begin(self, trainer, state):
        refuse_training_batchnorm(trainer.model)
        self.snapshots = []
        trainer.set_scale(self.scale(state.epoch + 1))

    def on_epoch_end(self, trainer, state, logs):
        logs["lr_scale"] = self.scale(logs["epoch"])  # the rate that epoch ran at, as a fraction of the recipe's
        if logs["epoch"] % self.cycle == 0:
            self.snapshots.append(trainer.model.get_weights())
        trainer.set_scale(self.scale(logs["epoch"] + 1))


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class) of probs (n, k) for labels (n,), probabilities clipped at 1e-7 (as `train.setup`)."""
    return nll(probs, labels, floor=1e-7)


def keep_average(averager: WeightAverage, trainable, val_data) -> tuple[dict, str]:
    """Keep the averaged weights in `trainable` when their validation cross-entropy is <= the best epoch's.

    `trainable` holds the best epoch's weights on entry (early stopping
    restored them); it ends with whichever is kept.

    Returns:
        (metrics["averaging"]: method, epochs or decay, both validation
        cross-entropies and accuracies, kept ("averaged" or "best epoch"), a note).
    """
    from finetune_cli.train.setup import predict_batches

    best_weights = trainable.get_weights()
    probs, labels = predict_batches(trainable, val_data)
    record = {"method": averager.method, "best_epoch_val_loss": cross_entropy(probs, labels),
              "best_epoch_val_accuracy": float((probs.argmax(1) == labels).mean())}
    record.update({"epochs": averager.epochs} if averager.method == "swa" else
                  {"decay": averager.config.ema_decay, "epochs_averaged": len(averager.epochs)})
    if averager.averaged is None:
        record["kept"] = "best epoch"
        return record, f"{averager.method.upper()}: nothing averaged; kept the best epoch's weights"
    trainable.set_weights(averager.averaged)
    probs, _ = predict_batches(trainable, val_data)
    record.update(averaged_val_loss=cross_entropy(probs, labels),
                  averaged_val_accuracy=float((probs.argmax(1) == labels).mean()))
    better = record["averaged_val_loss"] <= record["best_epoch_val_loss"]
    record["kept"] = "averaged" if better else "best epoch"
    if not better:
        trainable.set_weights(best_weights)
    note = (f"{averager.method.upper()}: kept the {record['kept']} weights (validation cross-entropy "
            f"{record['averaged_val_loss']:.4f} averaged vs {record['best_epoch_val_loss']:.4f} best epoch)")
    return record, note
