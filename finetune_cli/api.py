"""The library API: every command of the CLI is one function here.

Functions take plain arguments, return data, and never print. Progress is
reported through optional callbacks. Errors are `finetune_cli.errors` types.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune_cli.config import FEATURES, SCAN, ScanConfig
from finetune_cli.data.profile import Profile, profile_scan
from finetune_cli.data.scan import Progress, scan_folder


def inspect(
    root: str | os.PathLike,
    *,
    config: ScanConfig = SCAN,
    progress: Progress | None = None,
) -> Profile:
    """Scan and profile a class-per-subfolder image folder.

    Returns:
        A `Profile`; `profile.to_dict()` is the `inspect --json` contract.

    Raises:
        FolderError: the folder is unusable (see `scan_folder`).
    """
    return profile_scan(scan_folder(root, labelled=True, config=config, progress=progress), config)


def plan(root: str | os.PathLike, base: str, **options):
    """What `train` would do with `base`: (Profile, Similarity, Plan); see `train.run.plan_for`."""
    from finetune_cli.train.run import plan_for

    return plan_for(root, base, **options)


def bases() -> list[dict]:
    """The backbone registry: name, input size, parameters (millions), feature dim."""
    from finetune_cli.models import registry

    return [
        {
            "name": s.name,
            "input_size": s.input_size,
            "params_m": s.params_m,
            "feature_dim": s.feature_dim,
            "preprocess": s.preprocess,
        }
        for s in map(registry.get, registry.names())
    ]


def layers(base: str, *, weights: str = "none", image_size: int | None = None) -> list[dict]:
    """Stage outputs of a backbone: index, layer name, output shape (h, w, c).

    Weights default to `none`: the architecture alone decides the stages.
    """
    from finetune_cli.models.backbones import build, resolve
    from finetune_cli.models.stages import find_stages

    backbone = build(resolve(base, weights, image_size))
    return [
        {"stage": s.index, "name": s.name, "shape": list(s.shape)}
        for s in find_stages(backbone.model)
    ]


def extract_features(
    root: str | os.PathLike,
    base: str,
    *,
    out: str | os.PathLike | None = None,
    weights: str = "imagenet",
    layer: str | int | None = None,
    pooling: str = FEATURES.pooling,
    image_size: int | None = FEATURES.image_size,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    config: ScanConfig = SCAN,
    progress: Progress | None = None,
    scan_progress: Progress | None = None,
):
    """Frozen features for every usable image under `root` (labelled or flat).

    Args:
        out: if given, the table is written there (.parquet, .csv or .npz).
        layer: None (final), a stage index, or a layer name.

    Returns:
        (FeatureTable, Scan).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError.
    """
    from finetune_cli.features import FeatureCache, check_table_path, extract, write_table
    from finetune_cli.models.backbones import resolve

    if out is not None:
        out = check_table_path(Path(out))
    ref = resolve(base, weights, image_size, FEATURES.init_seed)
    scan = scan_folder(root, labelled=None, config=config, progress=scan_progress)
    cache = FeatureCache.at(cache_dir) if use_cache else None
    table = extract(scan, ref, layer=layer, pooling=pooling, batch_size=batch_size, cache=cache,
                    config=config, progress=progress)
    if out is not None:
        write_table(table, out)
    return table, scan


def cache_info(cache_dir: str | os.PathLike | None = None) -> dict:
    """What the feature cache holds (see `FeatureCache.info`)."""
    from finetune_cli.features import FeatureCache

    return FeatureCache.at(cache_dir).info()


def cache_clear(cache_dir: str | os.PathLike | None = None) -> int:
    """Empty the feature cache; returns the number of entries removed."""
    from finetune_cli.features import FeatureCache

    return FeatureCache.at(cache_dir).clear()


def train(root, base: str, *, out, **options) -> dict:
    """Inspect, decide, train and write a run folder; see `train.run.train` for options.

    Returns:
        The run's metrics (also written to `out/metrics.json`).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError,
        OutputError, TrainingError.
    """
    from finetune_cli.train.run import train as run_training

    return run_training(root, base, out=out, **options)


def predict(inputs, model, *, top_k: int = 1):
    """(frame of predictions, skipped files) for image files and folders; see `predict.predict`."""
    from finetune_cli import predict as predicting

    return predicting.predict(inputs, model, top_k=top_k)


def evaluate(root, model) -> dict:
    """Accuracy, per-class metrics and confusion matrix of a run on a labelled folder."""
    from finetune_cli import predict as predicting

    return predicting.evaluate(root, model)
