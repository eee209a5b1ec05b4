"""The library API: every command of the CLI is one function here.

Functions take plain arguments, return data, and never print. Progress is
reported through optional callbacks. Errors are `finetune_cli.errors` types.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from finetune_cli.config import (FEATURES, LR_FIND, PREDICT, PRETRAIN, SCALE, SCAN, TRAIN, TUNE, LrFindConfig,
                                 PretrainConfig, ScanConfig, TrainConfig, TuneConfig, checked_pretrain_config)
from finetune_cli.data.scan import Progress, scan_folder
from finetune_cli.errors import SettingsError
from finetune_cli.progress import QUIET, Reporter


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
    from finetune_cli.tasks.plan import plan_for

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
        engine: `local`, or `ray` (`ray_engine`: model actors on the cluster at `address`, or on a
            Ray started here; `workers` actors, 0: one per CPU; `root` may also be a list file or URI).

    Returns:
        (FeatureTable, Scan); with engine `ray`, (manifest dict, skipped files).

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError, SettingsError (engine).
    """
    from finetune_cli.features import FeatureCache, check_table_path, extract, write_table
    from finetune_cli.models.backbones import resolve

    if _ray_engine(engine, address):
        from finetune_cli.scale import ray_data as ray_engine

        if out is None:
            raise SettingsError("--engine ray writes Parquet shards: give --out FOLDER (or a URI)")
        settings = dataclasses.replace(SCALE, workers=workers, batch_size=batch_size)
        return ray_engine.extract_features(root, resolve(base, weights, image_size, FEATURES.init_seed), out=str(out),
                                           overwrite=overwrite, layer=layer, pooling=pooling, address=address,
                                           settings=settings, config=config, progress=progress)
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
    devices: int | str = 1,
) -> dict:
    """Inspect, decide, train and write a run folder (see `train.run` for the steps).

    Args:
        base: a registry name or a .keras file; None only with `unlabeled`. out: the run folder to
            create; None: a new `runs/<folder name>-<N>`. recipe: a shipped recipe name or a .toml path.
        strategy: auto, linear, partial or full (overrides the decision table); similarity: auto
            (measured), similar or different (stated).
        unlabeled: pretrain an encoder on these images first (`pretrain_settings`, `greedy`).
        resume: continue the run in `out` (`train.resume`). settings: beyond the recipe (`TrainConfig`).
        lr: the head's rate (> 0, or its text), or "auto": `lr_find`'s valley on the plan's model;
            other groups keep their ratio. Fine-tuning only; None: the recipe's. Recorded as "lr".
        ensemble, ensemble_mode, average: see `config.TrainConfig` (text accepted), `train.ensemble`.
        devices: fine-tune on N devices (or "all" GPUs) under a MirroredStrategy (`train.distribute`).

    Returns the run's metrics (also in `out/metrics.json`).

    Raises: FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError, SettingsError,
        ModelFileError, TrainingError.
    """
    from finetune_cli.runtime.devices import scope
    from finetune_cli.tasks.train import train as run_training
    from finetune_cli.train.ensemble import checked_settings
    from finetune_cli.train.lr_sweep import checked_rate

    settings = checked_settings(settings, ensemble, ensemble_mode, average, resume)
    with scope(devices, reporter.on_note):
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
    from finetune_cli.tasks.lr_find import lr_find as run_sweep

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
        out: the encoder file to create; None: a new `runs/<folder name>-encoder-<N>.keras`, claimed
            at once (two pretrainings started together never share a name).
        settings: from `pretrain_config(...)`; None for the defaults.
        init_from: a backbone whose early stages start the encoder.

    Returns:
        The summary also written to `<out stem>.pretrain.json` (its "encoder" is the path).

    Raises:
        FolderError, OutputError, BackboneError, WeightsUnavailableError, TrainingError.
    """
    from finetune_cli.files import claim_numbered, drop_if_empty
    from finetune_cli.train.pretrain import pretrain as run_pretraining

    config = checked_pretrain_config(settings or PRETRAIN)
    claimed = out is None  # the default name is claimed now, as an empty file: never shared with another run
    out = claim_numbered(f"{Path(unlabeled).resolve().name}-encoder", ".keras", file=True) if claimed else out
    with drop_if_empty(out if claimed else None):  # no encoder saved: the name is given back
        return run_pretraining(unlabeled, out, config=config, init_from=init_from, init_weights=init_weights,
                               greedy=greedy, seed=seed, reporter=reporter, claimed=claimed)


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


def predict(inputs, model, *, top_k: int = 1, out=None, overwrite: bool = False,
            tta: int | str = PREDICT.tta, engine: str = SCALE.engine, address: str | None = None,
            workers: int = SCALE.workers, progress: Progress | None = None):
    """(frame of predictions, skipped files) for image files and folders; see `predict.predict`.

    `out`: also write the frame there as CSV (refused if it exists, unless `overwrite`).
    `tta`: test-time augmentation, the probabilities averaged over this many
    deterministic views per image (1-16, or its text; 1 is off); the frame's `tta` column records it.
    `engine`: `local`, or `ray`: the same rows as Parquet shards + manifest.json in the folder (or URI)
    `out`, by `workers` model actors (0: one per CPU) on the cluster at `address` or on a Ray started
    here; inputs may also be list files and URIs (see `ray_engine`). Returns (manifest dict, skipped).

    Raises:
        OutputError, ModelFileError, FolderError, SettingsError (tta out of range, engine).
    """
    from finetune_cli.tasks import predict as predicting

    if _ray_engine(engine, address):
        from finetune_cli.scale import ray_data as ray_engine

        if out is None:
            raise SettingsError("--engine ray writes Parquet shards: give --out FOLDER (or a URI)")
        return ray_engine.predict(inputs, model, out=str(out), overwrite=overwrite, top_k=top_k,
                                  tta=predicting.checked_tta(tta), address=address,
                                  settings=dataclasses.replace(SCALE, workers=workers), progress=progress)
    return predicting.predict(inputs, model, top_k=top_k, out=out, overwrite=overwrite, tta=tta)


def _ray_engine(engine: str, address: str | None) -> bool:
    """True for engine `ray` once Ray is importable.

    Raises:
        SettingsError: an unknown engine, --address without ray, or Ray not installed.
    """
    from finetune_cli.scale import ray_data as ray_engine

    if ray_engine.checked_engine(engine, address) != "ray":
        return False
    ray_engine.require_ray()
    return True


def evaluate(root, model, *, tta: int | str = PREDICT.tta, html: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict:
    """Accuracy, ECE and NLL, per-class metrics and confusion matrix of a run on a labelled folder.

    `tta`: as for `predict` (1-16), recorded as result["tta"].
    `html`: also write a self-contained page there (confusion matrix, per-class scores, the misclassified
    images as thumbnails; see `report_html.write_evaluation`), checked before any work, refused if it
    exists unless `overwrite`; result["html"] is its path.

    Raises:
        FolderError, ModelFileError, SettingsError (tta out of range), OutputError (html).
    """
    from finetune_cli.tasks import predict as predicting

    return predicting.evaluate(root, model, tta=tta, html=html, overwrite=overwrite)


def diagnose(run: str | os.PathLike) -> dict:
    """A verdict on a finished run's training history, and the next step to take.

    Args:
        run: a run folder (the --out of `train`), its model.keras, or `last`.

    Returns:
        {"run", "verdict", "reason", "next_step", "evidence"}; verdict is one of `diagnose.VERDICTS`.

    Raises:
        ModelFileError: not a run, or a missing, empty or garbled history.csv.
    """
    from finetune_cli.tasks.diagnose import diagnose_run

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
    engine: str = "local",
    address: str | None = None,
    max_concurrent: int | None = None,
) -> dict:
    """Search a plan's hyper-parameters: a linear plan's (C, feature stage, pooling, augmented views) on cached
    features, or a fine-tuning plan's (learning rate, top_lr_factor, dropout, l2, unfrozen stages, epochs).

    Linear trials are scored by one stratified cross-validation (repeated for tiny classes) on the training
    split; fine-tuning trials (successive halving over epochs, `train.tune_finetune`) by their validation
    cross-entropy on one stratified split of it. The best is trained again and scored once on the held-out
    split the search never saw (the images `train --seed seed` validates on): summary["estimate"].
    Methods: `train.search`; steps: `train.tune`.

    Args:
        out: a new search folder, or an earlier search's to continue; None: a new `runs/<folder>-tune-<N>`.
        method: auto (grid for 1-2 varying parameters, random from 3; fine-tuning: halving), grid (linear
            only), random or halving.
        budget: trials at most (halving: first-rung candidates); None: `settings.budget`,
            or with `time_limit` alone `settings.max_trials`; fine-tuning: `settings.finetune_budget`.
        time_limit: seconds after which no new trial starts. cv: folds (2-100; fewer for small classes).
        recipe: the recipe whose plan is searched (linear, trouble, partial, partial-2, full or a .toml
            file); None: `linear` for a small folder, else the recipe `train` would decide.
        settings: the space and defaults (`config.TuneConfig`); train_settings: its val_fraction
            (and for fine-tuning trials its retries and activation cache).
        engine: local, or ray: batches of trials as Ray Tune trials at `address` (`tune_ray`).

    Returns the summary (also out/summary.json): best, estimate (held-out accuracy, n_images,
    interval95), leaderboard, warnings, notes, trials, files (trials.csv, best.toml, search.png).

    Raises:
        SettingsError, FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError.
    """
    from finetune_cli.scale.ray_tune import engine as trial_engine
    from finetune_cli.tasks.tune.linear import tune as run_search

    with trial_engine(engine, address, max_concurrent) as trials:
        return run_search(root, base, out=out, method=method, budget=budget, time_limit=time_limit, cv=cv,
                          seed=seed, recipe=recipe, weights=weights, image_size=image_size, batch_size=batch_size,
                          cache_dir=cache_dir, use_cache=use_cache, config=config, settings=settings,
                          train_settings=train_settings, reporter=reporter, engine=trials)


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
    from finetune_cli.tasks.distill import distill as run_distillation

    settings = dataclasses.replace(DISTILL, epochs=epochs or DISTILL.epochs, views=views or DISTILL.views)
    return run_distillation(root, teachers, student, out=out, student_weights=student_weights, unlabeled=unlabeled,
                            temperature=temperature, alpha=alpha, image_size=image_size, val_dir=val_dir,
                            test_dir=test_dir, seed=seed, cache_dir=cache_dir, use_cache=use_cache,
                            settings=settings, reporter=reporter)


def export(
    run: str | os.PathLike,
    *,
    format: str,
    quantize: str = "none",
    out: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    check_dir: str | os.PathLike | None = None,
    calibration: int | None = None,
    min_agreement: float | None = None,
    force: bool = False,
    overwrite: bool = False,
    seed: int = 0,
) -> dict:
    """Write a run's model as keras, savedmodel, tflite or onnx into `out`, and verify the written file.

    The file takes raw RGB float32 (B, S, S, 3) in [0, 255] (preprocessing inside) and returns
    probabilities (B, k); labels.json goes beside it (and into the file: ONNX metadata_props, TFLite
    metadata, SavedModel assets). Routes per format: `export_formats`.

    Args:
        format: keras, savedmodel, tflite or onnx.
        quantize: none; tflite also fp16, dynamic, int8; onnx also int8.
        out: the folder (new, or existing: other files in it are kept); None: a new RUN/exports/F-Q-N.
        data: the folder the run was trained on: its validation split (`train --seed seed`) is the
            check set, its training part int8's representative set (`calibration` images at most).
        check_dir: a labelled folder to verify on instead.
        min_agreement: the share (0-1) of held-out images on which the file must pick the Keras model's
            top-1 class; below it the export is refused and nothing is written, unless `force`.
        None values: `config.ExportConfig`'s defaults.

    Returns:
        The report (also out/export.json): n_images, accuracy_keras, accuracy, agreement,
        max_prob_diff, ms_per_image (batch 1, CPU) of both, bytes, route, out.

    Raises:
        SettingsError, ModelFileError, FolderError, OutputError, ExportError (refused, missing runtime).
    """
    from finetune_cli.tasks.export import export_run

    return export_run(run, fmt=format, quantize=quantize, out=out, data=data, check_dir=check_dir, seed=seed,
                      overwrite=overwrite, force=force, min_agreement=min_agreement, calibration=calibration)


def report(run: str | os.PathLike, *, explain: str | None = None) -> Path:
    """(Re)build `RUN/report.html` from the files of a finished run folder alone; returns the page's path.

    Args:
        run: a run folder (the --out of `train`), or `last` (the last finished run under ./runs: `run.last_run`).
        explain: also draw `occlusion` or `gradcam` maps over the misclassified validation images
            (`explain.mistake_tiles`; loads the model); None: the files alone.

    Raises:
        ModelFileError: not a finished run folder (no readable metrics.json).
        OutputError: the page cannot be written.
    """
    from finetune_cli.errors import ModelFileError
    from finetune_cli.runs.report_page import write_report
    from finetune_cli.runs.run import last_run

    folder = last_run() if str(run) == "last" else Path(run).expanduser().absolute()
    if not folder.is_dir():
        raise ModelFileError(f"{folder} is not a run folder: `finetune report` takes the --out folder of a "
                             "finished `finetune train`")
    if explain is None:
        return write_report(folder)
    from finetune_cli.tasks.explain import mistake_tiles

    tiles = mistake_tiles(folder, explain)
    return write_report(folder, [(f"What the model looked at in its mistakes ({explain})", tiles)] if tiles else ())


def audit(
    root: str | os.PathLike,
    base: str,
    *,
    val_dir: str | os.PathLike | None = None,
    test_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    write: bool = True,
    overwrite: bool = False,
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Data problems found with `base`'s cached features (`finetune audit`; method: `audit` module).

    Args:
        val_dir, test_dir: also compared with `root` (a near-duplicate across folders is leakage).
        out: the folder for audit.csv and index.html; None: a new `runs/<folder name>-audit-N`.
        write: False returns the findings without writing anything (`inspect --base` uses it).
        overwrite: replace an earlier audit in `out` (refused without it when `out` holds files; a folder
            holding other files than audit.csv and index.html is refused even with it).

    Returns (the `audit --json` contract):
        {"folder", "base", "images": {"train": n[, "val": n][, "test": n]},
         "counts": {"label", "leakage", "duplicate", "outlier": n},
         "findings": [{"kind": label|leakage|duplicate|outlier, "path", "other_path" ("" unless a pair),
                       "given_label", "suggested_label" (label: the class predicted instead; pairs: the other
                       image's label; else ""), "score" (label: margin in (0, 1]; pairs: cosine similarity;
                       outlier: robust z)}], most suspect first within each kind,
         "skipped": [{"path", "reason"}], "settings": {...}, "files": {"csv", "html"} (empty without write)}.

    Raises:
        FolderError, BackboneError, WeightsUnavailableError, OutputError.
    """
    from finetune_cli.tasks.audit import audit as run_audit

    return run_audit(root, base, val_dir=val_dir, test_dir=test_dir, out=out, write=write, overwrite=overwrite,
                     weights=weights,
                     image_size=image_size, batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache,
                     seed=seed, progress=progress)


