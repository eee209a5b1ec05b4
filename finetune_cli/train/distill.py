"""Knowledge distillation as a loss on the training engine (Hinton et al. 2015).

    loss = alpha * CE(label, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

x_T = softmax(log(x) / T): for the student that is softmax(logits / T); the
teachers are finished runs that output probabilities, so their log-probabilities
stand in for logits (softmax(log p / T) = p^(1/T) / sum p^(1/T)). Several
teachers are averaged as probabilities first. An unlabeled (transfer-set)
image has the soft term only. The T^2 factor keeps the soft gradients the same
size whatever T (they scale as 1 / T^2), which keras-io's first distillation
example left out.

Keras 3.15's `keras.distillation` (`Distiller`, `LogitsDistillation`) is a
`keras.Model` with its own `compile`/`fit`, and its loss is a batch mean with
no per-image weights or labelled/unlabeled mask; the engine here is
`train.engine.Trainer`, so the loss is written for it (tests check it against
`LogitsDistillation(loss=keras.losses.KLDivergence())` on the same logits; with
its default `loss="kl_divergence"` Keras 3.15 resolves the plain function,
which skips the softmax and the T^2 and compares raw scaled logits).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from finetune_cli.config import DistillConfig
from finetune_cli.models.backbones import PREPROCESS_PREFIX
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.engine import Each, EarlyStopping, Group, LoopState, NanGuard, Trainer, adam, fit_with_retries


def soft_targets(teacher_probs: list[np.ndarray], temperature: float) -> np.ndarray:
    """Teachers' probabilities, averaged, then softened: softmax(log(mean p) / T).

    Args:
        teacher_probs: one (n, k) array per teacher, rows summing to 1.
    Returns:
        float32 (n, k), rows summing to 1.
    """
    mean = np.mean(np.stack([np.asarray(p, np.float64) for p in teacher_probs]), axis=0)
    logits = np.log(np.clip(mean, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    soft = np.exp(logits)
    return (soft / soft.sum(axis=1, keepdims=True)).astype(np.float32)


def per_image_loss(logits, labels, soft, labelled, temperature: float, alpha: float):
    """The distillation loss of each image (B,), a tensor.

    Args:
        logits: student logits (B, k).
        labels: int class indices (B,); ignored where `labelled` is 0.
        soft: the teachers' softened targets (B, k) (`soft_targets`).
        labelled: float (B,), 1 for a labelled image, 0 for a transfer-set one.
    """
    import tensorflow as tf

    hard = -tf.gather(tf.nn.log_softmax(logits), tf.maximum(labels, 0), batch_dims=1)
    log_student_t = tf.nn.log_softmax(logits / temperature)
    kl = tf.reduce_sum(tf.math.xlogy(soft, soft) - soft * log_student_t, axis=1)
    return alpha * labelled * hard + (1.0 - alpha) * temperature**2 * kl


def logits_of(model):
    """model -> a function x, training -> the logits (B, k) under its softmax `classifier` layer."""
    keras = import_keras()
    dense = model.get_layer("classifier")
    below = keras.Model(model.input, dense.input)
    return lambda x, training: below(x, training=training) @ dense.kernel + dense.bias


def distillation_loss(model, temperature: float, alpha: float):
    """An engine loss over (x, y, w, soft, labelled) batches: weighted mean of `per_image_loss`.

    Reports `agreement`: the weighted fraction of images whose student top-1
    is the teachers' top-1.
    """
    import tensorflow as tf

    logits = logits_of(model)

    def loss(x, y, w, soft, labelled):
        z = logits(x, True)
        per_image = per_image_loss(z, y, soft, labelled, temperature, alpha)
        weight = tf.reduce_sum(w)
        same = tf.cast(tf.equal(tf.argmax(z, 1), tf.argmax(soft, 1)), tf.float32) * w
        return tf.reduce_sum(per_image * w) / tf.maximum(weight, 1e-8), weight, {"agreement": tf.reduce_sum(same)}

    return loss


def fit_student(model, train_data, val_data, n_classes: int, *, temperature: float, alpha: float,
                settings: DistillConfig, retries: int = 2,
                progress: Callable[[LoopState, int], None] | None = None) -> LoopState:
    """Train `model` (raw pixels -> probabilities, a `classifier` layer) with `distillation_loss` on the engine.

    Every layer trains at `settings.learning_rate` except the preprocessing
    layers; early stopping on the validation cross-entropy restores the best
    epoch; a divergence retries at a tenth of the rate.

    Args:
        train_data: batches of (images float32 (B, S, S, 3) in [0, 255], labels
            int32 (B,), weights float32 (B,), soft float32 (B, k), labelled float32 (B,)).
        val_data: batches of (images, labels, weights), labelled images.

    Raises:
        engine.Diverged: still diverging after `retries` retries.
    """
    import tensorflow as tf

    from finetune_cli.train.setup import evaluate, predictor

    variables = [v for layer in model.layers if not layer.name.startswith(PREPROCESS_PREFIX)
                 for v in layer.trainable_variables]
    size = model.input_shape[1]
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None,), tf.int32),
                 tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None, n_classes), tf.float32),
                 tf.TensorSpec((None,), tf.float32)]
    callbacks = [NanGuard(), EarlyStopping(settings.patience)]
    if progress:
        callbacks.append(Each(lambda trainer, state, logs: progress(state, settings.epochs)))
    trainer = Trainer(model, distillation_loss(model, temperature, alpha),
                      [Group("student", variables, settings.learning_rate)], signature, optimizer=adam,
                      callbacks=callbacks)
    forward = predictor(model)
    validate = lambda: dict(zip(("val_loss", "val_accuracy"), evaluate(model, val_data, forward)))  # noqa: E731
    return fit_with_retries(trainer, train_data, validate, settings.epochs, retries=retries)
