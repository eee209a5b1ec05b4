"""The one training loop: every gradient-trained model goes through `Trainer.fit`.

A use of the engine supplies what differs, and nothing else:
- a loss on one batch (cross-entropy on labels, reconstruction, soft targets...);
- variable groups, each trained by its own optimizer at its own rate
  (head, top stages, intermediate stages; an encoder and its decoder);
- a validation function returning `val_*` figures;
- callbacks for the rest: the NaN guard, early stopping with best-weights
  restore, plateau decay, checkpoints, progress.

`fit_with_retries` wraps `fit` with the NaN policy: on divergence, restore the
starting weights and try again at a tenth of every rate.

A trainer made inside a `tf.distribute` strategy's scope (`runtime.devices`,
`train --devices N`) runs each step on every replica, on its slice of the
global batch; outside one, the step is the plain single-device one.
"""

from __future__ import annotations

from finetune_cli.files import deferred_interrupt

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from finetune_cli.runtime.devices import active
from finetune_cli.runtime.keras import import_keras


class Diverged(Exception):
    """A loss became NaN or infinite at `epoch` (1-based)."""

    def __init__(self, epoch: int, what: str = "loss"):
        super().__init__(f"{what} became NaN or infinite at epoch {epoch}")
        self.epoch = epoch


@dataclass
class Group:
    """Variables trained together by one optimizer at `rate` (times the plateau scale)."""

    name: str
    variables: list
    rate: float


@dataclass
class LoopState:
    """Where training stands; saved beside each checkpoint for --resume.

    Attributes:
        epoch: last completed epoch (0 before the first).
        best_val_loss: lowest validation loss so far.
        best_epoch: the epoch that reached it (0: none yet), or the best by `best_score` when
            early stopping monitors a score.
        best_score: the highest monitored validation score so far (`EarlyStopping(monitor=...)`).
        stale: epochs since the last improvement.
        scale: multiplier on every group's rate (plateau reductions).
        history: one dict per epoch: epoch, loss, val_loss, images, seconds,
            lr_<group>, and whatever else the loss and validation report.
    """

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_score: float = -math.inf
    stale: int = 0
    scale: float = 1.0
    history: list = field(default_factory=list)
    stop: bool = False


class Callback:
    """Hooks of `Trainer.fit`; `logs` is the epoch's history row, which callbacks may extend."""

    def on_train_begin(self, trainer: "Trainer", state: LoopState) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", state: LoopState, logs: dict) -> None:
        pass

    def on_train_end(self, trainer: "Trainer", state: LoopState) -> None:
        pass


#: loss(*batch) -> (mean loss, summed sample weight, {name: summed count}), traced by tf.function.
#: A count `c` is reported per epoch as sum(c) / sum(weight): {"accuracy": hits} gives accuracy.
Loss = Callable[..., tuple]


def adam(rate: float):
    return import_keras().optimizers.Adam(rate)


