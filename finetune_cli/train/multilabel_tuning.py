"""Multi-label fine-tuning: binary cross-entropy on the engine, checked against the linear heads.

    hold-out  a grouped 20 % of the images, stratified by each image's rarest label (`label_folds`)
    bar       the linear heads of `train.multilabel` refitted on the other 80 %: their hold-out mAP
    start     the fine-tuned model's sigmoid head begins as the final stage's linear heads (phase 1)
    pilot     after `pilot_epochs`, fine-tuning goes on only if its best hold-out mAP beats the bar
    keep      the fine-tuned model is kept only if its best epoch's hold-out mAP beats the bar (always, with
              the keep rule off: `TrainConfig.keep_better`, which also turns the pilot off)

End to end on the images, with on-line augmentation (`light` unless the plan says `strong`); the stages
and rates are the plan's (`train.setup.set_trainable`), early stopping keeps the best epoch by hold-out
mAP. When the linear heads are kept, the backbone's weights are put back as they were, so the kept
model (which shares its layers) is the one that was validated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from finetune_cli.analysis.multilabel import best_thresholds, mean_average_precision
from finetune_cli.data.splits import content_groups
from finetune_cli.models.heads import classifier
from finetune_cli.models.inference import probabilities
from finetune_cli.models.stages import select_layer
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.engine import Callback, Diverged, EarlyStopping, Each, Group, NanGuard, PlateauDecay, \
    Trainer, fit_with_retries
from finetune_cli.train.multilabel import MultiLabelFit, fit_heads, head_probabilities, label_folds
from finetune_cli.train.setup import optimizer_for, set_trainable


def fine_tune_multilabel(ctx, plan, recipe, fitted: MultiLabelFit, settings) -> tuple[MultiLabelFit, dict]:
    """(the fit to keep, metrics["fine_tuning"]): `plan`'s fine-tuning of a multi-label run against `fitted`.

    Returns `fitted` itself when the heads win: the pilot abandoned, the keep rule against, or a divergence.
    """
    train, val = hold_out(ctx)
    y_train, y_val = labels_of(ctx, train, val)
    bar, start = linear_bar(ctx, (train, y_train), (val, y_val), fitted)
    record = {"method": "--val-dir" if not ctx.out_of_fold else "hold-out", "n_train": len(train.images),
              "n_val": len(val.images), "linear_val_map": round(bar, 4)}
    if bar >= 1 - 1e-9:
        return fitted, {**record, "kept": "linear-heads", "why": "the linear heads rank every hold-out image right"}
    backbone = ctx.backbone.model
    saved = backbone.get_weights()
    model = classifier(backbone, select_layer(backbone, None), len(ctx.classes), kernel=start[0], bias=start[1],
                       activation="sigmoid")
    try:
        state, pilot = tune(ctx, model, plan, recipe, settings, train.paths(), y_train, val.paths(), y_val, bar)
    except Diverged as exc:
        backbone.set_weights(saved)
        return fitted, {**record, "kept": "linear-heads", "why": f"fine-tuning diverged ({exc})"}
    best = float(state.best_score)
    record.update(fine_tuned_val_map=round(best, 4), best_epoch=state.best_epoch, epochs_run=state.epoch)
    if pilot.abandoned or (settings.keep_better and best <= bar):
        backbone.set_weights(saved)
        why = f"the pilot's best hold-out mAP {best:.3f} after {pilot.epochs} epochs did not beat the heads' {bar:.3f}" \
            if pilot.abandoned else f"its best hold-out mAP {best:.3f} did not beat the heads' {bar:.3f}"
        return fitted, {**record, "kept": "linear-heads", "why": why}
    probs = probabilities(model, val, ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)[0]
    thresholds = np.round(best_thresholds(y_val, probs), 6)
    kept = MultiLabelFit(model, None, fitted.C, thresholds, probs.astype(np.float32), y_val, probs >= thresholds,
                         [str(p) for p in val.paths()], fitted.candidates, state.history, None, None,
                         trained_on=frozenset(r.digest for r in train.images))
    return kept, {**record, "kept": "fine-tuned"}


def hold_out(ctx) -> tuple:
    """(train scan, hold-out scan): --val-dir's, or one grouped fold of five of the training images, stratified
    by each image's rarest label."""
    if not ctx.out_of_fold:
        return ctx.train, ctx.val
    truth = ctx.train.label_matrix(None, ctx.classes)
    train, val = label_folds(truth, content_groups(r.digest for r in ctx.train.images), 5, ctx.seed)[0]
    pick = lambda rows: dataclasses.replace(ctx.train, images=tuple(ctx.train.images[i] for i in rows))  # noqa: E731
    return pick(train), pick(val)


