"""Every default of the tool, once, as documented frozen dataclasses.

The CLI reads its option defaults from here and recipes override training
hyper-parameters; nothing else holds a default of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from finetune_cli.errors import SettingsError

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

#: The file every output folder of the tool carries (and the default runs/ root too):
#: scans skip a folder that holds it, so the tool never reads its own output as data.
OUTPUT_MARKER = ".finetune-output"

#: The backbone `train` and `extract-features` use when no --base is given.
DEFAULT_BASE = "efficientnet_lite0"

#: Names that are never images and never counted: OS and tool litter.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX", ".ipynb_checkpoints"})

#: Largest JSON file of the tool's own (labels.json, plan.json, metrics.json, state.json, tune.json,
#: manifest.json, a cache's meta.json) that is read; a larger one is refused before parsing. These
#: files are kilobytes; 64 MB is a margin of thousands, and keeps a crafted file from filling memory.
JSON_MAX_BYTES = 64 << 20

#: Largest JSON member (config.json, metadata.json, finetune.json) of a `.keras` archive, by its
#: declared size and by the bytes actually inflated: a real EfficientNet's config.json is a few
#: hundred KB, so 64 MB is a margin of 100 or more; a zip bomb (2 GB of spaces in 2 MB) is refused
#: before anything is inflated.
ARCHIVE_JSON_MAX_BYTES = 64 << 20

#: Largest total a `.keras` archive's members (the weights above all) may declare and inflate to:
#: 16 GB, four billion float32 weights, well above any backbone this tool fine-tunes on one machine.
ARCHIVE_MAX_BYTES = 16 << 30

#: Largest recipe (TOML) file read; shipped recipes are under 1 KB.
RECIPE_MAX_BYTES = 1 << 20


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
class TableConfig:
    """How a label table (CSV, TSV or Parquet: one row per image) is read in place of a class-per-subfolder
    folder (`data.tables`).

    Attributes:
        path_column: the column of image paths; relative ones resolve against the table's folder.
        label_column: the column of class names (a row with an empty cell is skipped, with its reason).
        allow_outside: accept rows whose image lies outside the table's folder (through `..`, an absolute
            path or a link); False refuses the table, naming the row.
        suffixes: file endings read as a table wherever a labelled folder is expected.
        separator: in a label cell, what separates the several labels of one image (`cat;outdoor`): a
            table with any such cell is multi-label (`data.tables`); "" reads every cell as one label.
    """

    path_column: str = "path"
    label_column: str = "label"
    allow_outside: bool = False
    suffixes: tuple[str, ...] = (".csv", ".tsv", ".parquet")
    separator: str = ";"


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
        memory_budget_mb: a forward pass is kept under about this many MB: the
            batch is lowered (and a note says so) when `batch * bytes_per_image`
            would exceed it (`features.memory_batch`). 2 GB fits a laptop.
        activation_factor: the memory of one image in a forward pass as a
            multiple of its float32 input (S * S * 3 * 4 bytes): the input plus
            the live activations and decode buffers. 8 is what a 2048 px pass
            measured (9 GB for 30 images at 2048 px is 6x their input).
    """

    batch_size: int = 32
    pooling: str = "avg"
    image_size: int | None = None
    init_seed: int = 0
    memory_budget_mb: int = 2048
    activation_factor: float = 8.0


