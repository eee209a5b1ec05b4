"""`finetune cache info|clear`: the on-disk feature cache.
"""

from __future__ import annotations

import os

from finetune_cli.features import FeatureCache


def cache_info(cache_dir: str | os.PathLike | None = None) -> dict:
    """What the feature cache holds (see `FeatureCache.info`)."""
    return FeatureCache.at(cache_dir).info()


def cache_clear(cache_dir: str | os.PathLike | None = None) -> int:
    """Empty the feature cache; returns the number of entries removed.

    Only a folder marked as a feature cache is touched, and in it only the
    entries the cache wrote.

    Raises:
        OutputError: the folder is not a feature cache.
    """
    return FeatureCache.at(cache_dir).clear()
