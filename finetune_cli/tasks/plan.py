"""`finetune plan DIR`: what `train` would decide, without training: (profile, similarity, plan).
"""

from __future__ import annotations

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import scan_folder
from finetune_cli.features import FeatureCache
from finetune_cli.models.backbones import build, resolve
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.train.context import Context
from finetune_cli.train.session import choose


def plan(
    root, base: str, *, weights: str = "imagenet", image_size: int | None = None, similarity: str = "auto",
    strategy: str = "auto", recipe: str | None = None, seed: int = 0, cache_dir=None, use_cache: bool = True,
    config: ScanConfig = SCAN, reporter: Reporter = QUIET,
):
    """What `train` would do with `base`, without training: (Profile, Similarity, Plan).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError.
    """
    scan = scan_folder(root, labelled=True, config=config)
    profile = profile_scan(scan, config)
    backbone = build(resolve(base, weights, image_size, seed))
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    ctx = Context(None, scan, scan, scan, backbone, cache, config, reporter, seed)
    evidence, plan, _, _ = choose(ctx, profile, similarity, strategy, recipe)
    return profile, evidence, plan
