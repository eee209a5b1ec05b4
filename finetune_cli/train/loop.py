"""Fine-tuning: a training loop with discriminative learning rates.

One optimizer per group (head, top stages, intermediate stages), each at its
own rate; BatchNorm layers frozen (so they run in inference mode); early
stopping on validation loss that restores the best weights (also after a
--resume, from the best-weights file); a checkpoint after every epoch; a NaN
guard on the training and the validation loss that raises `Diverged`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from finetune_cli.models.backbones import PREPROCESS_PREFIX
from finetune_cli.models.stages import find_stages
from finetune_cli.strategy.decide import Plan
from finetune_cli.strategy.recipes import Recipe
from finetune_cli.tfquiet import import_keras

HEAD_LAYERS = ("classifier",)


class Diverged(Exception):
    """The loss became NaN or infinite at `epoch` (1-based)."""

    def __init__(self, epoch: int):
        super().__init__(f"loss became NaN or infinite at epoch {epoch}")
        self.epoch = epoch


@dataclass
class LoopState:
    """Where fine-tuning stands; saved beside each checkpoint for --resume.

    Attributes:
        epoch: last completed epoch (0 before the first).
        best_val_loss: lowest validation loss so far.
        best_epoch: the epoch that reached it.
        stale: epochs since the last improvement.
        scale: current multiplier on every group's rate (plateau reductions).
        history: one dict per epoch: epoch, loss, accuracy, val_loss, val_accuracy, lr_head.
    """

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    scale: float = 1.0
    history: list = field(default_factory=list)


def set_trainable(model, plan: Plan) -> dict[str, list]:
    """Freeze all but the plan's stages and the head; return variables per group.

    Returns:
        {"head": [...], "top": [...], "intermediate": [...]} trainable variables.
    """
    keras = import_keras()
    stages = {s.index: s for s in find_stages(model)}
    group_of_layer = {}
    for index in plan.train_stages:
        stage = stages[index]
        group = "top" if index in plan.top_stages else "intermediate"
        for layer in model.layers[stage.first : stage.last + 1]:
            group_of_layer[layer.name] = group
    groups = {"head": [], "top": [], "intermediate": []}
    for layer in model.layers:
        frozen = (
            isinstance(layer, keras.layers.BatchNormalization)
            or layer.name.startswith(PREPROCESS_PREFIX)
        )
        if layer.name in HEAD_LAYERS:
            layer.trainable = True
            groups["head"].extend(layer.trainable_variables)
        elif layer.name in group_of_layer and not frozen:
            layer.trainable = True
            groups[group_of_layer[layer.name]].extend(layer.trainable_variables)
        elif layer.weights:
            layer.trainable = False
    return groups


def _optimizer(recipe: Recipe, rate: float):
    keras = import_keras()
    decay = recipe.weight_decay or None
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=recipe.momentum, weight_decay=decay)
    return keras.optimizers.Adam(rate, weight_decay=decay)


def fit(
    model,
    plan: Plan,
    recipe: Recipe,
    train_data,
    val_data,
    *,
    state: LoopState | None = None,
    checkpoint: Callable[[object, LoopState, bool], None] | None = None,
    restore_best: Callable[[object], None] | None = None,
    progress: Callable[[LoopState, int], None] | None = None,
) -> LoopState:
    """Fine-tune `model` in place; on return it holds the best weights.

    Args:
        model: raw pixels -> probabilities, with a `classifier` Dense layer.
        train_data, val_data: datasets of (images, labels, weights) batches.
        state: a resumed state, or None to start at epoch 1.
        checkpoint: called after each epoch with (model, state, improved),
            improved True when the epoch is the best so far.
        restore_best: loads the best weights saved by `checkpoint` into the
            model, for a best epoch from before a resume.
        progress: called after each epoch with (state, total epochs).

    Raises:
        Diverged: a non-finite training or validation loss.
    """
    import tensorflow as tf

    keras = import_keras()
    state = state or LoopState()
    groups = set_trainable(model, plan)
    rates = {name: plan.learning_rates[name] * state.scale for name in groups}
    optimizers = {name: _optimizer(recipe, rates[name]) for name, vs in groups.items() if vs}
    for name, optimizer in optimizers.items():
        optimizer.build(groups[name])
    variables = [v for name in optimizers for v in groups[name]]
    spans, start = [], 0
    for name in optimizers:
        spans.append((name, start, start + len(groups[name])))
        start += len(groups[name])

    from finetune_cli.data.pipeline import image_spec

    signature = [image_spec(model.input_shape[1], tf.float32), tf.TensorSpec((None,), tf.int32),
                 tf.TensorSpec((None,), tf.float32)]

    @tf.function(input_signature=signature)
    def step(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            per_sample = keras.losses.sparse_categorical_crossentropy(y, probs)
            loss = tf.reduce_sum(per_sample * w) / tf.maximum(tf.reduce_sum(w), 1e-8)
            total = loss + tf.add_n(model.losses) if model.losses else loss
        grads = tape.gradient(total, variables)
        for name, a, b in spans:
            optimizers[name].apply_gradients(zip(grads[a:b], variables[a:b]))
        hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1, output_type=tf.int32), y), tf.float32) * w)
        return loss, hits, tf.reduce_sum(w)

    best_weights = model.get_weights() if state.epoch == 0 else None
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        loss, accuracy = _run_epoch(step, train_data, epoch)
        val_loss, val_accuracy = evaluate(model, val_data)
        if not math.isfinite(val_loss):
            raise Diverged(epoch)
        state.epoch = epoch
        state.history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy, "val_loss": val_loss,
                              "val_accuracy": val_accuracy, "lr_head": rates["head"] * state.scale})
        improved = val_loss < state.best_val_loss - 1e-4
        if improved:
            state.best_val_loss, state.best_epoch, state.stale = val_loss, epoch, 0
            best_weights = model.get_weights()
        else:
            state.stale += 1
            if recipe.plateau_factor < 1 and state.stale % max(1, recipe.patience // 2) == 0:
                state.scale *= recipe.plateau_factor
                for name, optimizer in optimizers.items():
                    optimizer.learning_rate.assign(rates[name] * state.scale)
        if checkpoint:
            checkpoint(model, state, improved)
        if progress:
            progress(state, plan.epochs)
        if state.stale >= recipe.patience:
            break
    if best_weights is not None and state.best_epoch:
        model.set_weights(best_weights)
    elif state.best_epoch and state.best_epoch != state.epoch and restore_best:
        restore_best(model)
    return state


def _run_epoch(step, data, epoch: int) -> tuple[float, float]:
    total_loss, hits, seen = 0.0, 0.0, 0.0
    for x, y, w in data:
        loss, batch_hits, weight = step(x, y, w)
        loss = float(loss)
        if not math.isfinite(loss):
            raise Diverged(epoch)
        total_loss += loss * float(weight)
        hits += float(batch_hits)
        seen += float(weight)
    return total_loss / max(seen, 1e-8), hits / max(seen, 1e-8)


def evaluate(model, data) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over (x, y, w) batches, inference mode."""
    probs, labels = predict_batches(model, data)
    picked = probs[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
    return loss, float((probs.argmax(1) == labels).mean())


def predict_batches(model, data) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), labels (n,)) over (x, y, w) batches."""
    import tensorflow as tf

    from finetune_cli.data.pipeline import image_spec

    forward = tf.function(lambda x: model(x, training=False), input_signature=[image_spec(model.input_shape[1], tf.float32)])
    probs, labels = [], []
    for x, y, _ in data:
        probs.append(forward(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)
