"""What the steps of a training run share, and what fitting returns.

`Context` is built once by `tasks.train.prepare` and read by every later step;
`TrainResult` is what both fitting paths (linear head, fine-tuning) return,
and what `runs.write.write_run` writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from finetune_cli.config import ScanConfig
from finetune_cli.data.scan import Scan
from finetune_cli.data.splits import content_groups, distinct_per_class, grouped_split, overlap
from finetune_cli.errors import FolderError
from finetune_cli.features import FeatureCache, extract_many
from finetune_cli.models.backbones import Backbone
from finetune_cli.progress import Reporter
from finetune_cli.runs.folder import RunFolder
from finetune_cli.strategy.decide import Plan


@dataclass
class Context:
    """The run's folder, data, backbone and cache.

    Attributes:
        scan: the whole labelled training folder; `train` and `val` its split
            (or `val` from --val-dir).
        cache: the feature cache, or None with --no-cache.
        out_of_fold: `train` and `val` are both the whole folder, and the run is
            validated on out-of-fold probabilities (`all_labels`).
    """

    run: RunFolder | None
    scan: Scan
    train: Scan
    val: Scan
    backbone: Backbone
    cache: FeatureCache | None
    config: ScanConfig
    reporter: Reporter
    seed: int
    batch_size: int = 32
    out_of_fold: bool = False

    @property
    def classes(self) -> list[str]:
        return list(self.scan.classes)

    def labels(self, records) -> np.ndarray:
        """Class indices (n,) int of image records, in `classes` order."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[r.label] for r in records], dtype=np.int64)

    def features(self, scan: Scan, layers, view: int = 0, **options):
        """Feature tables of `scan` for `layers` (see `features.extract_many`), cached."""
        return extract_many(scan, self.backbone.ref, layers=layers, view=view, cache=self.cache,
                            batch_size=self.batch_size, config=self.config, backbone=self.backbone,
                            progress=self.reporter.on_progress, note=self.note_once, **options)

    def note_once(self, text: str) -> None:
        """`reporter.on_note`, each text once per run (a lowered batch is said once, not per pass)."""
        said = self.__dict__.setdefault("_said", set())
        if text not in said:
            said.add(text)
            self.reporter.on_note(text)


#: score(scan) -> (probabilities (n, k), ok (n,)) for scan.images, through the trained model's math.
Score = Callable[[Scan], tuple]


@dataclass
class TrainResult:
    """What fitting a plan produced.

    Attributes:
        model: raw RGB (B, S, S, 3) in [0, 255] -> probabilities (B, k).
        plan: the plan as run (rates lowered after a divergence).
        history: per epoch (fine-tuning) or per C (linear head).
        val_probs: (n_val, k) validation probabilities; val_labels: (n_val,).
        metrics: what the path adds to metrics.json (train_accuracy, C or best_epoch).
        notes: lines for the user.
        score: see `Score`, for a --test-dir.
        calibration: the temperature scaling fitted after training (`train.calibrate`), a
            `calibration.Calibration`; None when calibration is off.
    """

    model: object
    plan: Plan
    history: list
    val_probs: np.ndarray
    val_labels: np.ndarray
    metrics: dict
    score: Score
    notes: list = field(default_factory=list)
    calibration: object = None


def split(scan: Scan, val_scan: Scan | None, fraction: float, seed: int = 0) -> tuple[Scan, Scan]:
    """(train, validation) scans: --val-dir's, or a content-grouped stratified seeded split of `fraction`.

    Identical files stay on one side (`data.splits.grouped_split`); see
    `split_scan` for what the split grouped and which classes it could not validate.

    Raises:
        FolderError: the validation folder's classes differ from the training folder's.
    """
    train, val, _ = split_scan(scan, val_scan, fraction, seed)
    return train, val


def split_scan(scan: Scan, val_scan: Scan | None, fraction: float, seed: int = 0):
    """(train scan, validation scan, `data.splits.SplitResult` or None for a --val-dir).

    Raises:
        FolderError: the validation folder's classes differ from the training folder's.
    """
    if val_scan is not None:
        if set(val_scan.classes) != set(scan.classes):
            raise FolderError(
                f"validation classes {sorted(val_scan.classes)} differ from training classes "
                f"{sorted(scan.classes)}: the --val-dir must hold the same class folders"
            )
        return scan, dataclasses.replace(val_scan, classes=scan.classes), None
    labels = np.array(scan.label_indices())
    result = grouped_split(labels, content_groups(r.digest for r in scan.images), fraction, seed)
    pick = lambda idx: dataclasses.replace(scan, images=tuple(scan.images[i] for i in idx))
    return pick(result.train), pick(result.val), result


