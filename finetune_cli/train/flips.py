"""Whether a horizontal flip keeps an image's class, read off the phase-1 linear head before fine-tuning.

Flips are the first augmentation every recipe uses (on-line `light`/`strong`,
and every odd cached view). On photos they keep the class; on digits, letters,
arrows or left/right classes they do not, and fine-tuning on flipped copies
then teaches the network wrong labels.

The check is cheap and runs before fine-tuning is paid for: the linear head
(fitted on unflipped final features) scores up to `images` validation images
twice, as they are and mirrored (`data.pipeline.MIRROR`: one more backbone
pass over them). ImageNet features are nearly invariant to flips where flips
keep the class, so a head that loses `max_loss` or more of its accuracy on
the mirror images says the flip changes what the images show, and the plan
trains without flips (`Plan.flips`).
"""

from __future__ import annotations

import dataclasses


def flip_check(ctx, head, images: int, max_loss: float) -> dict:
    """{"accuracy", "accuracy_mirrored", "loss", "n_images", "max_loss", "flips", "note"}.

    Args:
        ctx: the run's `train.context.Context` (its validation images are scored).
        head: the phase-1 `train.linear.LinearHead` on final features.
        images: at most this many validation images (the first of each class in turn), >= 1.
        max_loss: accuracy (0-1) the mirror images may lose against the images as they are; at or above
            it flips are off ("flips": False).
    """
    from finetune_cli.data.pipeline import MIRROR  # TensorFlow: only once fine-tuning is under way

    scan = dataclasses.replace(ctx.val, images=spread(ctx.val.images, images), skipped=())
    scores = {}
    for name, view in (("accuracy", 0), ("accuracy_mirrored", MIRROR)):
        table = ctx.features(scan, [None], view)[0]
        scores[name] = float((head.probabilities(table.features).argmax(1) == ctx.labels(table.records)).mean())
    loss = scores["accuracy"] - scores["accuracy_mirrored"]
    flips = bool(loss < max_loss)
    verdict = ("flips kept" if flips else
               "flips turned off: a flipped image is not the same class here, so fine-tuning trains without them")
    note = (f"flip check on {len(scan.images)} validation images: the linear head scores {scores['accuracy']:.1%} "
            f"on them and {scores['accuracy_mirrored']:.1%} on their mirror images (a loss of {loss:.1%}, the limit "
            f"{max_loss:.0%}); " + verdict)
    return {**scores, "loss": loss, "n_images": len(scan.images), "max_loss": max_loss, "flips": flips,
            "note": note}


def view_ids(views: int, flips: bool = True) -> list[int]:
    """The cached view numbers a plan uses: 0 (the image), then `views` augmented ones: 1..views, or without
    flips (`Plan.flips` off) the even, crop-only views 2, 4, .., 2 * views (`augmented_view` flips odd ones)."""
    return [0] + [v if flips else 2 * v for v in range(1, views + 1)]


def spread(records, n: int) -> tuple:
    """Up to n of `records`, taking each class in turn, so a capped sample keeps every class."""
    by_class: dict[str, list] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    queues = list(by_class.values())
    picked = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return tuple(sorted(picked[:n], key=lambda r: r.path))


def needs_check(plan, cut) -> bool:
    """Whether the plan's training would see flips: on-line augmentation end to end, or cached views."""
    return plan.flips and ((cut is None and plan.augmentation != "none") or (cut is not None and plan.feature_views))

