"""Dataset profile: statistics and warnings computed from a `Scan`. No TensorFlow."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import pandas as pd

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.scan import Scan
from finetune_cli.files import shown


@dataclass(frozen=True)
class Profile:
    """What `inspect` reports and `decide` plans from.

    Attributes:
        scan: the scan this profile describes.
        frame: one row per usable image (columns of `ImageRecord`).
        class_counts: usable images per class, in class order.
        duplicates: groups (>= 2 paths) of byte-identical files.
        warnings: one line each, for the user.
        size_category: `small` or `large` (see `ScanConfig.small_max_per_class`), from the
            median number of distinct images (by content) per class: copies add nothing.
        imbalance: largest class count / smallest (1.0 when balanced).
    """

    scan: Scan
    frame: pd.DataFrame
    class_counts: dict[str, int]
    duplicates: list[list[str]]
    warnings: list[str]
    size_category: str
    imbalance: float

    @property
    def n_images(self) -> int:
        return len(self.frame)

    def to_dict(self) -> dict:
        """The JSON contract of `finetune inspect --json` (paths relative, '/'-separated)."""
        frame = self.frame
        return {
            "root": str(self.scan.root),
            "n_images": self.n_images,
            "n_classes": len(self.class_counts),
            "multi_label": self.scan.multi_label,  # then a class's count and share are of the images carrying it
            "classes": [
                {"name": name, "count": count, "share": round(count / max(self.n_images, 1), 4)}
                for name, count in self.class_counts.items()
            ],
            "skipped": [{"path": shown(s.path), "reason": shown(s.reason)} for s in self.scan.skipped],
            "duplicates": self.duplicates,
            "warnings": self.warnings,
            "size_category": self.size_category,
            "imbalance": round(self.imbalance, 3),
            "formats": dict(Counter(frame["format"])),
            "modes": dict(Counter(frame["mode"])),
            "image_size": {
                key: {s: int(getattr(frame[key], s)()) for s in ("min", "median", "max")}
                for key in ("width", "height")
            },
        }


def profile_scan(scan: Scan, config: ScanConfig = SCAN) -> Profile:
    """Compute a `Profile` from a `Scan` (labelled or not)."""
    frame = pd.DataFrame([{**r.__dict__, "path": shown(r.path)} for r in scan.images])
    counts = dict(zip(scan.classes, scan.label_matrix().sum(0).astype(int).tolist())) if scan.labelled else {}
    warnings = list(scan.warnings)
    duplicates = _duplicate_groups(scan, warnings)
    imbalance = max(counts.values()) / min(counts.values()) if counts else 1.0
    if imbalance >= config.imbalance_warn_ratio and not scan.multi_label:
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        warnings.append(
            f"classes are imbalanced: '{big}' has {counts[big]} images, '{small}' "
            f"{counts[small]} ({imbalance:.1f}x); training weights classes to compensate and chooses by macro-F1 "
            "(the linear head's C, the best epoch, fine-tuned vs linear head, tune's objective)"
        )
    if scan.skipped:
        warnings.append(f"{len(scan.skipped)} file(s) could not be used and were skipped")
    distinct = {name: len({r.digest for r in scan.images if name in scan.label_set(r.label)}) for name in scan.classes}
    per_class = pd.Series(list(distinct.values()) or [len({r.digest for r in scan.images})]).median()
    category = "small" if per_class < config.small_max_per_class else "large"
    return Profile(scan, frame, counts, duplicates, warnings, category, float(imbalance))


def _duplicate_groups(scan: Scan, warnings: list[str]) -> list[list[str]]:
    """Groups of byte-identical files; appends a warning per group."""
    by_digest: dict[str, list] = defaultdict(list)
    for record in scan.images:
        by_digest[record.digest].append(record)
    groups = []
    for records in by_digest.values():
        if len(records) < 2:
            continue
        paths = [shown(r.path) for r in records]
        groups.append(paths)
        labels = sorted({r.label for r in records})
        if len(labels) > 1:
            warnings.append(
                f"label conflict: identical files in classes {', '.join(labels)}: "
                + ", ".join(paths)
            )
        else:
            warnings.append("duplicate files: " + ", ".join(paths))
    return groups