@dataclass(frozen=True)
class PredictConfig:
    """How `predict` and `evaluate` run a trained model.

    Attributes:
        tta: test-time augmentation: the probabilities averaged over this many
            deterministic views of each image (view 0 the image itself, then
            the feature cache's augmented views: flips and crops of 70-100 %
            of the area, `data.pipeline.augmented_view`); 1 is off.
        max_tta: the most views `--tta` takes (each costs one forward pass).
    """

    tta: int = 1
    max_tta: int = 16


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
        activation_shift: training on cached activations translates each
            feature map by a random offset of up to this many cells per batch
            (`train.prefix.shift_maps`), augmentation in activation space;
            0 is off.
        max_steps_back: how far back from a stage's end the prefix cut may
            move (single-input layers) to find a narrower tensor to cache.
        keep_better: after fine-tuning, keep the linear head of phase 1
            instead when the fine-tuned model does not beat it on validation
            (`train.compare`); False always keeps the fine-tuned model.
        compare_resamples: paired bootstrap resamples of the validation images
            when the fine-tuned model is compared with the linear head.
        compare_interval: the two-sided interval (0-1) of that accuracy
            difference; when it spans 0 the accuracies are within noise and
            the validation cross-entropy decides.
        tie_loss_margin: within noise, the fine-tuned model must lower the
            validation cross-entropy by at least this fraction (0-1) to be
            kept, and the pilot to go on; otherwise the simpler linear head,
            refitted on every label, is kept (a brain-MRI set went on and
            was kept on 1 image in 120 and 0.45 % of cross-entropy, and lost
            2 points on test at 3.6x the head's time).
        calibrate: after training (and after that comparison), fit one
            temperature T on the validation images and fold it into the
            saved model (`train.calibrate`, temperature scaling, Guo et al.
            2017); False saves the model's probabilities as trained.
        ece_bins: equal-width confidence bins of the expected calibration
            error, in metrics.json and reliability.png; `evaluate` uses the
            same number, so its `ece` compares with the run's. 15 as in Guo et al.
        temperature_range: (lowest, highest) T searched (log scale); a fit on
            either edge means the validation images do not pin T down (e.g.
            no errors among them) and the model is left uncalibrated.
        ensemble: members whose probabilities model.keras averages (1-10;
            1: off), see `train.ensemble` and `EnsembleConfig`.
        ensemble_mode: fine-tuning plans: `seeds` (one full fine-tune per
            member: N times the cost) or `snapshots` (one run with a cyclic
            cosine rate, a member per cycle end). Linear plans ignore it.
        average: fine-tuning plans: `none`, `swa` (mean of the weights after
            each of the last `EnsembleConfig.swa_epochs` epochs) or `ema`
            (exponential moving average, per epoch, decay
            `EnsembleConfig.ema_decay`); see `train.averaging`.
        drop_overlap: a --val-dir or --test-dir holding copies of training
            images (same content) is refused (False), or those images are
            left out of it and the run says how many (True, `--drop-overlap`).
        pilot_epochs: with the keep rule on, fine-tuning's first epochs are a
            pilot with the linear head as the bar: when its best epoch does
            not beat the head on validation by then (`train.finetune.Pilot`),
            fine-tuning stops and the head is kept; 0: no pilot. On cached
            activations the pilot trains on view 0 alone, and the augmented
            views are computed only when it goes on (`train.finetune.Views`).
        pilot_rate_factors: on cached activations, when the pilot at the plan's rates (the first factor,
            1.0) is abandoned, one more pilot per further factor from the same start at the plan's rates
            times it, and the best that beats the linear head goes on (`train.finetune._pilot_arms`:
            successive halving with the linear head as the bar); one factor: a single pilot.
        headroom_check: before fine-tuning is paid for, skip it and keep the
            linear head when that head makes no validation error and reaches
            `headroom_cv_accuracy` in cross-validation on the training images,
            or when its learning curve expects it to be wrong on too few
            validation images for the keep rule to see a gain
            (`train.finetune.no_headroom`); off when the user forces the plan
            (--strategy or --recipe).
        cross_validate: a linear plan (one head, no --val-dir) is validated
            out-of-fold on every labelled image and refitted on all of them
            (`train.context.all_labels`); False keeps the `val_fraction` hold-out.
        learning_curve: refit the linear head (of a linear plan, or fine-tuning's phase 1) on nested
            fractions of the training images and forecast the accuracy at more labels (`train.curve`,
            `CurveConfig`; metrics["learning_curve"]): seconds on cached features, no backbone pass.
        strength_check: before fine-tuning end to end with on-line augmentation, score the phase-1 linear
            head on up to `flip_check_images` validation images as they are and through one draw of the
            plan's augmentation; when they lose `strength_max_loss` (0-1) or more, the next weaker level is
            tried, and the plan trains with the strongest that keeps the loss under it (`train.strength`).
        refit_fine_tuned: a fine-tuned model the keep rule kept, on a hold-out split from the training
            folder (no --val-dir) and cached activations, is trained again from the same start on the
            training and held-out images together, for the held-out run's best number of epochs
            (`train.finetune.refit_fine_tuned`): the hold-out did its jobs (early stopping, the keep rule,
            calibration), and its labels then train the model too.
        flip_check: before fine-tuning that would train on flipped images, score the phase-1 linear head on
            up to `flip_check_images` validation images as they are and mirrored (one more backbone pass
            over them); when the mirror images lose `flip_max_loss` (0-1) of accuracy or more, a flip
            changes the class (digits, text) and fine-tuning trains without flips (`train.flips`).
        feature_rival: fine-tuning on data unlike the pretraining data (or where the probe found an earlier
            stage as good as the final one) must also beat the trouble cell's
            linear head (earlier stages, their concatenation, raw pixels, by cross-validation), fitted
            first on cached features, and that head is kept when it does not (`train.finetune.feature_rival`).
    """

    val_fraction: float = 0.2
    max_retries: int = 2
    activation_budget_mb: int = 2048
    activation_dtype: str = "float16"
    cache_prefix: bool = True
    activation_shift: int = 0
    max_steps_back: int = 8
    keep_better: bool = True
    compare_resamples: int = 2000
    compare_interval: float = 0.9
    tie_loss_margin: float = 0.01
    calibrate: bool = True
    ece_bins: int = 15
    temperature_range: tuple[float, float] = (0.05, 20.0)
    ensemble: int = 1
    ensemble_mode: str = "seeds"
    average: str = "none"
    drop_overlap: bool = False
    cross_validate: bool = True
    pilot_epochs: int = 2
    pilot_rate_factors: tuple[float, ...] = (1.0, 0.1)
    headroom_check: bool = True
    headroom_cv_accuracy: float = 0.995
    learning_curve: bool = True
    flip_check: bool = True
    flip_check_images: int = 128
    flip_max_loss: float = 0.10
    strength_check: bool = True
    strength_max_loss: float = 0.15
    feature_rival: bool = True
    refit_fine_tuned: bool = True


@dataclass(frozen=True)
class EnsembleConfig:
    """Ensembles (`train --ensemble N`) and weight averaging (`train --average`).

    Attributes:
        max_members: the largest N `--ensemble` takes.
        modes: the values `--ensemble-mode` takes.
        averages: the values `--average` takes.
        linear_stage_offsets: linear plans: member i >= 1 reads the plan's
            stage plus offset i (cycling; offsets outside the backbone's
            stages are skipped), so members see different features; member 0
            is the plan's own head, whatever features it chose.
        linear_max_views: linear plans: member i >= 1 trains on i % (this + 1)
            cached augmented views per image.
        snapshot_cycle: snapshots: epochs per cosine cycle; the run lasts
            N x this many epochs, a member taken at each cycle's end.
        snapshot_floor: snapshots: the rate at a cycle's end, as a fraction
            of the recipe's (the cosine falls from 1 to this).
        swa_epochs: SWA averages the weights after each of this many last epochs.
        ema_decay: EMA: after each epoch, average = decay x average + (1 - decay) x weights.
    """

    max_members: int = 10
    modes: tuple[str, ...] = ("seeds", "snapshots")
    averages: tuple[str, ...] = ("none", "swa", "ema")
    linear_stage_offsets: tuple[int, ...] = (0, -1, 1, -2)
    linear_max_views: int = 2
    snapshot_cycle: int = 2
    snapshot_floor: float = 0.05
    swa_epochs: int = 3
    ema_decay: float = 0.5


ENSEMBLE = EnsembleConfig()


@dataclass(frozen=True)
class LinearConfig:
    """The linear head: L2-regularised logistic regression, C by grouped cross-validation.

    Attributes:
        c_grid: inverse regularisation strengths tried first (features
            standardised): log-spaced, half a decade apart, warm-started from
            the strongest regularisation up.
        c_range: how far the grid is extended (by its own step, `c_extend`
            points at a time) while the best C sits on one of its ends; a best
            C still on an end at these limits is reported "on the edge".
        folds: cross-validation folds at most (fewer when a class is smaller);
            with no --val-dir a linear plan is validated out-of-fold on every
            labelled image with these folds, then refitted on all of them.
        tol: L-BFGS tolerance; on standardised features tighter tolerances
            change no decision but cost seconds.
        pixel_side: for a plan that takes the best features (`feature_stage =
            "best"`, small data unlike the pretraining data), the raw-pixel
            candidate: images resized to this side, RGB, flattened
            (3 * side**2 features).
        scale_floor: standardisation divides each feature by its standard
            deviation, but by no less than this fraction of the median one
            (`train.logistic.floored_scaler`): nearly constant features are not
            blown up into noise the head would lean on.
    """

    c_grid: tuple[float, ...] = (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0)
    c_range: tuple[float, float] = (1e-5, 1e3)
    c_extend: int = 2
    folds: int = 5
    tol: float = 1e-3
    pixel_side: int = 16
    scale_floor: float = 0.1


@dataclass(frozen=True)
class CurveConfig:
    """The learning curve and label forecast (`train.curve`, `analysis.curve`).

    Attributes:
        fractions: nested, stratified shares of each fold's training images the linear head is refitted on
            (1.0: all of them); a share that leaves the smallest class fewer than `min_per_class` images
            is dropped.
        seeds: repetitions, each with its own folds and its own nested order.
        folds: cross-validation folds at most (fewer when the smallest class is smaller).
        min_per_class: training images of the smallest class the smallest kept fraction needs.
        min_points: kept fractions needed to fit the three-parameter curve; fewer: "too few to forecast".
        multiples: the forecast's label counts, as multiples of the images per class the run trained on.
        resamples: bootstrap resamples of the images behind the forecast's 95 % interval.
        flat_gain: a forecast gain at twice the labels below this (0-1, accuracy) is "flat".
        near_top: a flat curve at or above this accuracy is near its top (nothing to change), below it a
            sign that this plan has stopped learning (fine-tuning or another base may).
    """

    fractions: tuple[float, ...] = (0.1, 0.17, 0.25, 0.35, 0.5, 0.7, 1.0)
    seeds: int = 2
    folds: int = 5
    min_per_class: int = 2
    min_points: int = 4
    multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    resamples: int = 200
    flat_gain: float = 0.01
    near_top: float = 0.95


@dataclass(frozen=True)
class SuggestConfig:
    """`finetune suggest`: which unlabeled images to label next (`analysis.acquisition`).

    Attributes:
        n: images suggested (--n).
        method: cluster-margin (uncertainty, then diversity), badge, margin or random (--method).
        max_shown: suggestions shown in index.html (suggest.csv lists all); thumbnails are the report's
            (`ReportConfig.thumbnail_px`).
    """

    n: int = 20
    method: str = "cluster-margin"
    max_shown: int = 200


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


@dataclass(frozen=True)
class TuneConfig:
    """Hyper-parameter search (`finetune tune`): of a linear plan on cached frozen features, or of a
    fine-tuning plan by successive halving over epochs (the fields marked fine-tuning).

    The held-out images of the honest estimate are those `train` validates on
    with the same --seed: a stratified `TrainConfig.val_fraction` of the folder.
    Fine-tuning trials are scored on a further stratified `val_fraction` of
    the searched images (one split: cross-validating fine-tuning costs k runs).

    Attributes:
        method: `auto` (a log-grid when one or two parameters vary, random
            search from three up), `grid`, `random` or `halving`.
        budget: trials when neither --budget nor --time is given; with
            `halving`, the candidates of the first rung.
        max_trials: trials at most when only --time is given.
        cv: cross-validation folds (fewer when a class has fewer images).
        repeat_below: when the smallest class of the searched images has
            fewer than this many, the cross-validation is repeated with new
            folds (`repeats` times) so the score is not one lucky split.
        repeats: repetitions of the cross-validation for tiny data.
        c_range: (low, high) inverse regularisation strengths searched, on a
            log scale (features are standardised).
        max_grid_points: C values of the finest log-grid (2^k + 1 points, so
            a finer grid holds every point of a coarser one and a resumed
            grid search reuses them).
        stages: how many of the backbone's last stages are searched (the last
            one is its final output, `final`); 3 is what the similarity probe compares.
        poolings: spatial poolings searched, of `avg` and `max`.
        max_views: augmented views per training image searched, 0 to this
            (0-16); each view costs one backbone pass over the searched images, once.
        halving_factor: successive halving keeps 1/factor of the candidates per
            rung and gives the survivors factor x the images.
        edge_fraction: a best value within this fraction (0-0.5) of either end
            of its range (log scale for C) is reported as lying on the edge.
        top: trials shown in the leaderboard.
        lr_range: fine-tuning: (low, high) head learning rates searched,
            log-uniform; the shipped recipes' 1e-3 sits in the middle.
        top_lr_factors: fine-tuning: candidates for the top stages' rate as a
            fraction of the head's, each in (0, 1].
        dropouts: fine-tuning: candidates for the dropout before the head, each in [0, 1).
        l2s: fine-tuning: candidates for the L2 penalty on the head's kernel, each >= 0.
        max_unfreeze: fine-tuning: the top stages trained are searched over
            1..this (0: 1..every stage of the backbone).
        first_epochs: fine-tuning: epochs of the first halving rung (>= 1).
        max_epochs: fine-tuning: epochs of the last rung at most; 0: the recipe's `epochs`.
        finetune_budget: fine-tuning: candidates of the first rung when no --budget is given.
        epoch_factor: fine-tuning: halving keeps 1/factor of the candidates
            per rung and trains them for factor x the epochs (>= 2).
    """

    method: str = "auto"
    budget: int = 20
    max_trials: int = 1000
    cv: int = 5
    repeat_below: int = 10
    repeats: int = 3
    c_range: tuple[float, float] = (1e-3, 1e2)
    max_grid_points: int = 17
    stages: int = 3
    poolings: tuple[str, ...] = ("avg", "max")
    max_views: int = 4
    halving_factor: int = 3
    edge_fraction: float = 0.1
    top: int = 10
    lr_range: tuple[float, float] = (1e-4, 1e-2)
    top_lr_factors: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    dropouts: tuple[float, ...] = (0.0, 0.2, 0.4)
    l2s: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    max_unfreeze: int = 0
    first_epochs: int = 1
    max_epochs: int = 0
    finetune_budget: int = 9
    epoch_factor: int = 3


@dataclass(frozen=True)
class LrFindConfig:
    """The learning-rate sweep of `finetune lr-find` and `train --lr auto` (fastai's `lr_find`).

    One optimizer step per training batch (batches cycled), the head's rate
    growing exponentially; the other groups keep their ratio to it.

    Attributes:
        start_lr: the head's rate at the first step, > 0.
        end_lr: the head's rate at the last step, > start_lr. Step i of n
            (0-based) runs at start_lr * (end_lr / start_lr) ** (i / (n - 1)).
        steps: optimizer steps at most (>= 2).
        beta: weight of the past in the exponential moving average of the
            loss, [0, 1); the average is bias-corrected (divided by 1 - beta**t
            after t steps), so the first steps are not pulled towards 0.
        diverge_factor: the sweep stops once the smoothed loss exceeds this
            multiple of its lowest value so far (or a loss is NaN or infinite).
        skip_start: steps left out at the start when suggesting (the curve is
            flat and noisy there), as fastai does (steps // 10 of 100).
        skip_end: steps left out at the end when suggesting (diverging there).
            Both skips are dropped when fewer than 3 steps would remain.
        disagree_factor: the suggestions disagree when the largest is more
            than this multiple of the smallest; the sweep then says so.
    """

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    beta: float = 0.98
    diverge_factor: float = 4.0
    skip_start: int = 10
    skip_end: int = 5
    disagree_factor: float = 10.0


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (`finetune distill`): a student trained on teachers' soft targets.

    The loss per image (Hinton et al. 2015) is
    alpha * CE(label, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
    where x_T = softmax(log(x) / T); an unlabeled (transfer-set) image has the
    soft term only. The T^2 keeps the soft term's gradients the same size as
    T changes (they shrink as 1 / T^2 otherwise).

    Attributes:
        temperature: T > 0; higher softens the targets (more weight on the
            teachers' ranking of the wrong classes). 4 is the common choice.
        alpha: weight of the hard-label cross-entropy, in [0, 1]; 1 is plain
            training on labels (the "hard labels" student of distill.json).
        epochs: the most epochs; early stopping on validation loss usually ends sooner.
        patience: epochs without a lower validation loss before stopping.
        batch_size: images per step.
        learning_rate: Adam rate for every trained layer of the student.
        dropout: dropout before the student's new classifier layer, [0, 1).
        views: deterministic views per training image (0: as is; k >= 1 the
            k-th flip/crop of `data.pipeline.augmented_view`); the teacher
            scores the view the student trains on (cached per view): the
            same crop exactly when both work at the same image size.
        timing_batches: batch sizes whose CPU ms per image distill.json reports.
        timing_repeats: timed forward passes per batch size (after one warm-up); the median is reported.
    """

    temperature: float = 4.0
    alpha: float = 0.5
    epochs: int = 30
    patience: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    dropout: float = 0.0
    views: int = 1
    timing_batches: tuple[int, ...] = (1, 32)
    timing_repeats: int = 10


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


@dataclass(frozen=True)
class DiagnoseConfig:
    """Thresholds of the verdict rules (see the module docstring for the order they apply in).

    Attributes:
        min_epochs: trend rules (too-low, overfitting) need at least this many
            epochs; with fewer, only levels are judged (diverged, underfitting).
        blowup: a training loss above this many times the chance level ln(k)
            is a divergence. A head started from the linear solution begins
            below ln(k); ten times it means the weights were thrown far off.
        end_rise: a last training loss above this many times the first is a
            divergence (the loss grew instead of falling), when it is also
            above `end_rise_floor` x the chance level ln(k).
        end_rise_floor: a head started from a perfect linear solution begins
            near 0 (0.008 on 3 colours), and noise doubles such a loss without
            anything diverging; below this fraction of ln(k), 0-1, no rise counts.
        min_progress: too-low when the training loss fell by less than this
            fraction of its first value (to its lowest), 0-1.
        too_low_accuracy: ... and the last training accuracy (0-1) is below
            this: far from its ceiling of 1, so there was room to learn.
        overfit_rise: overfitting needs the last validation loss at least this
            fraction above its minimum (which came at an earlier epoch), 0-1.
        overfit_gap: ... and the last training accuracy minus the last
            validation accuracy at least this (0-1).
        underfit_loss: underfitting when the last training loss and the lowest
            validation loss are both at least this fraction of ln(k): the
            model kept most of a uniform guess's uncertainty on both sets.
        linear_edge_margin: a linear head's best C counts as "on the edge"
            when its cross-validated accuracy (0-1) beats the adjacent C's by
            at least this; a flat curve says nothing about the grid.
        linear_underfit_skill: a linear head underfits when its best
            cross-validated accuracy is below chance + this x (1 - chance),
            i.e. it covers less than this share of the way from chance to 100%.
        max_estimated_classes: upper bound on k when it is estimated from
            the loss scale (no metrics.json or labels.json).
    """

    min_epochs: int = 3
    blowup: float = 10.0
    end_rise: float = 2.0
    end_rise_floor: float = 0.1
    min_progress: float = 0.05
    too_low_accuracy: float = 0.9
    overfit_rise: float = 0.1
    overfit_gap: float = 0.1
    underfit_loss: float = 0.6
    linear_edge_margin: float = 0.01
    linear_underfit_skill: float = 0.5
    max_estimated_classes: int = 1000


SCAN = ScanConfig()
TABLE = TableConfig()
FEATURES = FeatureConfig()
PRETRAIN = PretrainConfig()
TRAIN = TrainConfig()
LINEAR = LinearConfig()
CURVE = CurveConfig()
SUGGEST = SuggestConfig()
SIMILARITY = SimilarityConfig()
TUNE = TuneConfig()
LR_FIND = LrFindConfig()
DIAGNOSE = DiagnoseConfig()
PREDICT = PredictConfig()
DISTILL = DistillConfig()


@dataclass(frozen=True)
class ExportConfig:
    """Defaults of `finetune export` (`export.export_run`).

    Attributes:
        min_agreement: the exported file must pick the same top-1 class as the
            Keras model on at least this share (0-1) of the held-out images,
            or the export is refused (unless forced).
        calibration: images from the training folder that full int8 quantisation
            uses to choose its ranges (the representative set), at most.
        timing_warmup: calls at batch 1 before the timed ones (first calls
            build kernels and caches).
        timing_images: held-out images timed at batch 1, at most; the reported
            CPU ms per image is their median.
        onnx_opset: the ONNX opset tf2onnx targets; None: its default.
    """

    min_agreement: float = 0.98
    calibration: int = 200
    timing_warmup: int = 3
    timing_images: int = 50
    onnx_opset: int | None = None


EXPORT = ExportConfig()


@dataclass(frozen=True)
class ScaleConfig:
    """How `predict` and `extract-features` run with `--engine ray` (`scale.ray_data`).

    Attributes:
        engine: `local` (this process, tf.data) or `ray` (model actors on a Ray cluster).
        workers: model actors (each loads the model once); 0: one per
            `cpus_per_worker` CPUs of the cluster (per GPU when workers take GPUs).
        cpus_per_worker: CPUs each actor reserves; also its TensorFlow thread count.
        gpus_per_worker: GPUs each actor reserves; None: 1 when the cluster has GPUs, else 0.
        batch_size: images per actor call, and per Parquet shard at most.
        max_restarts: times a dead actor is restarted (its model loaded again).
        max_task_retries: times a batch whose actor died is run again; a killed
            worker costs a retry, not the job.
        object_store_mb: object store of a Ray instance started here (no `--address`);
            only paths and small results travel through it.
    """

    engine: str = "local"
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    batch_size: int = 64
    max_restarts: int = 3
    max_task_retries: int = 3
    object_store_mb: int = 256


SCALE = ScaleConfig()


@dataclass(frozen=True)
class ReportConfig:
    """How `RUN/report.html` and `evaluate --html` pages are drawn (`runs.report_page`).

    Attributes:
        thumbnail_px: longest side, in pixels, of a gallery thumbnail (inlined as JPEG).
        thumbnail_quality: JPEG quality (1-95) of the thumbnails; lower keeps the page smaller.
        gallery_max: misclassified images shown at most, the most confident mistakes first;
            the page says how many were left out.
    """

    thumbnail_px: int = 96
    thumbnail_quality: int = 80
    gallery_max: int = 200


REPORT = ReportConfig()


@dataclass(frozen=True)
class ExplainConfig:
    """Heat maps of `finetune explain` (see `saliency`).

    Attributes:
        patch_fraction: occlusion: the grey patch's side as a fraction of the image side (>= 1 px).
        stride_fraction: occlusion: the patch's step as a fraction of the side (>= 1 px).
        patch_value: occlusion: the patch's grey level, 0-255.
        batch_size: images (occluded copies) per forward pass.
        sanity_threshold: --sanity: a map whose Spearman correlation (-1..1) with the
            randomised-head map exceeds this is flagged as not explaining the model
            (it barely depends on the head; a backbone trained on the task alone can
            also localise the evidence, so a high value is a warning, not a proof).
        sanity_seed: seed of the randomised head's weights.
        overlay_alpha: opacity (0-1) of the heat map's peak drawn over the photo (0 where the map is 0).
        min_view: the side (px) pictures are enlarged to, at least, in the gallery.
        chunk: images decoded and explained at a time (memory stays flat as folders grow).
    """

    patch_fraction: float = 1 / 8
    stride_fraction: float = 1 / 16
    patch_value: float = 127.5
    batch_size: int = 64
    sanity_threshold: float = 0.8
    sanity_seed: int = 0
    overlay_alpha: float = 0.5
    min_view: int = 160
    chunk: int = 64


@dataclass(frozen=True)
class AttackConfig:
    """Robustness of `finetune attack`: adversarial (FGSM, PGD) and common corruptions.

    Attributes:
        eps: perturbation budgets tried, in 0-255 pixel units (L-infinity).
        methods: attacks run by default, of fgsm and pgd.
        pgd_steps: PGD iterations.
        pgd_step_factor: PGD step size = this x eps / pgd_steps (Madry et al. use 2.5).
        random_start: PGD starts from a uniform point in the eps-ball.
        seed: seed of the random start and of the noise corruption.
        batch_size: images per gradient step.
        examples: adversarial examples shown in index.html.
        max_images: images attacked at most (a seeded random sample of a larger folder, said so):
            each is held in memory with its perturbed copies.
        masking_floor: gradient-masking check: at the largest eps, PGD accuracy above
            this fraction (0-1) of the clean accuracy is warned about.
        tolerance_images: accuracy may rise with eps (or PGD exceed FGSM) by this many
            images before a warning (one image flips by chance).
        noise: Gaussian noise standard deviations (pixels), one per severity.
        blur: Gaussian blur radii (pixels), one per severity.
        jpeg: JPEG qualities (1-95), one per severity.
        brightness: brightness offsets added to every channel (pixels), one per severity.
    """

    eps: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    methods: tuple[str, ...] = ("fgsm", "pgd")
    pgd_steps: int = 10
    pgd_step_factor: float = 2.5
    random_start: bool = True
    seed: int = 0
    batch_size: int = 32
    examples: int = 6
    masking_floor: float = 0.5
    max_images: int = 500
    tolerance_images: int = 1
    noise: tuple[float, ...] = (8.0, 16.0, 32.0)
    blur: tuple[float, ...] = (0.5, 1.0, 2.0)
    jpeg: tuple[int, ...] = (40, 15, 5)
    brightness: tuple[float, ...] = (32.0, 64.0, 96.0)


EXPLAIN = ExplainConfig()
ATTACK = AttackConfig()


@dataclass(frozen=True)
class AuditConfig:
    """How `finetune audit` looks for data problems in frozen features (final stage, average pooled).

    Attributes:
        folds: cross-validation folds for the out-of-fold probabilities (fewer when a class is smaller).
        C: inverse L2 strength of the logistic regression on standardised features. Strong: less
            over-confident out-of-fold probabilities rank planted errors better (signs benchmark, 3 flip
            seeds: precision at k 0.82-0.83 at C = 0.003 against 0.66-0.74 at C = 1).
        label_margin: an image is a possible label error when the best other class's out-of-fold
            probability exceeds its given class's by more than this (score in [-1, 1]).
        duplicate_similarity: cosine similarity (of mean-centred features, in [-1, 1]) at or above which
            two images are a near-duplicate pair; an exact copy scores 1.
        neighbours: k of the outlier score (mean similarity to the k nearest other images).
        outlier_z: robust z-score ((median - s) / (1.4826 MAD)) of that mean similarity above which an
            image is an outlier.
        max_shown: suspects per kind shown in index.html (audit.csv lists all).
        thumb: thumbnail side in pixels in the gallery.
        inspect_max_images: `inspect --base` runs the audit (every image's features) on folders
            of at most this many usable images; above, it only points to `finetune audit`.
    """

    folds: int = 5
    C: float = 0.003
    label_margin: float = 0.0
    duplicate_similarity: float = 0.97
    neighbours: int = 5
    outlier_z: float = 4.0
    max_shown: int = 48
    thumb: int = 112
    inspect_max_images: int = 2000


@dataclass(frozen=True)
class PatchesConfig:
    """How `finetune patches` shows what a layer's units respond to.

    Attributes:
        units: how many units when none are named: the most active (highest mean per-image maximum).
        top: crops per unit (the images whose maximum of that unit is highest).
        cell: side in pixels of each crop in the grid picture.
    """

    units: int = 16
    top: int = 9
    cell: int = 64


@dataclass(frozen=True)
class FiltersConfig:
    """Gradient-ascent pictures of units (`finetune filters`) and DeepDream (`--dream`).

    Attributes:
        units: how many units when none are named: the first ones.
        steps: ascent steps per picture.
        lr: step size in pixels per step (the gradient is divided by its standard deviation).
        jitter: the image is shifted by up to this many pixels each step (robust, readable patterns).
        blur_every: blur the image (3x3 Gaussian, mixed in at side / 224: fully from 224 px up) every
            this many steps; 0: never.
        decay: pull towards grey by this fraction per step (an L2 prior); 0: off.
        cell: side in pixels of each picture in the grid.
        octaves: DeepDream scales, coarse to fine, each `octave_scale` times the last.
        octave_scale: size ratio between octaves.
        dream_steps: ascent steps per octave.
        dream_lr: DeepDream step in pixels.
    """

    units: int = 16
    steps: int = 96
    lr: float = 4.0
    jitter: int = 4
    blur_every: int = 4
    decay: float = 0.002
    cell: int = 128
    octaves: int = 3
    octave_scale: float = 1.4
    dream_steps: int = 20
    dream_lr: float = 3.0


AUDIT = AuditConfig()
PATCHES = PatchesConfig()
FILTERS = FiltersConfig()


def checked_tta(tta: int | str) -> int:
    """`tta` (an int, or its text from the command line) as an int, if it is a whole number in 1..`PREDICT.max_tta`.

    Raises:
        SettingsError: anything else, saying the range.
    """
    try:
        value = None if isinstance(tta, (bool, float)) else int(tta)
    except (TypeError, ValueError):
        value = None
    if value is None or not 1 <= value <= PREDICT.max_tta:
        raise SettingsError(f"--tta takes 1 to {PREDICT.max_tta} views per image (1: off). Received: tta={tta!r}")
    return value


def checked_pretrain_config(config: PretrainConfig) -> PretrainConfig:
    """`config` if its values are in range.

    Raises:
        SettingsError: saying which value is wrong.
    """
    if not 0 < config.noise < 1:
        raise SettingsError(f"--noise {config.noise} must be between 0 and 1 (e.g. 0.2)")
    if config.arch not in ("conv", "mlp") or config.noise_type not in ("gaussian", "mask"):
        raise SettingsError("--arch must be conv or mlp, and --noise-type gaussian or mask")
    return config