class Trainer:
    """One model, one loss, its variable groups and callbacks.

    Args:
        model: the Keras model whose weights are snapshot and restored; its
            `losses` (regularisation) are added to the loss.
        loss: see `Loss`.
        groups: variable groups; empty groups are skipped.
        signature: the tf.function input signature of one batch.
        optimizer: rate -> Keras optimizer.

    Attributes:
        strategy: the `tf.distribute` strategy whose scope the trainer was made
            in (the model's variables must come from the same scope), or None.
    """

    def __init__(self, model, loss: Loss, groups: Sequence[Group], signature, *,
                 optimizer: Callable[[float], object] = adam, callbacks: Sequence[Callback] = ()):
        self.model, self.loss, self.signature = model, loss, signature
        self.groups = [g for g in groups if g.variables]
        self.optimizer, self.callbacks = optimizer, list(callbacks)
        self.optimizers, self.compiled = [], None
        self.strategy = active()

    def set_scale(self, scale: float) -> None:
        """Set every group's rate to its base rate times `scale`."""
        for group, optimizer in zip(self.groups, self.optimizers):
            optimizer.learning_rate.assign(group.rate * scale)

    def begin(self, scale: float = 1.0) -> None:
        """Make fresh optimizers (every group at its base rate x `scale`) and trace the step; `fit` starts here."""
        if self.strategy is not None:
            with self.strategy.scope():  # optimizer slots mirrored like the model's variables
                self.optimizers = [self.optimizer(g.rate * scale) for g in self.groups]
                self.compiled = self._replicated_step()
            return
        self.optimizers = [self.optimizer(g.rate * scale) for g in self.groups]
        self.compiled = self._step()

    def train_step(self, batch, scale: float) -> float:
        """One optimizer step on one batch with every group at its base rate x `scale`; returns its mean loss.

        The compiled step of `fit` (traced on first use, see `begin`), for
        callers that drive the rates step by step (the learning-rate sweep).
        The loss is the batch's weighted mean, without regularisation, as
        `fit`'s history reports it; NaN or infinite when training diverged.
        """
        if self.compiled is None:
            self.begin(scale)
        self.set_scale(scale)
        loss_sum, weight, _ = self.compiled(*batch)
        return float(loss_sum) / max(float(weight), 1e-8)

    def fit(self, train_data, validate: Callable[[], dict], epochs: int, state: LoopState | None = None) -> LoopState:
        """Train from `state` (default: epoch 1) to `epochs`, or until a callback stops it.

        A new state starts fresh optimizers (`begin`); a state past epoch 0 on a trainer that has already
        run goes on with its optimizers and compiled step (a restarted Adam jolts a falling loss).

        Args:
            train_data: an iterable of batches matching `signature`.
            validate: () -> {"val_loss": float, ...} after each epoch.

        Raises:
            Diverged: from the NaN guard.
        """
        state = state or LoopState()
        state.stop = False
        if self.compiled is None or state.epoch == 0:
            self.begin(state.scale)
        else:  # this trainer going on from its own last epoch: its optimizers keep their moments
            self.set_scale(state.scale)
        step = self.compiled
        for callback in self.callbacks:
            callback.on_train_begin(self, state)
        with deferred_interrupt() as interrupted:  # Ctrl-C lands between steps, never inside TensorFlow
            for epoch in range(state.epoch + 1, epochs + 1):
                started = time.perf_counter()
                logs = {"epoch": epoch, **self._epoch(step, train_data, interrupted)}
                logs["seconds"] = time.perf_counter() - started
                logs.update(validate())
                logs.update({f"lr_{g.name}": g.rate * state.scale for g in self.groups})
                state.epoch = epoch
                state.history.append(logs)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, state, logs)
                interrupted()
                if state.stop:
                    break
        for callback in self.callbacks:
            callback.on_train_end(self, state)
        return state

    def _step(self):
        import tensorflow as tf

        variables = [v for g in self.groups for v in g.variables]
        for group, optimizer in zip(self.groups, self.optimizers):
            optimizer.build(group.variables)

        @tf.function(input_signature=self.signature)
        def step(*batch):
            with tf.GradientTape() as tape:
                loss, weight, counts = self.loss(*batch)
                total = loss + tf.add_n(self.model.losses) if self.model.losses else loss
            self._apply(tape.gradient(total, variables), variables)
            return loss * weight, weight, counts

        return step

    def _apply(self, grads, variables) -> None:
        """Each group's optimizer applies its slice of `grads` (in `variables` order)."""
        start = 0
        for group, optimizer in zip(self.groups, self.optimizers):
            end = start + len(group.variables)
            optimizer.apply_gradients(zip(grads[start:end], variables[start:end]))
            start = end

    def _replicated_step(self):
        """`_step` on every replica of `self.strategy`, each on its slice of the global batch.

        Each replica's objective is its slice's summed loss over the global
        batch's summed weight (plus regularisation / replicas), so the optimizers'
        sum of the replicas' gradients is the gradient of the global batch's
        weighted mean loss: the same step as on one device. Returns the same
        (loss sum, weight sum, counts) as `_step`, summed over replicas.
        """
        import tensorflow as tf

        strategy, variables = self.strategy, [v for g in self.groups for v in g.variables]
        replicas = strategy.num_replicas_in_sync
        for group, optimizer in zip(self.groups, self.optimizers):
            optimizer.build(group.variables)

        def replica_step(*batch):
            context = tf.distribute.get_replica_context()
            batch = _slice(batch, context.replica_id_in_sync_group, replicas)
            with tf.GradientTape() as tape:
                loss, weight, counts = self.loss(*batch)
                total_weight = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(weight))
                objective = loss * weight / tf.maximum(total_weight, 1e-8)
                if self.model.losses:
                    objective += tf.add_n(self.model.losses) / replicas
            self._apply(tape.gradient(objective, variables), variables)
            return loss * weight, weight, counts

        @tf.function(input_signature=self.signature)
        def step(*batch):
            sums = strategy.run(replica_step, args=batch)
            return tf.nest.map_structure(lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), sums)

        return step

    @staticmethod
    def _epoch(step, data, interrupted: Callable[[], None] = lambda: None) -> dict:
        total, seen, counts = 0.0, 0.0, {}
        for batch in data:
            interrupted()
            loss_sum, weight, batch_counts = step(*batch)
            total, seen = total + float(loss_sum), seen + float(weight)
            for name, value in batch_counts.items():
                counts[name] = counts.get(name, 0.0) + float(value)
        mean = lambda value: value / max(seen, 1e-8)
        return {"loss": mean(total), **{name: mean(value) for name, value in counts.items()}, "images": seen}


