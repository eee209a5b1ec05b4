"""`finetune lr-find DIR`: a learning-rate sweep on the fine-tuning a plan would run (the sweep itself is
`train.lr_sweep`); writes lr.csv, lr.png and the suggested rates.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.config import LR_FIND, SCAN, TRAIN, LrFindConfig, ScanConfig, TrainConfig
from finetune_cli.data.scan import check_out_outside
from finetune_cli.errors import SettingsError
from finetune_cli.features import FeatureCache
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.runs.folder import RunFolder
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.train.lr_sweep import SWEPT, LrFinding, checked_config, find, write_sweep
from finetune_cli.train.session import choose, is_imbalanced, prepare


def lr_find(root, base: str, *, out=None, weights: str = "imagenet", image_size: int | None = None,
            strategy: str = "partial", recipe: str | None = None, seed: int = 0, cache_dir=None,
            use_cache: bool = True, batch_size: int = 32, config: ScanConfig = SCAN,
            settings: TrainConfig = TRAIN, sweep: LrFindConfig = LR_FIND,
            reporter: Reporter = QUIET) -> LrFinding:
    """Sweep the head's learning rate exponentially on a fine-tuning plan's model (fastai's `lr_find`).

    The model and training batches are those `train` would fine-tune for
    `strategy` (partial or full; a `recipe` overrides it); the weights are
    restored afterwards. See `train.lr_sweep` for the sweep and the suggestions.

    Args:
        out: the folder to create for lr.csv (step, lr, loss, smoothed),
            lr.png and lr.json; None: a new `runs/<folder name>-lr-<N>`.
        sweep: the sweep's range, length and stopping rule (`config.LrFindConfig`).

    Returns:
        A `train.lr_sweep.LrFinding`: `.suggestions` (valley, steepest,
        minimum, spread, disagree), `.sweep` (rates, losses, smoothed),
        `.folder`; `.to_dict()` is JSON-able.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError,
        OutputError, SettingsError, TrainingError.
    """
    checked_config(sweep)
    if strategy not in SWEPT:
        raise SettingsError(f"--strategy must be one of {', '.join(SWEPT)} for lr-find. Received: {strategy}")
    if recipe is not None and recipe_files.load(recipe)[0].strategy not in SWEPT:  # validate before any work
        raise SettingsError(f"lr-find needs a fine-tuning recipe ({', '.join(SWEPT)}); {recipe} is linear")
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    check_out_outside(out, root)
    run = RunFolder(out) if out is not None else RunFolder.new(f"{Path(root).resolve().name}-lr")
    reporter.on_phase(f"output folder: {run.path}")
    with run.guarded():
        ctx, profile, _ = prepare(run, root, base, weights=weights, image_size=image_size, saved=None, recipe=recipe,
                                  val_dir=None, test_dir=None, seed=seed, cache=cache, batch_size=batch_size,
                                  config=config, settings=settings, reporter=reporter)
        # the similarity verdict only words the plan's reason; the forced strategy fixes the stages
        _, plan, recipe_obj, _ = choose(ctx, profile, "similar", strategy, recipe)
        finding = find(ctx, plan, recipe_obj, is_imbalanced(ctx, profile), settings, sweep)
        return write_sweep(run, finding)