def patches(
    root: str | os.PathLike,
    base: str,
    *,
    layer: str | int,
    units: int | None = None,
    unit_ids: list[int] | None = None,
    top: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    weights: str = "imagenet",
    image_size: int | None = None,
    batch_size: int = FEATURES.batch_size,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> dict:
    """For each unit of `layer`, the `top` image crops (its receptive field at the argmax) that excite it most.

    Args:
        layer: a stage index or a layer name (`finetune layers --base B`).
        units: how many units (default `config.PATCHES.units`): the most active (highest mean per-image maximum).
        unit_ids: these units instead (0..C-1).
        out: the folder for patches.png, patches.csv, index.html; None: a new `runs/<folder name>-patches-N`.
        overwrite: replace an earlier patches output in `out` (refused without it when `out` holds files).

    Returns:
        {"folder", "base", "layer", "image_size", "receptive_field": {"size", "jump", "start"} (per axis),
         "units": [{"unit", "mean_max", "patches": [{"rank", "path", "activation", "y", "x",
         "box": [top, left, bottom, right]}]}], "skipped", "files"}.

    Raises:
        FolderError, BackboneError (bad layer, unsupported layer on the path), SettingsError (unit out of range),
        OutputError.
    """
    from finetune_cli.tasks.patches import patches as run_patches

    return run_patches(root, base, layer=layer, units=units, unit_ids=unit_ids, top=top, out=out, overwrite=overwrite,
                       weights=weights,
                       image_size=image_size, batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache,
                       progress=progress)


def filters(
    base: str | None = None,
    model: str | os.PathLike | None = None,
    *,
    layer: str | int,
    units: int | None = None,
    unit_ids: list[int] | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    weights: str = "imagenet",
    image_size: int | None = None,
    dream: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict:
    """Gradient-ascent pictures of `layer`'s units (`base` or a run `model`), and with `dream` a DeepDream photo.

    Args:
        units: how many (default `config.FILTERS.units`), the first ones; unit_ids: these instead.
        out: the folder for filters.png, index.html (and dream.png); None: a new `runs/<base>-filters-N`.
        overwrite: replace an earlier filters output in `out` (refused without it when `out` holds files).

    Returns:
        {"base", "layer", "image_size", "units": [{"unit", "activation", "noise_activation"}] (mean activation
        on its picture, and on uniform noise), "files": {"grid", "html"[, "dream"]}}.

    Raises:
        SettingsError (neither or both of base/model, unit out of range), BackboneError, ModelFileError,
        FolderError (an unusable --dream image), OutputError.
    """
    from finetune_cli.tasks.filters import filters as run_filters

    return run_filters(base, None if model is None else str(model), layer=layer, units=units, unit_ids=unit_ids,
                       out=out, overwrite=overwrite, weights=weights, image_size=image_size, dream_image=dream,
                       seed=seed)


def explain(run: str | os.PathLike, images: list, *, method: str = "occlusion", class_name: str | None = None,
            sanity: bool = False, out: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Heat maps of a run's decisions (occlusion or Grad-CAM) over image files or a folder, with a gallery.

    Args:
        run: a run folder, its model.keras, or `last`.
        images: files and folders; one folder of the run's class subfolders is read as labelled
            (misclassified images first in the gallery).
        class_name: map this class instead of each image's predicted one.
        sanity: also map with the head randomised; a map that barely changes is flagged.
        out: the folder for maps/, index.html, explain.json; None: a new `runs/<run>-explain-<N>`.
        overwrite: replace an earlier gallery in `out` as a whole (refused without it when `out` holds files).

    Returns:
        See `explain.explain` (rows per image, skipped files, flagged count).

    Raises:
        ModelFileError, FolderError, SettingsError, OutputError.
    """
    from finetune_cli.tasks.explain import explain as run_explain

    return run_explain(run, images, method=method, class_name=class_name, sanity=sanity, out=out, overwrite=overwrite)


def attack(run: str | os.PathLike, root: str | os.PathLike, *, eps=None, methods=None,
           out: str | os.PathLike | None = None, corruptions: bool = False, overwrite: bool = False) -> dict:
    """Accuracy of a run against adversarial budgets eps (0-255 pixel units; FGSM, PGD) on a labelled folder,
    and optionally under common corruptions; writes robustness.json, robustness.png and index.html.

    Args:
        eps, methods: comma-separated text or sequences; None: `config.AttackConfig`'s (eps 0,1,2,4,8; fgsm,pgd).
        out: the folder to write; None: a new `runs/<run>-attack-<N>`.
        overwrite: replace an earlier attack's files in `out` (refused without it when `out` holds files).

    Returns:
        See `attack.attack` (accuracy per method and eps, halving eps, warnings, corruptions).

    Raises:
        SettingsError, ModelFileError, FolderError, OutputError.
    """
    from finetune_cli.config import ATTACK
    from finetune_cli.tasks.attack import attack as run_attack

    return run_attack(run, root, eps=ATTACK.eps if eps is None else eps,
                      methods=ATTACK.methods if methods is None else methods, out=out, corruptions=corruptions,
                      overwrite=overwrite)