def _slice(batch, replica, replicas: int):
    """Replica `replica`'s contiguous share of each tensor's rows (0-d tensors whole): sizes differ by <= 1.

    Sliced on the host, so each device receives its share only.
    """
    import tensorflow as tf

    with tf.device("/cpu:0"):
        rows = tf.shape(batch[0])[0]
        start, end = rows * replica // replicas, rows * (replica + 1) // replicas
        return tuple(t[start:end] if t.shape.rank else t for t in batch)


class NanGuard(Callback):
    """Raise `Diverged` when any of `keys` is not finite (training and validation loss by default)."""

    def __init__(self, keys: Sequence[str] = ("loss", "val_loss")):
        self.keys = keys

    def on_epoch_end(self, trainer, state, logs):
        for key in self.keys:
            if key in logs and not math.isfinite(logs[key]):
                raise Diverged(logs["epoch"], "validation loss" if key.startswith("val") else "loss")


class EarlyStopping(Callback):
    """Track the best epoch; stop after `patience` stale epochs; end on the best weights.

    The best epoch has the lowest validation loss, or with `monitor` (a higher-is-better key of the
    validation logs, e.g. "val_macro_f1") the highest score, ties broken by the lower validation loss.

    Args:
        min_delta: the least loss improvement that counts: absolute, or a fraction
            of the best so far when `relative`.
        on_improve: called with the trainer on each new best (save it).
        restore_best: (model) -> None loading the best weights saved by
            `on_improve`, used when the best epoch predates a resume.

    Sets logs["improved"] for the callbacks after it.
    """

    def __init__(self, patience: int, min_delta: float = 1e-4, relative: bool = False,
                 on_improve: Callable[["Trainer"], None] | None = None,
                 restore_best: Callable[[object], None] | None = None, monitor: str | None = None):
        self.patience, self.min_delta, self.relative = patience, min_delta, relative
        self.on_improve, self.restore_best, self.monitor = on_improve, restore_best, monitor
        self.best_weights = None

    def on_train_begin(self, trainer, state):
        self.best_weights = None

    def improved(self, state: LoopState, logs: dict) -> bool:
        """Whether this epoch beats the best so far (see the class docstring)."""
        best = state.best_val_loss
        lower = logs["val_loss"] < (best * (1 - self.min_delta) if self.relative else best - self.min_delta)
        if self.monitor is None:
            return lower
        score = logs[self.monitor]
        return score > state.best_score + 1e-9 or (abs(score - state.best_score) <= 1e-9 and lower)

    def on_epoch_end(self, trainer, state, logs):
        improved = self.improved(state, logs)
        logs["improved"] = improved
        if improved:
            state.best_val_loss, state.best_epoch, state.stale = logs["val_loss"], logs["epoch"], 0
            if self.monitor is not None:
                state.best_score = float(logs[self.monitor])
            self.best_weights = trainer.model.get_weights()
            if self.on_improve:
                self.on_improve(trainer)
        else:
            state.stale += 1
        if state.stale >= self.patience:
            state.stop = True

    def on_train_end(self, trainer, state):
        if self.best_weights is not None:
            trainer.model.set_weights(self.best_weights)
        elif state.best_epoch and state.best_epoch != state.epoch and self.restore_best:
            self.restore_best(trainer.model)


class PlateauDecay(Callback):
    """Multiply every rate by `factor` each `every` stale epochs (after `EarlyStopping`)."""

    def __init__(self, factor: float, every: int):
        self.factor, self.every = factor, max(1, every)

    def on_epoch_end(self, trainer, state, logs):
        if self.factor < 1 and not logs.get("improved", True) and state.stale % self.every == 0:
            state.scale *= self.factor
            trainer.set_scale(state.scale)


class Each(Callback):
    """Call `fn(trainer, state, logs)` after every epoch: checkpoints, progress."""

    def __init__(self, fn: Callable[["Trainer", LoopState, dict], None]):
        self.fn = fn

    def on_epoch_end(self, trainer, state, logs):
        self.fn(trainer, state, logs)


def fit_with_retries(trainer: Trainer, train_data, validate, epochs: int, state: LoopState | None = None, *,
                     retries: int, on_retry: Callable[[Diverged, float], None] | None = None) -> LoopState:
    """`trainer.fit`, retried from the starting weights at a tenth of every rate when it diverges.

    Args:
        on_retry: called with (the divergence, the new rate factor) before each retry.

    Raises:
        Diverged: still diverging after `retries` retries.
    """
    start = trainer.model.get_weights()
    base = [g.rate for g in trainer.groups]
    for attempt in range(retries + 1):
        try:
            return trainer.fit(train_data, validate, epochs, state)
        except Diverged as exc:
            if attempt == retries:
                raise
            factor = 0.1 ** (attempt + 1)
            if on_retry:
                on_retry(exc, factor)
            for group, rate in zip(trainer.groups, base):
                group.rate = rate * factor
            trainer.model.set_weights(start)
            state = None
    raise AssertionError("unreachable")
