"""Fine-tuning: the training engine with cross-entropy and discriminative learning rates.

One optimizer per group (head, top stages, intermediate stages), each at its
own rate; BatchNorm layers frozen (so they run in inference mode); early
stopping on validation loss that restores the best weights (also after a
--resume, from the best-weights file); plateau decay; a checkpoint after every
epoch; the NaN guard on the training and the validation loss. The loop itself
is `engine.Trainer.fit`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from finetune_cli.analysis.calibration import nll
from finetune_cli.analysis.scores import metric_value
from finetune_cli.models.backbones import PREPROCESS_PREFIX
from finetune_cli.models.stages import find_stages
from finetune_cli.runtime.keras import import_keras
from finetune_cli.strategy.decide import Plan
from finetune_cli.strategy.recipes import Recipe
from finetune_cli.train.engine import Callback, Each, EarlyStopping, Group, LoopState, NanGuard, PlateauDecay, Trainer

HEAD_LAYERS = ("classifier",)


def set_trainable(model, plan: Plan, whole=None) -> dict[str, list]:
    """Freeze all but the plan's stages and the head; return variables per group.

    Args:
        model: the model to train.
        whole: the whole network when `model` is a part of it (the top above
            a cached prefix): stage indices count in the whole network.

    Returns:
        {"head": [...], "top": [...], "intermediate": [...]} trainable variables.
    """
    keras = import_keras()
    whole = whole if whole is not None else model
    stages = {s.index: s for s in find_stages(whole)}
    group_of_layer = {}
    for index in plan.train_stages:
        stage = stages[index]
        group = "top" if index in plan.top_stages else "intermediate"
        for layer in whole.layers[stage.first : stage.last + 1]:
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


def optimizer_for(recipe: Recipe) -> Callable[[float], object]:
    """rate -> the recipe's optimizer (Adam, or SGD with momentum), with its weight decay."""
    keras = import_keras()
    decay = recipe.weight_decay or None
    if recipe.optimizer == "sgd":
        return lambda rate: keras.optimizers.SGD(rate, momentum=recipe.momentum, weight_decay=decay)
    return lambda rate: keras.optimizers.Adam(rate, weight_decay=decay)


def cross_entropy(model, mixup: float = 0.0):
    """An engine loss: weighted mean sparse cross-entropy of (x, y, w) batches, and weighted hits.

    `mixup` > 0: each batch is mixed with a shuffled copy of itself at lam ~ Beta(mixup, mixup)
    per batch, lam >= 0.5 (so the hits count the first label): x = lam x + (1 - lam) x', the loss
    lam CE(y) + (1 - lam) CE(y'), weights mixed the same way.
    """
    import tensorflow as tf

    keras = import_keras()
    ce = keras.losses.sparse_categorical_crossentropy

    def loss(x, y, w):
        if mixup > 0:
            order = tf.random.shuffle(tf.range(tf.shape(x)[0]))
            a, b = tf.random.gamma([], mixup), tf.random.gamma([], mixup)
            lam = tf.maximum(a / (a + b), b / (a + b))
            probs = model(lam * x + (1 - lam) * tf.gather(x, order), training=True)
            per_sample = lam * ce(y, probs) + (1 - lam) * ce(tf.gather(y, order), probs)
            w = lam * w + (1 - lam) * tf.gather(w, order)
        else:
            probs = model(x, training=True)
            per_sample = ce(y, probs)
        weight = tf.reduce_sum(w)
        hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1, output_type=tf.int32), y), tf.float32) * w)
        return tf.reduce_sum(per_sample * w) / tf.maximum(weight, 1e-8), weight, {"accuracy": hits}

    return loss


def finetuner(
    model,
    plan: Plan,
    recipe: Recipe,
    val_data,
    *,
    checkpoint: Callable[[object, LoopState, bool], None] | None = None,
    restore_best: Callable[[object], None] | None = None,
    progress: Callable[[LoopState, int], None] | None = None,
    whole=None,
    extra: Sequence[Callback] = (),
    schedule: bool = True,
    metric: str = "accuracy",
) -> tuple[Trainer, Callable[[], dict]]:
    """(trainer, validate): fine-tuning `model` as the plan says, for `engine.fit_with_retries`.

    Args:
        model: raw pixels (or cached activations) -> probabilities, with a
            `classifier` Dense layer.
        val_data: a dataset of (inputs, labels, weights) batches.
        checkpoint: called after each epoch with (model, state, improved).
        restore_best: loads the best weights saved by `checkpoint` into the
            model, for a best epoch from before a resume.
        progress: called after each epoch with (state, total epochs).
        whole: the whole network when `model` is its top (see `set_trainable`).
        extra: more engine callbacks, run after the others (weight averaging, snapshots).
        schedule: early stopping and the plateau decay on (train); off, every epoch of `plan.epochs`
            runs at the planned rates (a tune rung trained for a fixed number of epochs).
        metric: what early stopping keeps the best epoch by: "accuracy" (the lowest validation loss, as
            ever) or "macro_f1" (the highest validation macro-F1, for imbalanced classes; ties by the loss).
    """
    groups = set_trainable(model, plan, whole)
    rates = plan.learning_rates
    callbacks = [NanGuard()]
    if schedule:
        callbacks += [EarlyStopping(recipe.patience, 1e-4, restore_best=restore_best,
                                    monitor=None if metric == "accuracy" else f"val_{metric}"),
                      PlateauDecay(recipe.plateau_factor, recipe.patience // 2)]
    if checkpoint:
        callbacks.append(Each(lambda trainer, s, logs: checkpoint(trainer.model, s, logs["improved"])))
    if progress:
        callbacks.append(Each(lambda trainer, s, logs: progress(s, plan.epochs)))
    callbacks.extend(extra)
    trainer = Trainer(model, cross_entropy(model, recipe.mixup), [Group(k, v, rates[k]) for k, v in groups.items()],
                      signature_of(model),
                      optimizer=optimizer_for(recipe), callbacks=callbacks)
    forward = predictor(model)
    return trainer, lambda: validation_scores(model, val_data, forward)


def signature_of(model) -> list:
    """The engine's tf.function signature for (inputs float32 (B, *model input), labels int32, weights float32)."""
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    return [tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None,), tf.float32)]


def validation_scores(model, data, forward=None) -> dict:
    """{"val_loss" (mean cross-entropy, nats), "val_accuracy", "val_macro_f1" (0-1)} of `model` over (x, y, w)
    batches, inference mode (see `evaluate`)."""
    probs, labels = predict_batches(model, data, forward)
    guess = probs.argmax(1)
    return {"val_loss": nll(probs, labels, floor=1e-7), "val_accuracy": float((guess == labels).mean()),
            "val_macro_f1": metric_value("macro_f1", labels, guess)}


def evaluate(model, data, forward=None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over (x, y, w) batches, inference mode.

    `forward`: a traced `predictor(model)` to reuse, so that validating every
    epoch does not trace the model every epoch.
    """
    probs, labels = predict_batches(model, data, forward)
    return nll(probs, labels, floor=1e-7), float((probs.argmax(1) == labels).mean())


def predictor(model):
    """`model` in inference mode as a tf.function traced once for any batch size."""
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    return tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, *shape), tf.float32)])


def predict_batches(model, data, forward=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), labels (n,)) over (x, y, w) batches."""
    forward = forward or predictor(model)
    probs, labels = [], []
    for x, y, _ in data:
        probs.append(forward(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)
