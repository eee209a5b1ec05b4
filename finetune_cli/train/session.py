"""The steps every training-like command shares (train, tune, lr-find), before anything is fitted:

    prepare             scan, split, check a resume, build the backbone        -> Context
    measure_similarity  the probe against the pretraining data                 -> Similarity
    choose              the decision table and the recipe                      -> (evidence, plan, recipe, text)

`n_stages`, `is_imbalanced`, `prefetch` and `pooled_head` are the small facts and warm-ups they share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_cli.config import SIMILARITY, ScanConfig, SimilarityConfig, TrainConfig
from finetune_cli.data.inputs import labelled_test_scan
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import Scan, scan_folder
from finetune_cli.features import FeatureCache
from finetune_cli.models.backbones import build, resolve
from finetune_cli.models.stages import find_stages
from finetune_cli.progress import Reporter
from finetune_cli.runs.folder import RunFolder
from finetune_cli.runtime.threads import one_blas_thread
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.strategy import similarity as sim
from finetune_cli.strategy.decide import decide, table_recipe
from finetune_cli.strategy.similarity import Similarity, judge, probe_layers, sample_indices
from finetune_cli.train.context import Context, split_notes, split_scan, without_overlap
from finetune_cli.train.logistic import standardised_logistic
from finetune_cli.train.resume import check_unchanged


def prepare(run: RunFolder, root, base: str, *, weights: str, image_size: int | None, saved, recipe: str | None,
            val_dir, test_dir, seed: int, cache: FeatureCache | None, batch_size: int, config: ScanConfig,
            settings: TrainConfig, reporter: Reporter, multi_label: bool = False):
    """Scan, check a resume against the saved run, split, and build the backbone.

    `multi_label`: accept a multi-label table (`data.scan.scan_table`); its context is not split: `train` and
    `val` are every image (validated out-of-fold, `Context.out_of_fold`), or `val` is --val-dir's.

    Returns:
        (Context, Profile, test Scan or None).

    Raises:
        FolderError, BackboneError, SettingsError (a resume that changed something).
    """
    reporter.on_phase("scanning")
    scan = scan_folder(root, labelled=True, config=config, multi_label=multi_label)
    profile = profile_scan(scan, config)
    ref = resolve(base, weights, image_size or (saved.image_size if saved else None), seed)
    if saved:
        check_unchanged(saved, scan.classes, ref, recipe)
    val_scan, test_scan = held_out_scans(scan, val_dir, test_dir, config, settings.drop_overlap, reporter)
    if scan.multi_label:
        train_scan, val_scan, result = scan, val_scan or scan, None
    else:
        train_scan, val_scan, result = split_scan(scan, val_scan, settings.val_fraction, seed=seed)
    for note in split_notes(scan, result):
        reporter.on_note(note)
    reporter.on_phase(f"building {ref.label} ({ref.weights} weights, {ref.image_size} px)")
    backbone = build(ref)
    ctx = Context(run, scan, train_scan, val_scan, backbone, cache, config, reporter, seed, batch_size,
                  out_of_fold=scan.multi_label and val_dir is None)
    return ctx, profile, test_scan


def held_out_scans(scan: Scan, val_dir, test_dir, config: ScanConfig, drop: bool, reporter: Reporter):
    """(--val-dir scan or None, --test-dir scan or None), each checked against `scan`'s images by content.

    Raises:
        FolderError: a folder is unusable, or shares images with the training folder and `drop` is
            False (`train.context.without_overlap`).
    """
    if scan.multi_label:  # a held-out table names the training labels, each image any number of them
        val_scan = labelled_test_scan(val_dir, list(scan.classes), config, multi_label=True) if val_dir else None
    else:
        val_scan = scan_folder(val_dir, labelled=True, config=config) if val_dir else None
    test_scan = labelled_test_scan(test_dir, list(scan.classes), config, scan.multi_label) if test_dir else None
    if val_scan is not None:
        val_scan = without_overlap(scan, val_scan, "--val-dir", drop, reporter)
    if test_scan is not None:
        test_scan = without_overlap(scan, test_scan, "--test-dir", drop, reporter)
    return val_scan, test_scan


def n_stages(ctx: Context) -> int:
    return len(find_stages(ctx.backbone.model))


def is_imbalanced(ctx: Context, profile) -> bool:
    """Whether training weights the classes (the largest is `imbalance_warn_ratio` x the smallest or more)."""
    return profile.imbalance >= ctx.config.imbalance_warn_ratio


def prefetch(ctx: Context, scans: list[Scan], layers: list, **options) -> None:
    """Fill the feature cache for every image of `scans` in one backbone pass (one trace, one pipeline).

    Later per-scan requests for these layers are then cache reads, so the
    probe, the linear head and the test scores share one forward pass.
    `options`: `features.extract_many`'s pooling, dtype and keep, per layer.
    """
    if ctx.cache is None:
        return
    seen, records = set(), []
    for scan in scans:
        for record in scan.images:
            if record.digest not in seen:
                seen.add(record.digest)
                records.append(dataclasses.replace(record, path=str(scan.root / record.path)))
    ctx.reporter.on_phase(f"features of {len(records)} images (stages {[k or 'final' for k in layers]})")
    ctx.features(Scan(Path("/"), False, (), tuple(records), ()), layers, **options)


def prefetch_fine_tuning(ctx: Context, size_category: str, settings: TrainConfig) -> None:
    """Before the probe of a `size_category` folder whose plan is the table's to choose: one backbone pass over
    the training and validation images fills the cache for the probe's stages, the final features and the
    activations at the frozen-prefix cut of the plan the table picks for similar data (`train.prefix.split`),
    so the probe, phase 1's linear head (`train.finetune`) and the stage rivals read one pass, not three.
    A plan that fine-tunes end to end after all has only written activations it does not read. Nothing is
    done without a cache, with prefix caching off, or when that plan has no frozen prefix."""
    from finetune_cli.train import prefix

    if ctx.cache is None or not settings.cache_prefix:
        return
    k = n_stages(ctx)
    plan = decide(size_category, "similar", k, recipe_files.load(table_recipe(size_category, "similar"))[0])
    cut = prefix.split(ctx.backbone.model, plan, settings.max_steps_back)
    if cut is None:
        return
    pooled = probe_layers(k)
    prefetch(ctx, [ctx.train, ctx.val], pooled + [cut.layer], pooling=("avg",) * len(pooled) + ("none",),
             dtype=("float32",) * len(pooled) + (settings.activation_dtype,), keep=(True,) * len(pooled) + (False,))


def measure_similarity(ctx: Context) -> sim.Similarity:
    """The probe of `strategy.similarity.measure` on the run's training images and cached features."""
    classifier = ctx.backbone.classifier
    head = pooled_head(classifier, ctx.backbone.model) if classifier is not None else None

    def top1(sample: Scan, final: np.ndarray) -> float:
        if head is not None:  # the classifier is average pooling + softmax on the final stage: reuse its features
            logits = final @ head[0] + head[1]
            probs = np.exp(logits - logits.max(1, keepdims=True))
            return float((probs.max(1) / probs.sum(1)).mean())
        from finetune_cli.data.pipeline import batched_images

        probs = [classifier(x, training=False).numpy().max(1) for x, _ in
                 batched_images(sample.paths(), ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)]
        return float(np.concatenate(probs).mean())

    return measure(ctx.train, n_stages(ctx), ctx.features, top1 if classifier is not None else None, ctx.seed)


