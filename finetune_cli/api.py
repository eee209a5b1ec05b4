"""The library API: every command of the CLI is one function here.

Functions take plain arguments, return data, and never print. Progress is
reported through optional callbacks. Errors are `finetune_cli.errors` types.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune_cli.config import FEATURES, PRETRAIN, SCAN, TRAIN, PretrainConfig, ScanConfig, TrainConfig
from finetune_cli.config import TUNE, TuneConfig
from finetune_cli.config import LR_FIND, LrFindConfig
from finetune_cli.config import PREDICT
from finetune_cli.data.scan import Progress, scan_folder
from finetune_cli.reporter import QUIET, Reporter


def inspect(
    root: str | os.PathLike,
    *,
    config: ScanConfig = SCAN,
    progress: Progress | None = None,
):
    """Scan and profile a class-per-subfolder image folder.

    Returns:
        A `data.profile.Profile`; `profile.to_dict()` is the `inspect --json` contract.

    Raises:
        FolderError: the folder is unusable (see `scan_folder`).
    """
    from finetune_cli.data.profile import profile_scan

    return profile_scan(scan_folder(root, labelled=True, config=config, progress=progress), config)


def plan(
    root: str | os.PathLike,
    base: str,
    *,
    weights: str = "imagenet",
    image_size: int | None = None,
    similarity: str = "auto",
    strategy: str = "auto",
    recipe: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    config: ScanConfig = SCAN,
    reporter: Reporter = QUIET,
):
    """What `train` would do with `base`, without training: (Profile, Similarity, Plan).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError.
    """
    from finetune_cli.train.run import plan_for

    return plan_for(root, base, weights=weights, image_size=image_size, similarity=similarity, strategy=strategy,
                    recipe=recipe, seed=seed, cache_dir=cache_dir, use_cache=use_cache, config=config,
                    reporter=reporter)


def bases() -> list[dict]:
    """The backbone registry: name, input size, parameters (millions), feature dim, where the ImageNet
    weights come from (`installed`: a package, no download; `download`: keras.applications fetches them)."""
    from finetune_cli.models import registry

    return [
        {
            "name": s.name,
            "input_size": s.input_size,
            "params_m": s.params_m,
            "feature_dim": s.feature_dim,
            "preprocess": s.preprocess,
            "weights": "installed" if s.embedded else "none (random init)" if s.builtin else "download",
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
):
    """Frozen features for every usable image under `root` (labelled or flat).

    Args:
        out: if given, the table is written there (.parquet, .csv or .npz);
            checked before any work, and an existing file is refused unless
            `overwrite`.
        layer: None (final), a stage index, or a layer name.

    Returns:
        (FeatureTable, Scan).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError.
    """
    from finetune_cli.features import FeatureCache, check_table_path, extract, write_table
    from finetune_cli.models.backbones import resolve

    if out is not None:
        out = check_table_path(Path(out), overwrite)
    ref = resolve(base, weights, image_size, FEATURES.init_seed)
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    scan = scan_folder(root, labelled=None, config=config, progress=scan_progress, for_training=False)
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
    """Empty the feature cache; returns the number of entries removed.

    Only a folder marked as a feature cache is touched, and in it only the
    entries the cache wrote.

    Raises:
        OutputError: the folder is not a feature cache.
    """
    from finetune_cli.features import FeatureCache

    return FeatureCache.at(cache_dir).clear()


def train(
    root: str | os.PathLike,
    base: str | None,
    *,
    out: str | os.PathLike | None = None,
    weights: str = "imagenet",
    image_size: int | None = None,
    strategy: str = "auto",
    similarity: str = "auto",
    recipe: str | None = None,
    val_dir: str | os.PathLike | None = None,
    test_dir: str | os.PathLike | None = None,
    seed: int = 0,
    resume: bool = False,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    unlabeled: str | os.PathLike | None = None,
    pretrain_settings: PretrainConfig | None = None,
    greedy: bool = False,
    config: ScanConfig = SCAN,
    settings: TrainConfig = TRAIN,
    reporter: Reporter = QUIET,
    lr: float | str | None = None,
    ensemble: int | str = TRAIN.ensemble,
    ensemble_mode: str = TRAIN.ensemble_mode,
    average: str = TRAIN.average,
) -> dict:
    """Inspect, decide, train and write a run folder (see `train.run` for the steps).

    Args:
        base: a registry name or a .keras file; None only with `unlabeled`.
        out: the run folder to create; None: a new `runs/<folder name>-<N>`.
        strategy: auto, linear, partial or full (overrides the decision table).
        similarity: auto (measured), similar or different (stated).
        recipe: a shipped recipe name or a .toml path.
        unlabeled: pretrain an encoder on these images first (from `base`'s early stages when
            given), with `pretrain_settings` (see `pretrain_config`) and `greedy`.
        resume: continue the run in `out` (see `train.resume`).
        settings: how training runs beyond the recipe (`config.TrainConfig`).
        lr: the head's rate (> 0, or its text), or "auto": `lr_find`'s valley on the plan's model;
            other groups keep their ratio. Fine-tuning only; None: the recipe's. Recorded as "lr".
        ensemble, ensemble_mode, average: see `config.TrainConfig` (text accepted), `train.ensemble`.

    Returns the run's metrics (also in `out/metrics.json`).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError, SettingsError,
        ModelFileError, TrainingError.
    """
    from finetune_cli.train.ensemble import checked_settings
    from finetune_cli.train.lr_find import checked_rate
    from finetune_cli.train.run import train as run_training

    settings = checked_settings(settings, ensemble, ensemble_mode, average, resume)
    return run_training(root, base, out=out, weights=weights, image_size=image_size, similarity=similarity,
                        strategy=strategy, recipe=recipe, val_dir=val_dir, test_dir=test_dir, seed=seed,
                        resume=resume, cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size,
                        unlabeled=unlabeled, pretrain_config=pretrain_settings, greedy=greedy, config=config,
                        settings=settings, reporter=reporter, lr=checked_rate(lr))


def lr_find(
    root: str | os.PathLike,
    base: str,
    *,
    out: str | os.PathLike | None = None,
    weights: str = "imagenet",
    image_size: int | None = None,
    strategy: str = "partial",
    recipe: str | None = None,
    seed: int = 0,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    config: ScanConfig = SCAN,
    settings: TrainConfig = TRAIN,
    sweep: LrFindConfig = LR_FIND,
    reporter: Reporter = QUIET,
):
    """Sweep the head's learning rate exponentially on a fine-tuning plan's model (fastai's `lr_find`).

    The model and training batches are those `train` would fine-tune for
    `strategy` (partial or full; a `recipe` overrides it); the weights are
    restored afterwards. See `train.lr_find` for the sweep and the suggestions.

    Args:
        out: the folder to create for lr.csv (step, lr, loss, smoothed),
            lr.png and lr.json; None: a new `runs/<folder name>-lr-<N>`.
        sweep: the sweep's range, length and stopping rule (`config.LrFindConfig`).

    Returns:
        A `train.lr_find.LrFinding`: `.suggestions` (valley, steepest,
        minimum, spread, disagree), `.sweep` (rates, losses, smoothed),
        `.folder`; `.to_dict()` is JSON-able.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, RecipeError,
        OutputError, SettingsError, TrainingError.
    """
    from finetune_cli.train.lr_find import lr_find as run_sweep

    return run_sweep(root, base, out=out, weights=weights, image_size=image_size, strategy=strategy, recipe=recipe,
                     seed=seed, cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size, config=config,
                     settings=settings, sweep_config=sweep, reporter=reporter)


def pretrain(
    unlabeled: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    settings: PretrainConfig | None = None,
    init_from: str | None = None,
    init_weights: str = "imagenet",
    greedy: bool = False,
    seed: int = 0,
    reporter: Reporter = QUIET,
) -> dict:
    """Pretrain a denoising autoencoder on unlabeled images; save its encoder as a backbone file.

    Args:
        out: the encoder file to create; None: `runs/<folder name>-encoder-<N>.keras`.
        settings: from `pretrain_config(...)`; None for the defaults.
        init_from: a backbone whose early stages start the encoder.

    Returns:
        The summary also written to `<out stem>.pretrain.json` (its "encoder" is the path).

    Raises:
        FolderError, OutputError, BackboneError, WeightsUnavailableError, TrainingError.
    """
    from finetune_cli.train.pretrain import pretrain as run_pretraining

    if out is None:
        from finetune_cli.run import numbered

        out = numbered(f"{Path(unlabeled).resolve().name}-encoder", ".keras")
    return run_pretraining(unlabeled, out, config=checked_pretrain_config(settings or PRETRAIN), init_from=init_from,
                           init_weights=init_weights, greedy=greedy, seed=seed, reporter=reporter)


def pretrain_config(arch: str | None = None, noise: float | None = None, noise_type: str | None = None,
                    code_size: int | None = None, image_size: int | None = None,
                    epochs: int | None = None) -> PretrainConfig:
    """`PretrainConfig` with the given fields changed (None keeps a default), validated.

    Raises:
        SettingsError: a value out of range.
    """
    import dataclasses

    given = dict(arch=arch, noise=noise, noise_type=noise_type, code_size=code_size, image_size=image_size,
                 epochs=epochs)
    return checked_pretrain_config(dataclasses.replace(PRETRAIN, **{k: v for k, v in given.items() if v is not None}))


def checked_pretrain_config(config: PretrainConfig) -> PretrainConfig:
    """`config` if its values are in range.

    Raises:
        SettingsError: saying which value is wrong.
    """
    from finetune_cli.errors import SettingsError

    if not 0 < config.noise < 1:
        raise SettingsError(f"--noise {config.noise} must be between 0 and 1 (e.g. 0.2)")
    if config.arch not in ("conv", "mlp") or config.noise_type not in ("gaussian", "mask"):
        raise SettingsError("--arch must be conv or mlp, and --noise-type gaussian or mask")
    return config


def predict(inputs, model, *, top_k: int = 1, out=None, overwrite: bool = False,
            tta: int | str = PREDICT.tta):
    """(frame of predictions, skipped files) for image files and folders; see `predict.predict`.

    `out`: also write the frame there as CSV (refused if it exists, unless `overwrite`).
    `tta`: test-time augmentation, the probabilities averaged over this many
    deterministic views per image (1-16, or its text; 1 is off); the frame's `tta` column records it.

    Raises:
        OutputError, ModelFileError, FolderError, SettingsError (tta out of range).
    """
    from finetune_cli import predict as predicting

    return predicting.predict(inputs, model, top_k=top_k, out=out, overwrite=overwrite, tta=tta)


def evaluate(root, model, *, tta: int | str = PREDICT.tta) -> dict:
    """Accuracy, ECE and NLL, per-class metrics and confusion matrix of a run on a labelled folder.

    `tta`: as for `predict` (1-16), recorded as result["tta"].

    Raises:
        FolderError, ModelFileError, SettingsError (tta out of range).
    """
    from finetune_cli import predict as predicting

    return predicting.evaluate(root, model, tta=tta)


def diagnose(run: str | os.PathLike) -> dict:
    """A verdict on a finished run's training history, and the next step to take.

    Args:
        run: a run folder (the --out of `train`), its model.keras, or `last`.

    Returns:
        {"run", "verdict", "reason", "next_step", "evidence"}; verdict is one of `diagnose.VERDICTS`.

    Raises:
        ModelFileError: not a run, or a missing, empty or garbled history.csv.
    """
    from finetune_cli.diagnose import diagnose_run

    return diagnose_run(run).to_dict()


def tune(
    root: str | os.PathLike,
    base: str,
    *,
    out: str | os.PathLike | None = None,
    method: str = TUNE.method,
    budget: int | None = None,
    time_limit: float | None = None,
    cv: int = TUNE.cv,
    seed: int = 0,
    recipe: str | None = None,
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    config: ScanConfig = SCAN,
    settings: TuneConfig = TUNE,
    train_settings: TrainConfig = TRAIN,
    reporter: Reporter = QUIET,
) -> dict:
    """Search a plan's hyper-parameters: a linear plan's (C, feature stage, pooling, augmented views) on cached
    features, or a fine-tuning plan's (learning rate, top_lr_factor, dropout, l2, unfrozen stages, epochs).

    Linear trials are scored by one stratified cross-validation (repeated for tiny classes) on the training
    split; fine-tuning trials (successive halving over epochs, `train.tune_finetune`) by their validation
    cross-entropy on one stratified split of it. The best is trained again and scored once on the held-out
    split the search never saw (the images `train --seed seed` validates on): summary["estimate"].
    Methods: `train.search`; steps: `train.tune`.

    Args:
        out: a new search folder, or an earlier search's to continue (only new
            trials run); None: a new `runs/<folder name>-tune-<N>`.
        method: auto (grid for 1-2 varying parameters, random from 3; fine-tuning: halving), grid (linear
            only), random or halving.
        budget: trials at most (halving: first-rung candidates); None: `settings.budget`,
            or with `time_limit` alone `settings.max_trials`; fine-tuning: `settings.finetune_budget`.
        time_limit: seconds after which no new trial starts.
        cv: folds (2-100; fewer when a class has fewer images).
        recipe: the recipe whose plan is searched (linear, trouble, partial,
            partial-2, full or a .toml file); None: `linear` for a small folder,
            for a large one the recipe `train` would decide (a fine-tuning one).
        settings: the space and defaults (`config.TuneConfig`); train_settings: its val_fraction
            (and for fine-tuning trials its retries and activation cache).

    Returns:
        The summary (also out/summary.json): best, estimate (held-out accuracy,
        n_images, interval95), leaderboard, warnings (edge values), notes,
        trials, files; beside it trials.csv, best.toml (for `train --recipe`), search.png.

    Raises:
        SettingsError, FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError.
    """
    from finetune_cli.train.tune import tune as run_search

    return run_search(root, base, out=out, method=method, budget=budget, time_limit=time_limit, cv=cv, seed=seed,
                      recipe=recipe, weights=weights, image_size=image_size, batch_size=batch_size,
                      cache_dir=cache_dir, use_cache=use_cache, config=config, settings=settings,
                      train_settings=train_settings, reporter=reporter)


def distill(
    root: str | os.PathLike,
    teachers: list,
    student: str,
    *,
    out: str | os.PathLike | None = None,
    student_weights: str = "imagenet",
    unlabeled: str | os.PathLike | None = None,
    temperature: float | None = None,
    alpha: float | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    views: int | None = None,
    val_dir=None,
    test_dir=None,
    seed: int = 0,
    cache_dir=None,
    use_cache: bool = True,
    reporter: Reporter = QUIET,
) -> dict:
    """Distil teacher runs into a student trained on `root`'s class folders (`finetune distill`).

    Args:
        teachers: run folders of `finetune train`; several are averaged (probabilities).
        student: a registry name (`bases`, incl. lenet, alexnet, vgg) or a .keras file; a new head is added.
        student_weights: `imagenet`, `none` or a weights file (built-in networks: always a fresh start).
        unlabeled: a folder of images only the teachers label (the transfer set, soft loss only).
        temperature, alpha, epochs, views: None for `config.DistillConfig`'s defaults.
        image_size: the student's input side; None: the first teacher's.

    Returns:
        metrics (also RUN/metrics.json); "distill" holds distill.json: the teachers,
        the hard-label student and the distilled student, each with accuracy,
        parameters, file size and CPU ms per image.

    Raises:
        SettingsError, FolderError, BackboneError, OutputError, TrainingError.
    """
    import dataclasses

    from finetune_cli.config import DISTILL
    from finetune_cli.distill import distill as run_distillation

    settings = dataclasses.replace(DISTILL, epochs=epochs or DISTILL.epochs, views=views or DISTILL.views)
    if out is None:
        from finetune_cli.run import numbered

        out = numbered(f"{Path(root).resolve().name}-distill")
    return run_distillation(root, teachers, student, out=out, student_weights=student_weights, unlabeled=unlabeled,
                            temperature=temperature, alpha=alpha, image_size=image_size, val_dir=val_dir,
                            test_dir=test_dir, seed=seed, cache_dir=cache_dir, use_cache=use_cache,
                            settings=settings, reporter=reporter)
