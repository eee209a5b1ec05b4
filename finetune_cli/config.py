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

#: Smallest and largest input side in pixels, for `--image-size` and for the
#: size a model file declares alike (a 30000 px input would exhaust memory).
IMAGE_SIZE_RANGE = (8, 2048)

#: Input side in pixels for a model file whose input size is free (ImageNet's usual size).
DEFAULT_IMAGE_SIZE = 224

#: Where runs, feature tables and encoders go when no --out is given (runs/NAME-N).
RUNS_DIR = Path("runs")

#: The backbone `train` and `extract-features` use when no --base is given.
DEFAULT_BASE = "efficientnet_lite0"

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

    @property
    def max_bytes(self) -> int:
        """Largest image file read: an uncompressed RGBA image at the pixel cap, plus headers."""
        return self.max_pixels * 4 + (1 << 20)

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


@dataclass(frozen=True)
class PretrainConfig:
    """Denoising-autoencoder pretraining on unlabeled images (`finetune pretrain`).

    Attributes:
        arch: `conv` (convolutional encoder/decoder) or `mlp` (dense, tied weights).
        noise: corruption strength in (0, 1): the standard deviation of Gaussian
            noise on the [0, 1] pixel scale, or the fraction of pixels zeroed
            for masking noise. 0.2 is a clear corruption that still leaves
            the content recognisable.
        noise_type: `gaussian` or `mask`.
        code_size: units of the code, the encoder's (1, 1, code) output.
        conv_filters: filters of the conv encoder's blocks; each block halves
            the resolution (S/8 after three), then a dense layer makes the code.
        mlp_hidden: units of the mlp encoder's hidden layers, before the code.
        image_size: side in pixels the images are squashed to.
        epochs: the most epochs; early stopping usually ends sooner.
        patience: epochs without held-out improvement before stopping.
        batch_size: images per step.
        learning_rate: Adam rate for new layers.
        adapt_factor: an `--init-from` encoder adapts at this fraction of
            `learning_rate`. 1/100, like intermediate stages when fine-tuning:
            at 1/10 the reconstruction pulled the ImageNet features away
            from what a classifier needs (-2.7 points on digits at k = 3).
        min_steps: an epoch is at least this many batches: a small folder is
            passed over several times per epoch, so that early stopping
            judges real progress, not two or three updates.
        holdout: fraction of the images held out for early stopping (at least 2).
        min_images: fewer usable images than this is refused.
        memory_cache_mb: decoded images are kept in memory when they fit in
            this many MB (uint8); larger folders are decoded every epoch so
            memory stays flat.
        max_holdout: held-out images are capped so the validation pass stays
            cheap on big folders.
        min_improvement: an epoch must lower the held-out loss by this
            fraction to count as better.
        n_examples: reconstruction examples shown in ENCODER.reconstructions.png.
    """

    arch: str = "conv"
    noise: float = 0.2
    noise_type: str = "gaussian"
    code_size: int = 64
    conv_filters: tuple[int, ...] = (16, 32, 64)
    mlp_hidden: tuple[int, ...] = (512, 256)
    image_size: int = 32
    epochs: int = 30
    patience: int = 4
    batch_size: int = 64
    learning_rate: float = 1e-3
    adapt_factor: float = 0.01
    min_steps: int = 20
    holdout: float = 0.1
    min_images: int = 10
    memory_cache_mb: int = 512
    max_holdout: int = 512
    min_improvement: float = 1e-3
    n_examples: int = 8


@dataclass(frozen=True)
class TrainConfig:
    """How `train` runs, beyond the recipe's hyper-parameters.

    Attributes:
        val_fraction: share of the images held out for validation (stratified)
            when no --val-dir is given.
        max_retries: after a NaN or infinite loss, retries from the starting
            weights at a tenth of every rate, this many times.
        activation_budget_mb: cached frozen-prefix activations are held in
            memory up to this many MB; above it they stream from the cache
            on disk, so memory stays flat.
        activation_dtype: `float16` (half the disk and memory, and no
            measurable change in accuracy, see the README) or `float32`.
        cache_prefix: train the top stages on cached frozen-prefix
            activations (`train.prefix`); False runs the frozen stages every
            epoch, end to end, with on-line augmentation.
        max_steps_back: how far back from a stage's end the prefix cut may
            move (single-input layers) to find a narrower tensor to cache.
    """

    val_fraction: float = 0.2
    max_retries: int = 2
    activation_budget_mb: int = 2048
    activation_dtype: str = "float16"
    cache_prefix: bool = True
    max_steps_back: int = 8


@dataclass(frozen=True)
class LinearConfig:
    """The linear head: L2-regularised logistic regression, C by grouped cross-validation.

    Attributes:
        c_grid: inverse regularisation strengths tried (features standardised).
        folds: cross-validation folds at most (fewer when a class is smaller).
        tol: L-BFGS tolerance; on standardised features tighter tolerances
            change no decision but cost seconds.
    """

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    folds: int = 3
    tol: float = 1e-3


@dataclass(frozen=True)
class SimilarityConfig:
    """How similarity to the pretraining data is measured (see `strategy.similarity`).

    Attributes:
        sample: training images probed at most (stratified).
        margin: an earlier stage must probe this much better (0-1) than the
            final one for the data to count as `different`.
        low_confidence: below this mean top-1 probability of the pretrained
            classifier, a tied probe counts as `different`.
    """

    sample: int = 200
    margin: float = 0.03
    low_confidence: float = 0.15


def default_cache_dir() -> Path:
    """The feature cache folder: $FINETUNE_CACHE_DIR, else the user cache dir."""
    env = os.environ.get("FINETUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune" / "features"


def default_models_dir() -> Path:
    """Where converted backbones (the embedded default's `.keras` files) live: $FINETUNE_MODELS_DIR, else
    the user cache dir."""
    env = os.environ.get("FINETUNE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune" / "backbones"


SCAN = ScanConfig()
FEATURES = FeatureConfig()
PRETRAIN = PretrainConfig()
TRAIN = TrainConfig()
LINEAR = LinearConfig()
SIMILARITY = SimilarityConfig()