def pooled_head(classifier, trunk) -> tuple | None:
    """(kernel (C, 1000), bias) when `classifier` is `trunk` -> global average pool -> Dense softmax; else None."""
    pool, dense = classifier.layers[-2:]
    same_input = getattr(pool.input, "shape", None) == getattr(trunk.output, "shape", None)
    if (type(pool).__name__ == "GlobalAveragePooling2D" and same_input
            and dense.get_config().get("activation") == "softmax" and dense.input.shape[-1] == trunk.output.shape[-1]):
        kernel, bias = dense.get_weights()
        return kernel.astype("float64"), bias.astype("float64")
    return None


def choose(ctx: Context, profile, similarity: str, strategy: str, recipe: str | None, own_encoder: bool = False):
    """Similarity evidence -> recipe -> plan: the decision `train` and `inspect --base` share.

    A forced verdict skips the measurement unless the plan needs the best
    earlier stage, which only the probe can tell. `own_encoder`: the base
    was just pretrained on this domain's unlabeled images.

    Returns:
        (Similarity, Plan, Recipe, recipe text).
    """
    if similarity == "auto":
        ctx.reporter.on_phase("measuring similarity to the pretraining data")
        evidence = measure_similarity(ctx)
    elif own_encoder and similarity == "similar":
        evidence = sim.forced(similarity, "the encoder was pretrained on unlabeled images of this domain")
    else:
        evidence = sim.forced(similarity)
    recipe_obj, recipe_text = recipe_files.load(recipe or table_recipe(profile.size_category, evidence.verdict, strategy))
    plan = decide(profile.size_category, evidence.verdict, n_stages(ctx), recipe_obj,
                  overridden=recipe is not None or strategy != "auto",
                  source="the encoder's own pretraining images" if own_encoder else "ImageNet",
                  best_stage=evidence.best_stage if evidence.stage_accuracy else None)
    if plan.feature_stage == "best" and not evidence.best_stage:
        ctx.reporter.on_phase("probing stages for the best features")
        probed = measure_similarity(ctx)
        evidence = dataclasses.replace(evidence, stage_accuracy=probed.stage_accuracy,
                                       best_stage=probed.best_stage, n_sample=probed.n_sample)
    return evidence, plan, recipe_obj, recipe_text


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Cross-validated accuracy (0-1) of a standardised logistic regression."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = int(min(3, np.bincount(labels).min()))
    if folds < 2:
        return float("nan")

    model = standardised_logistic(0.1, floor=0.0, tol=1e-3)  # unfloored, as the probe's margins were measured
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with one_blas_thread():
        return float(cross_val_score(model, features, labels, cv=cv).mean())


def measure(train, n_stages: int, features: Callable, top1: Callable | None = None, seed: int = 0,
            config: SimilarityConfig = SIMILARITY) -> Similarity:
    """Measure the evidence on a stratified sample of the distinct training images, then `judge` it.

    One file of each group of identical files is sampled: copies in two folds would inflate the probe.

    Args:
        train: the training `Scan` (labelled).
        n_stages: the backbone's stage count.
        features: (scan, layers) -> one `FeatureTable` per layer (cached features).
        top1: (scan, final) -> the pretrained classifier's mean top-1
            probability on `scan`, given its final-stage pooled features
            `final` (n, C); or None.
    """
    first = {}
    for record in train.images:
        first.setdefault(record.digest, record)
    distinct = replace(train, images=tuple(first.values()))
    labels = np.array(distinct.label_indices())
    keep = sample_indices(labels, config.sample, seed=seed)
    sample = replace(distinct, images=tuple(distinct.images[i] for i in keep))
    layers = probe_layers(n_stages)
    y = np.array(sample.label_indices())
    tables = features(sample, layers)
    accuracy = {k or n_stages: probe_accuracy(t.features, y, seed) for k, t in zip(layers, tables)}
    accuracy = {k: v for k, v in accuracy.items() if np.isfinite(v)} or {n_stages: 0.0}
    return judge(accuracy, top1(sample, tables[-1].features) if top1 else None, len(keep), config)
