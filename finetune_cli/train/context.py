"""What the steps of a training run share, and what fitting returns.

`Context` is built once by `train.run.prepare` and read by every later step;
`TrainResult` is what both fitting paths (linear head, fine-tuning) return,
and what `artifacts.write_run` writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from finetune_cli.artifacts import RunFolder
from finetune_cli.config import ScanConfig
from finetune_cli.data.scan import Scan
from finetune_cli.errors import FolderError
from finetune_cli.features import FeatureCache, extract_many
from finetune_cli.models.backbones import Backbone
from finetune_cli.reporter import Reporter
from finetune_cli.strategy.decide import Plan


@dataclass
class Context:
    """The run's folder, data, backbone and cache.

    Attributes:
        scan: the whole labelled training folder; `train` and `val` its split
            (or `val` from --val-dir).
        cache: the feature cache, or None with --no-cache.
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
                            progress=self.reporter.on_progress, **options)


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
    """(train, validation) scans: --val-dir's, or a stratified seeded split of `fraction`.

    Raises:
        FolderError: the validation folder's classes differ from the training folder's.
    """
    if val_scan is not None:
        if set(val_scan.classes) != set(scan.classes):
            raise FolderError(
                f"validation classes {sorted(val_scan.classes)} differ from training classes "
                f"{sorted(scan.classes)}: the --val-dir must hold the same class folders"
            )
        return scan, dataclasses.replace(val_scan, classes=scan.classes)
    from sklearn.model_selection import train_test_split

    labels = np.array(scan.label_indices())
    n_val = max(len(scan.classes), int(round(len(labels) * fraction)))
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=labels, random_state=seed)
    pick = lambda idx: dataclasses.replace(scan, images=tuple(scan.images[i] for i in sorted(idx)))
    return pick(train_idx), pick(val_idx)


def class_weights(labels: np.ndarray, n_classes: int, balanced: bool) -> np.ndarray:
    """Per-class weight (k,): n / (k * n_c) when balanced, else ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    if not balanced:
        return np.ones(n_classes)
    return len(labels) / (n_classes * np.maximum(counts, 1))
