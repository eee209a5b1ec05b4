"""`finetune extract-features DIR`: frozen features for every image, as a table.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from finetune_cli.config import FEATURES, SCALE, SCAN, ScanConfig
from finetune_cli.data.scan import Progress, scan_folder
from finetune_cli.errors import SettingsError
from finetune_cli.features import FeatureCache, check_table_path, extract, write_table
from finetune_cli.models.backbones import resolve
from finetune_cli.scale.backend import ray_requested


def extract_features(
    root: str | os.PathLike,
    base: str,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
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
    engine: str = SCALE.engine,
    address: str | None = None,
    workers: int = SCALE.workers,
):
    """Frozen features for every usable image under `root` (labelled or flat).

    Args:
        out: if given, the table is written there (.parquet, .csv or .npz);
            checked before any work, and an existing file is refused unless
            `overwrite`. With engine `ray`: a folder (or URI) for Parquet shards + manifest.json.
        layer: None (final), a stage index, or a layer name.
        engine: `local`, or `ray` (`scale.ray_data`: model actors on the cluster at `address`, or on a
            Ray started here; `workers` actors, 0: one per CPU; `root` may also be a list file or URI).

    Returns:
        (FeatureTable, Scan); with engine `ray`, (manifest dict, skipped files).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError, SettingsError (engine).
    """
    if ray_requested(engine, address):
        from finetune_cli.scale import ray_data

        if out is None:
            raise SettingsError("--engine ray writes Parquet shards: give --out FOLDER (or a URI)")
        settings = dataclasses.replace(SCALE, workers=workers, batch_size=batch_size)
        return ray_data.extract_features(root, resolve(base, weights, image_size, FEATURES.init_seed), out=str(out),
                                           overwrite=overwrite, layer=layer, pooling=pooling, address=address,
                                           settings=settings, config=config, progress=progress)
    if out is not None:
        out = check_table_path(Path(out), overwrite)
    ref = resolve(base, weights, image_size, FEATURES.init_seed)
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    scan = scan_folder(root, labelled=None, config=config, progress=scan_progress, for_training=False,
                       multi_label=True)  # a multi-label table's label column keeps each image's set
    table = extract(scan, ref, layer=layer, pooling=pooling, batch_size=batch_size, cache=cache,
                    config=config, progress=progress)
    if out is not None:
        write_table(table, out)
    return table, scan
