"""Every default of the tool, once, as documented frozen dataclasses.

The CLI reads its option defaults from here and recipes override training
hyper-parameters; nothing else holds a default of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Image file endings considered when deciding whether loose root files are images.
#: Decoding itself is always by content, never by name.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

#: Names that are never images and never counted: OS and tool litter.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX", ".ipynb_checkpoints"})


@dataclass(frozen=True)
class ScanConfig:
    """How a folder is read.

    Attributes:
        max_pixels: decoded-size cap (width * height) guarding against
            decompression bombs; larger images are skipped with a reason.
            64 M pixels is 8000 x 8000, above any phone camera's 50 MP.
        background: RGB colour, each 0-255, that transparent pixels (RGBA, LA,
            palette with tRNS) are composited onto. White, like a page.
        workers: threads decoding in parallel (Pillow releases the GIL while
            decoding); 0 means "as many as the CPU has, at most 8".
        small_max_per_class: a dataset whose median images per class is below
            this is `small`, otherwise `large`. 100 per class is roughly where
            fine-tuning upper layers starts to beat a linear probe.
        min_per_class: fewer usable images than this in a class is refused;
            two is the least a stratified split can divide.
        imbalance_warn_ratio: largest class / smallest class at or above which
            `inspect` warns and training uses class weights.
    """

    max_pixels: int = 64_000_000
    background: tuple[int, int, int] = (255, 255, 255)
    workers: int = 0
    small_max_per_class: int = 100
    min_per_class: int = 2
    imbalance_warn_ratio: float = 3.0

    def n_workers(self) -> int:
        """The number of decode threads to use, >= 1."""
        return self.workers or min(8, (os.cpu_count() or 1) * 2)


@dataclass(frozen=True)
class FeatureConfig:
    """How features are extracted and cached.

    Attributes:
        batch_size: images per forward pass (1-1024).
        pooling: `avg` or `max`, applied to a 4-D feature map.
        image_size: side in pixels the images are resized to (squashed, the
            aspect ratio is not kept, as Keras' `image_dataset_from_directory`
            does); None means the backbone's native size.
        init_seed: seed for `--weights none`, so a fresh initialisation is
            reproducible and its features can be cached.
    """

    batch_size: int = 32
    pooling: str = "avg"
    image_size: int | None = None
    init_seed: int = 0


def default_cache_dir() -> Path:
    """The feature cache folder: $FINETUNE_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("FINETUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune" / "features"


SCAN = ScanConfig()
FEATURES = FeatureConfig()
