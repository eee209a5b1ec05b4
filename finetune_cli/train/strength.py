"""How strong on-line augmentation may be, read off the phase-1 linear head before fine-tuning end to end.

`full` trains every stage on images augmented on-line (`data.pipeline.augmenter`:
light = flip and shifts; strong = also zoom, rotation, contrast). Where the
images are like ImageNet's, its features barely move under such changes. Where
they are not (digits drawn at 64 px), the same augmentation turns each image
into one the network sees as something else, and fine-tuning spends its
epochs learning that invariance: on scikit-learn's digits the `full` recipe's
strong augmentation left the model at 29.5 % on validation after the 2-epoch
pilot, and 79.1 % after 8 epochs, against 94.1 % without augmentation.

The check is cheap and runs before fine-tuning is paid for, like the flip
check (`train.flips`): the linear head (fitted on final features of the images
as they are) scores up to `images` validation images as they are and through
one seeded draw of the plan's augmentation (one more backbone pass each; the
images as they are come from the feature cache, where phase 1 put them). When
it loses `max_loss` or more of its accuracy, the next weaker level is tried
(strong, then light), and the plan trains with the strongest level that keeps
the loss under the limit, or none.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LEVELS = ("strong", "light", "none")


def strength_check(ctx, head, strength: str, flips: bool, images: int, max_loss: float) -> dict:
    """{"accuracy", "augmented": {level: accuracy}, "augmentation", "n_images", "max_loss", "note"}.

    Args:
        ctx: the run's `train.context.Context` (its validation images are scored).
        head: the phase-1 `train.linear.LinearHead` on final features.
        strength: the plan's augmentation, one of `LEVELS`; `flips`: whether it flips (`train.flips`).
        images: at most this many validation images (each class in turn), >= 1.
        max_loss: accuracy (0-1) the augmented images may lose against the images as they are.
    """
    from finetune_cli.data.pipeline import augmenter
    from finetune_cli.train.flips import spread

    scan = dataclasses.replace(ctx.val, images=spread(ctx.val.images, images), skipped=())
    pixels, ok = _pixels(ctx, scan)
    if not ok.any():
        return {"accuracy": None, "augmented": {}, "augmentation": strength, "n_images": 0, "max_loss": max_loss,
                "note": f"augmentation check skipped: no validation image decoded; kept {strength}"}
    labels = ctx.labels(scan.images)[ok]
    score = _scorer(ctx, head, labels)
    plain, tried, chosen = _plain(ctx, head, scan, ok), {}, "none"
    for level in LEVELS[LEVELS.index(strength):-1]:
        tried[level] = score(pixels, augmenter(level, flips))
        if plain - tried[level] < max_loss:
            chosen = level
            break
    shown = ", ".join(f"{level} {accuracy:.1%}" for level, accuracy in tried.items())
    verdict = (f"kept {strength}" if chosen == strength else
               f"trains with {chosen} augmentation instead of {strength}: the {strength} kind changes what the "
               "network sees in these images, and fine-tuning would spend its epochs undoing it")
    note = (f"augmentation check on {len(labels)} validation images: the linear head scores {plain:.1%} on them "
            f"as they are, augmented: {shown} (the limit a loss of {max_loss:.0%}); {verdict}")
    return {"accuracy": plain, "augmented": tried, "augmentation": chosen, "n_images": int(len(labels)),
            "max_loss": max_loss, "note": note}


def _pixels(ctx, scan) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (m, S, S, 3) in 0-255, ok bool (n,)): `scan`'s images decoded at the backbone's size, those
    that decode (`ok`) alone."""
    from finetune_cli.data.pipeline import decode_dataset

    decoded = [(image.numpy(), bool(ok)) for image, ok in decode_dataset(scan.paths(), ctx.backbone.ref.image_size,
                                                                       ctx.config)]
    ok = np.array([good for _, good in decoded], dtype=bool)
    return np.array([image for image, good in decoded if good], dtype="float32"), ok


def _plain(ctx, head, scan, ok: np.ndarray) -> float:
    """The head's accuracy (0-1) on `scan`'s images that decoded (`ok`), as they are: their final features from
    the feature cache (phase 1 computed them for every validation image), no backbone pass."""
    kept = dataclasses.replace(scan, images=tuple(image for image, good in zip(scan.images, ok) if good))
    table = ctx.features(kept, [None], 0)[0]
    return float((head.probabilities(table.features).argmax(1) == ctx.labels(table.records)).mean())


def _scorer(ctx, head, labels: np.ndarray):
    """(pixels, augmenter layer) -> the head's accuracy (0-1) on the backbone's pooled final features,
    each augmented draw seeded by the run's seed (the same draw for every level's images)."""
    import tensorflow as tf

    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    backbone = ctx.backbone.model
    pooled = keras.layers.GlobalAveragePooling2D()(backbone.get_layer(backbone.layers[-1].name).output)
    features = keras.Model(backbone.input, pooled)
    forward = tf.function(lambda x: features(x, training=False))

    def score(pixels: np.ndarray, layer) -> float:
        tf.random.set_seed(ctx.seed)
        out = []
        for start in range(0, len(pixels), ctx.batch_size):
            x = tf.constant(pixels[start:start + ctx.batch_size])
            out.append(forward(layer(x, training=True)).numpy())
        return float((head.probabilities(np.concatenate(out)).argmax(1) == labels).mean())

    return score


def needs_check(plan, cut) -> bool:
    """Whether the plan trains end to end (no cached prefix) with on-line augmentation."""
    return cut is None and plan.augmentation in LEVELS[:-1]