def labels_of(ctx, *scans) -> list[np.ndarray]:
    """The multi-hot truth (n, L) of each scan's images over the run's labels."""
    return [scan.label_matrix(None, ctx.classes) for scan in scans]


def linear_bar(ctx, train_part: tuple, val_part: tuple, fitted: MultiLabelFit) -> tuple[float, tuple]:
    """(hold-out mAP of the chosen stage's heads refitted on the train part, the final stage's heads on it: the
    fine-tuned head's start). Each part: (scan, multi-hot truth (n, L)). Features from the cache; an image
    unreadable now fails loudly."""
    (train, y_train), (val, y_val) = train_part, val_part
    layers = [fitted.layer] if fitted.layer is None else [fitted.layer, None]
    fit, held = ctx.features(train, layers), ctx.features(val, layers[:1])[0]
    if len(fit[0].records) != len(train.images) or len(held.records) != len(val.images):
        raise ValueError("an image could not be read for fine-tuning's linear bar")
    bar = mean_average_precision(y_val, head_probabilities(held.features, *fit_heads(fit[0].features, y_train,
                                                                                        fitted.C)))
    c_of = {row["stage"]: row["C"] for row in fitted.candidates}
    return bar, fit_heads(fit[-1].features, y_train, c_of[max(c_of)])


class Pilot(Callback):
    """After `epochs` epochs, stop (and mark `abandoned`) unless the best hold-out mAP so far beats `bar`."""

    def __init__(self, bar: float, epochs: int):
        self.bar, self.epochs, self.abandoned = bar, epochs, False

    def on_epoch_end(self, trainer, state, logs):
        if self.epochs and logs["epoch"] == self.epochs and state.best_score <= self.bar:
            self.abandoned, state.stop = True, True


def tune(ctx, model, plan, recipe, settings, train_paths, y_train, val_paths, y_val, bar: float):
    """Run the engine on the images: (loop state, pilot). Raises Diverged after the NaN policy's retries."""
    from finetune_cli.data.pipeline import augmenter, labelled_batches

    size = ctx.backbone.ref.image_size
    strength = plan.augmentation if plan.augmentation != "none" else "light"
    train_data = labelled_batches(train_paths, y_train, np.ones(len(y_train)), size, recipe.batch_size,
                                  shuffle_seed=ctx.seed, augment=augmenter(strength, plan.flips), config=ctx.config)
    val_data = labelled_batches(val_paths, y_val, np.ones(len(y_val)), size, recipe.batch_size, config=ctx.config)
    groups = set_trainable(model, plan)
    pilot = Pilot(bar, settings.pilot_epochs if settings.keep_better else 0)
    callbacks = [NanGuard(), EarlyStopping(recipe.patience, 1e-4, monitor="val_map"),
                 PlateauDecay(recipe.plateau_factor, recipe.patience // 2), pilot,
                 Each(lambda trainer, s, logs: ctx.reporter.on_epoch(logs, plan.epochs))]
    trainer = Trainer(model, binary_cross_entropy(model), [Group(k, v, plan.learning_rates[k]) for k, v in
                                                           groups.items()], signature(model, y_train.shape[1]),
                      optimizer=optimizer_for(recipe), callbacks=callbacks)
    ctx.reporter.on_phase(f"fine-tuning stages {list(plan.train_stages)} with binary cross-entropy "
                          f"(head lr {plan.learning_rates['head']:.2g}), against the heads' hold-out mAP {bar:.3f}")
    forward = _forward(model)

    def validate() -> dict:
        probs = np.concatenate([forward(x).numpy() for x, _, _ in val_data])
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        loss = float(-(y_val * np.log(clipped) + (1 - y_val) * np.log(1 - clipped)).mean())
        return {"val_loss": loss, "val_map": mean_average_precision(y_val, probs)}

    state = fit_with_retries(trainer, train_data, validate, plan.epochs, retries=settings.max_retries)
    return state, pilot


def binary_cross_entropy(model):
    """An engine loss: the weighted mean over (x, y (B, L) multi-hot, w) batches of the mean per-label BCE."""
    import tensorflow as tf

    keras = import_keras()

    def loss(x, y, w):
        per_image = keras.losses.binary_crossentropy(y, model(x, training=True))
        weight = tf.reduce_sum(w)
        return tf.reduce_sum(per_image * w) / tf.maximum(weight, 1e-8), weight, {}

    return loss


def signature(model, n_labels: int) -> list:
    """The engine's signature for (images float32 (B, S, S, 3), labels float32 (B, L), weights float32 (B,))."""
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    return [tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None, n_labels), tf.float32),
            tf.TensorSpec((None,), tf.float32)]


def _forward(model):
    import tensorflow as tf

    shape = tuple(model.input_shape[1:])
    return tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, *shape), tf.float32)])