def all_labels(ctx: Context, plan: Plan, held_out_given: bool, ensemble: int = 1) -> Context:
    """The context a plan trains in: for a single linear head with no --val-dir, every labelled image.

    A linear head needs no early stopping, so the hold-out has no job that
    cross-validation cannot do: C (and the features) are chosen by grouped
    k-fold CV on all images, the head is refitted on all of them, and the
    out-of-fold probabilities validate and calibrate it. Fine-tuning plans
    and ensembles keep the hold-out (early stopping, the keep rule, members'
    weights need it); so does a class with fewer than two distinct images.
    """
    if plan.strategy != "linear" or held_out_given or ensemble > 1 or ctx.out_of_fold:
        return ctx
    labels = np.array(ctx.scan.label_indices())
    per_class = distinct_per_class(labels, content_groups(r.digest for r in ctx.scan.images))
    if per_class.min() < 2:
        return ctx
    ctx.reporter.on_note(f"validation: out-of-fold, by cross-validation on all {len(labels)} labelled images "
                         "(a linear head needs no hold-out); the head is refitted on all of them")
    return dataclasses.replace(ctx, train=ctx.scan, val=ctx.scan, out_of_fold=True)


def every_image(ctx: Context) -> Context:
    """`ctx` with the held-out images trained on too: `train` holds `train` and `val` (sorted by path), `val`
    stays as it was (its predictions are the held-out run's, `train.finetune.refit_fine_tuned`)."""
    images = tuple(sorted({r.path: r for r in ctx.train.images + ctx.val.images}.values(), key=lambda r: r.path))
    return dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, images=images))


def split_notes(scan: Scan, result) -> list[str]:
    """Lines for the user about a split (`split_scan`'s result): duplicates grouped, classes not validated."""
    if result is None:
        return []
    notes = []
    if result.n_duplicates:
        notes.append(f"{result.n_duplicates} duplicate file(s) (identical content) in {result.n_groups} group(s): "
                     "each group stays on one side of the split, so no validation image has a copy in training")
    for index in result.unvalidated:
        notes.append(f"class '{scan.classes[index]}' has only one distinct image: it cannot be validated "
                     "(it trains, and the validation scores and calibration leave it out); add images to it")
    return notes


def without_overlap(train: Scan, other: Scan, option: str, drop: bool, reporter: Reporter | None = None) -> Scan:
    """`other` (a --val-dir or --test-dir scan) checked against the training images by content.

    Args:
        drop: False refuses any overlap; True drops the overlapping images from `other` and says so.

    Raises:
        FolderError: images of `other` are also training images (same content) and `drop` is False,
            or every image of `other` is.
    """
    shared = overlap(other.images, train.images)
    if not shared:
        return other
    where = "is the training folder" if len(shared) == len(other.images) else "overlaps the training images"
    if not drop:
        raise FolderError(f"{option} {other.root} {where}: {len(shared)} of its {len(other.images)} images have "
                          f"an identical copy among the training images (e.g. '{shared[0].path}'), so its scores "
                          f"would be inflated; give a separate folder, or pass --drop-overlap to leave them out")
    if len(shared) == len(other.images):
        raise FolderError(f"{option} {other.root} {where}: all {len(shared)} of its images are training images; "
                          "give a separate folder")
    digests = {r.digest for r in shared}
    if reporter is not None:
        reporter.on_note(f"{option}: left out {len(shared)} of {len(other.images)} images that are also training "
                         f"images (same content), e.g. '{shared[0].path}'")
    return dataclasses.replace(other, images=tuple(r for r in other.images if r.digest not in digests))


def class_weights(labels: np.ndarray, n_classes: int, balanced: bool) -> np.ndarray:
    """Per-class weight (k,): n / (k * n_c) when balanced, else ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if not balanced:
        return np.ones(n_classes)
    return len(labels) / (n_classes * np.maximum(counts, 1))
