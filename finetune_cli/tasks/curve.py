"""`finetune curve`: would more labels help this folder? The learning curve of a linear head, before any run.

Steps: scan DIR; final-stage features through the feature cache and the
linear head `train` fits on them (`train.linear.folder_head`); that head's
learning curve and label forecast (`train.curve.learning_curve`, method
there and in `analysis.curve`). It is what `train` records for a linear plan
on final features; a run whose plan reads other features (or fine-tunes)
records its own in metrics.json.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.config import CURVE, FEATURES, SCAN, CurveConfig, ScanConfig
from finetune_cli.data.scan import scan_folder
from finetune_cli.data.splits import content_groups
from finetune_cli.features import FeatureCache
from finetune_cli.files import shown
from finetune_cli.models.backbones import resolve
from finetune_cli.train.curve import learning_curve
from finetune_cli.train.linear import folder_head


def curve(root, base: str, *, weights: str = "imagenet", image_size: int | None = None,
          batch_size: int = FEATURES.batch_size, cache_dir=None, use_cache: bool = True, seed: int = 0,
          config: ScanConfig = SCAN, settings: CurveConfig = CURVE, progress=None) -> dict:
    """The learning curve and label forecast of a linear head on `base`'s final features of DIR.

    Returns (the `curve --json` contract): {"folder", "base", "n_images", "skipped": [{"path", "reason"}],
    then the `learning_curve` record: "model", "C", "points", "fit", "forecast", "per_class", "limiting_class",
    "gain_if_doubled", "verdict" (rising, flat, uncertain or too few), "message", "seconds"}.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError.
    """
    scan = scan_folder(root, labelled=True, config=config)
    ref = resolve(base, weights, image_size)
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    table, labels, head, balanced = folder_head(scan, ref, cache=cache, batch_size=batch_size, config=config,
                                                seed=seed, progress=progress)
    record = learning_curve(table.features, labels, list(scan.classes), head.C, seed=seed, config=settings,
                            groups=content_groups(r.digest for r in table.records),
                            balanced=balanced)
    skipped = [{"path": shown(s.path), "reason": s.reason} for s in (*scan.skipped, *table.skipped)]
    return {"folder": str(Path(root).absolute()), "base": ref.label, "n_images": len(labels), "skipped": skipped,
            **record}
