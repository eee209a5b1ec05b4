"""A whole training run, as named steps that pass plain values:

    prepare   scan, split, resolve and build the backbone, open the cache  -> Context
    measure   similarity to the pretraining data (strategy.similarity)    -> Similarity
    plan      the decision table and the recipe (strategy.decide)         -> Plan
    fit       linear head or fine-tuning, both                            -> TrainResult
    calibrate temperature scaling of the kept model (train.calibrate)     -> TrainResult
              (timed with fit as "train")
    write     the run folder (runs.write.write_run)                        -> metrics
    report    RUN/report.html, best effort (runs.report_page.write_report)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from finetune_cli.analysis.diagnose import diagnose_history
from finetune_cli.analysis.multilabel import multilabel_scores
from finetune_cli.analysis.scores import scores, selection_metric
from finetune_cli.config import (FEATURES, LR_FIND, PRETRAIN, SCAN, TRAIN, LrFindConfig, PretrainConfig, ScanConfig,
                                 TrainConfig, checked_pretrain_config)
from finetune_cli.data.scan import Scan
from finetune_cli.errors import BackboneError, TrainingError
from finetune_cli.features import FeatureCache
from finetune_cli.files import shown
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.runs.folder import RunFolder, open_run
from finetune_cli.runs.report_page import write_report
from finetune_cli.runs.run import TRAINED_ON
from finetune_cli.runs.write import write_multilabel_run, write_run
from finetune_cli.runtime.devices import scope
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.strategy import similarity as sim
from finetune_cli.strategy.decide import decide, table_recipe
from finetune_cli.train.calibrate import calibrate
from finetune_cli.train.context import Context, TrainResult, all_labels, every_image
from finetune_cli.train.ensemble import checked_settings
from finetune_cli.train.linear import fit_linear_plan
from finetune_cli.train.multilabel import fit_multilabel
from finetune_cli.train.lr_sweep import apply_rate, checked_rate
from finetune_cli.train.pretrain import companion, pretrain
from finetune_cli.train.resume import already_finished, read_saved
from finetune_cli.train.session import choose, is_imbalanced, n_stages, prefetch, prefetch_fine_tuning, prepare


def train(
    root, base: str | None, *, out=None, weights: str = "imagenet", image_size: int | None = None,
    strategy: str = "auto", similarity: str = "auto", recipe: str | None = None, val_dir=None, test_dir=None,
    seed: int = 0, resume: bool = False, batch_size: int = FEATURES.batch_size, cache_dir=None,
    use_cache: bool = True, unlabeled=None, pretrain_settings: PretrainConfig | None = None, greedy: bool = False,
    config: ScanConfig = SCAN, settings: TrainConfig = TRAIN, reporter: Reporter = QUIET,
    lr: float | str | None = None, ensemble: int | str = TRAIN.ensemble, ensemble_mode: str = TRAIN.ensemble_mode,
    average: str = TRAIN.average, devices: int | str = 1, lr_config: LrFindConfig = LR_FIND,
) -> dict:
    """Inspect, decide, train and write a run folder (the steps: this module's docstring).

    Args:
        base: a registry name or a .keras file; None only with `unlabeled`. out: the run folder to create;
            None: a new `runs/<folder name>-<N>` (metrics["run_folder"]). recipe: a shipped name or a .toml.
        strategy: auto, linear, partial or full (overrides the table); similarity: auto, similar or different.
        val_dir, test_dir: labelled folders to validate on instead of a split, and to score the kept
            model on in the same process (metrics["test"], as `evaluate` returns it).
        unlabeled: first pretrain a denoising autoencoder on these images into RUN/encoder.keras (`pretrain_settings`,
            `greedy`; starting from `base`'s early stages when a base is given) and train from that encoder.
        resume: continue the run in `out` (`train.resume` checks); a finished one is left. settings: `TrainConfig`.
        lr: the head's rate (> 0, or its text), or "auto": the lr-find valley on the plan's model
            (`set_rate`); other groups keep their ratio. Fine-tuning only; None: the recipe's.
        ensemble, ensemble_mode, average: see `config.TrainConfig` (text accepted), `train.ensemble`; devices:
            fine-tune on N devices (or "all" GPUs) under a MirroredStrategy. A multi-label table: `train_multi_label`.

    Returns the run's metrics (also in `out/metrics.json`); a failure before anything worth resuming removes
    what it wrote. Raises: FolderError, BackboneError, WeightsUnavailableError, RecipeError, OutputError,
    SettingsError, ModelFileError, TrainingError.
    """
    started = time.perf_counter()
    settings, lr = checked_settings(settings, ensemble, ensemble_mode, average, resume), checked_rate(lr)
    settings = checked_start(base, unlabeled, recipe, strategy, settings)
    cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
    with scope(devices, reporter.on_note):
        run = open_run(out, root, resume, reporter)
        if resume and run.finished:
            return already_finished(run)
        saved = read_saved(run) if resume else None
        with run.guarded():
            pretrained, base, weights, image_size, similarity = encoder_start(
                run, unlabeled, base, weights, image_size, similarity, seed=seed, settings=pretrain_settings,
                greedy=greedy, config=config, reporter=reporter)
            ctx, profile, test_scan = prepare(
                run, root, base, weights=weights, image_size=image_size, saved=saved, recipe=recipe, val_dir=val_dir,
                test_dir=test_dir, seed=seed, cache=cache, batch_size=batch_size, config=config, settings=settings,
                reporter=reporter, multi_label=True)
            clock = {"prepare": time.perf_counter() - started}
            if ctx.scan.multi_label:
                return train_multi_label(ctx, profile, test_scan, (strategy, recipe, settings), clock, (ensemble, average, lr))
            plan, evidence, recipe_obj = (saved.plan, saved.evidence, saved.recipe) if saved else \
                decide_and_record(ctx, profile, similarity, strategy, recipe, pretrained, test_scan, settings)
            reporter.on_plan(plan, evidence)
            plan, lr_record = set_rate(ctx, profile, plan, recipe_obj, lr, saved, settings, lr_config)
            held_out = val_dir is not None or not settings.cross_validate
            ctx = all_labels(ctx, plan, held_out, getattr(settings, "ensemble", 1))
            clock["plan"] = time.perf_counter() - started - clock["prepare"]
            ctx, result = train_plan(ctx, profile, plan, evidence, recipe_obj, resume, settings, held_out)
            result.metrics.update(lr_record)
            clock["train"] = time.perf_counter() - started - clock["prepare"] - clock["plan"]
            return finish(ctx, result, profile, evidence, pretrained, test_scan, clock, started)


def train_multi_label(ctx: Context, profile, test_scan: Scan | None, choices: tuple, clock: dict,
                      unused: tuple = (1, "none", None)) -> dict:
    """Train a multi-label table's run: the heads (`train.multilabel`), the plan the table gives with their
    stage scores as the probe's evidence, its fine-tuning checked against the heads
    (`train.multilabel_tuning`), then the run folder (`runs.write.write_multilabel_run`).

    choices: (--strategy, --recipe or None, `TrainConfig`); clock: {"prepare": seconds so far};
    `unused`: (--ensemble, --average, --lr), which apply to single-label runs: a note names each one given.
    """
    started, (strategy, recipe, settings) = time.perf_counter() - clock["prepare"], choices
    for name, value in zip(("ensemble", "average", "lr"), unused):
        if value not in (None, 1, "1", "none", TRAIN.average):
            ctx.reporter.on_note(f"--{name} applies to single-label runs: ignored for this multi-label table")
    fitted = fit_multilabel(ctx, n_stages(ctx))
    evidence = sim.judge({row["stage"]: row["cv_mean_average_precision"] for row in fitted.candidates}, None,
                         len(ctx.train.images))
    plan, recipe_obj, notes = multi_label_plan(ctx, profile, evidence, strategy, recipe, fitted)
    ctx.reporter.on_plan(plan, evidence)
    fitted, plan, tuning = multi_label_tuning(ctx, plan, recipe_obj, fitted, settings, notes)
    for note in notes:
        ctx.reporter.on_note(note)
    clock["train"] = time.perf_counter() - started - clock["prepare"]
    header = {"run_folder": str(ctx.run.path), "data_root": str(Path(ctx.scan.source).absolute()),
              "strategy": plan.strategy, "recipe": plan.recipe, "similarity": evidence.verdict,
              "size_category": profile.size_category, "n_train": len(fitted.trained_on or ctx.train.images),
              "n_val": len(fitted.val_paths), "n_skipped": len(ctx.scan.skipped), "profile": profile_facts(profile),
              **({"fine_tuning": tuning} if tuning else {})}
    if test_scan is not None:
        ctx.reporter.on_phase(f"evaluating on {len(test_scan.images)} test images")
        header["test"] = multi_label_test(fitted, ctx, test_scan)
    ctx.reporter.on_phase(f"saving to {ctx.run.path}")
    ctx.run.write_json("plan.json", {"plan": plan.to_dict(), "similarity": evidence.to_dict(), "task": "multi-label",
                                     "candidates": fitted.candidates, "base": ctx.backbone.ref.label,
                                     "weights": ctx.backbone.ref.weights, "image_size": ctx.backbone.ref.image_size})
    timings = lambda: {**{k: round(v, 3) for k, v in clock.items()}, "total": round(time.perf_counter() - started, 3)}
    return write_multilabel_run(ctx.run, ctx.scan, fitted, ctx.backbone.ref.image_size, header, notes, timings,
                                ctx.out_of_fold and fitted.trained_on is None)


def multi_label_plan(ctx: Context, profile, evidence, strategy: str, recipe: str | None, fitted) -> tuple:
    """(Plan, Recipe, notes): the table's plan (or --strategy's, --recipe's) for the size and the measured
    similarity; a linear plan is the heads that were fitted."""
    recipe_obj, _ = recipe_files.load(recipe or table_recipe(profile.size_category, evidence.verdict, strategy))
    plan = decide(profile.size_category, evidence.verdict, n_stages(ctx), recipe_obj,
                  overridden=recipe is not None or strategy != "auto")
    stage = "final" if fitted.layer is None else str(fitted.layer)
    where = "out-of-fold probabilities" if ctx.out_of_fold else "--val-dir images' probabilities"
    notes = [f"multi-label: one sigmoid per label ({len(ctx.classes)}), C {fitted.C:g} and the {stage} stage by "
             f"{len(fitted.candidates)}-stage cross-validated mean average precision; thresholds per label by F1 "
             f"on the {where}"]
    return (linear_heads(plan, fitted) if plan.strategy == "linear" else plan), recipe_obj, notes


def linear_heads(plan, fitted, why: str = ""):
    """`plan` as the linear heads of `fitted` (a fine-tuning plan they won against: `why` joins its reason)."""
    stage = "final" if fitted.layer is None else str(fitted.layer)
    return dataclasses.replace(plan, strategy="linear", feature_stage=stage, train_stages=(), top_stages=(),
                               epochs=0, feature_views=0, augmentation="none",
                               reason=plan.reason + (f"; the linear heads were kept: {why}" if why else ""))


def multi_label_tuning(ctx: Context, plan, recipe, fitted, settings: TrainConfig, notes: list) -> tuple:
    """(the fit kept, the plan as run, metrics["fine_tuning"] or None): a fine-tuning plan run against the heads
    (`train.multilabel_tuning`), its outcome added to `notes`; a linear plan as it is."""
    if plan.strategy == "linear":
        return fitted, plan, None
    from finetune_cli.train.multilabel_tuning import fine_tune_multilabel

    kept, record = fine_tune_multilabel(ctx, plan, recipe, fitted, settings)
    if record["kept"] == "fine-tuned":
        notes.append(f"fine-tuned with binary cross-entropy: hold-out mAP {record['fine_tuned_val_map']:.3f} against "
                     f"the linear heads' {record['linear_val_map']:.3f} on {record['n_val']} images; the thresholds "
                     "and the validation scores are from those hold-out images"
                     + ("" if settings.keep_better else " (the keep rule is off: kept without the check)"))
        return kept, plan, record
    notes.append(f"{plan.strategy} fine-tuning kept the linear heads: {record['why']}")
    return fitted, linear_heads(plan, fitted, record["why"]), record


def multi_label_test(fitted, ctx: Context, test_scan: Scan) -> dict:
    """The --test-dir's multi-label scores (`analysis.multilabel.multilabel_scores`) through the kept model."""
    from finetune_cli.models.inference import probabilities

    probs, ok = probabilities(fitted.model, test_scan, ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)
    truth = test_scan.label_matrix([r for r, good in zip(test_scan.images, ok) if good], ctx.classes)
    return multilabel_scores(truth, probs[ok], fitted.thresholds, ctx.classes)


def checked_start(base: str | None, unlabeled, recipe: str | None, strategy: str, settings: TrainConfig
                  ) -> TrainConfig:
    """`settings`, once the options are known to be usable before any work: a base (or `unlabeled` to
    pretrain one), a readable recipe; a cell the user chose (`recipe`, `strategy`) skips the headroom check.

    Raises:
        BackboneError, RecipeError.
    """
    if base is None and unlabeled is None:
        raise BackboneError("--base is required (a name from `finetune bases` or a .keras file), "
                            "unless --unlabeled pretrains an encoder first")
    if recipe is not None:
        recipe_files.load(recipe)
    if recipe is not None or strategy != "auto":  # the user chose fine-tuning: no skipping it for lack of headroom
        settings = dataclasses.replace(settings, headroom_check=False)
    return settings


def decide_and_record(ctx: Context, profile, similarity: str, strategy: str, recipe: str | None,
                      pretrained: dict | None, test_scan: Scan | None, settings: TrainConfig = TRAIN):
    """Choose the plan (see `choose`) and write plan.json, recipe.toml, labels.json, skipped.csv.

    The backbone's pass is shared first where the plan is the table's to choose: a linear head's
    (`prefetch`: the probe, the head, validation and test) or a fine-tuning plan's (`prefetch_fine_tuning`).

    Returns:
        (Plan, Similarity, Recipe).
    """
    import pandas as pd

    if recipe is None and (strategy == "linear" or (strategy == "auto" and profile.size_category == "small")):
        # A linear head is all but certain: one pass now serves the probe, the head, validation and test.
        prefetch(ctx, [ctx.train, ctx.val] + ([test_scan] if test_scan else []), sim.probe_layers(n_stages(ctx)))
    elif recipe is None and strategy == "auto" and similarity == "auto" and pretrained is None:
        prefetch_fine_tuning(ctx, profile.size_category, settings)
    evidence, plan, recipe_obj, recipe_text = choose(ctx, profile, similarity, strategy, recipe,
                                                     pretrained is not None)
    ref, run = ctx.backbone.ref, ctx.run
    run.write_json("plan.json", {"plan": plan.to_dict(), "similarity": evidence.to_dict(),
                                 "base": ref.label, "weights": ref.weights, "image_size": ref.image_size,
                                 "pretrained": pretrained})
    run.write_text("recipe.toml", recipe_text)
    run.write_json("labels.json", ctx.classes)
    skipped = [{"path": shown(s.path), "reason": shown(s.reason)} for s in ctx.scan.skipped]
    run.write_frame("skipped.csv", pd.DataFrame(skipped, columns=["path", "reason"]))
    return plan, evidence, recipe_obj


def fit(ctx: Context, profile, plan, evidence, recipe, resume: bool, settings: TrainConfig,
        held_out: bool = True) -> TrainResult:
    """Train what the plan says: the linear head, or fine-tuning (refitted on the held-out images too when
    the hold-out is a split of the folder: not `held_out`, `train.finetune.refit_fine_tuned`)."""
    from finetune_cli.train.finetune import feature_rival, fit_finetune_plan

    balanced = is_imbalanced(ctx, profile)
    n = getattr(settings, "ensemble", 1)
    if plan.strategy == "linear":
        if getattr(settings, "average", "none") != "none":
            ctx.reporter.on_note(f"--average {settings.average} applies to fine-tuning; this plan is linear: ignored")
        if n > 1:
            from finetune_cli.train.ensemble import fit_linear_ensemble

            return fit_linear_ensemble(ctx, plan, evidence, n_stages(ctx), balanced, recipe, n)
        return fit_linear_plan(ctx, plan, evidence, n_stages(ctx), balanced, recipe, settings.learning_curve)
    if n > 1:
        from finetune_cli.train.ensemble import fit_finetune_ensemble

        return fit_finetune_ensemble(ctx, plan, recipe, balanced, settings)
    rival = None if resume else lambda: feature_rival(ctx, plan, evidence, n_stages(ctx), balanced, settings)
    return fit_finetune_plan(ctx, plan, recipe, balanced, resume, settings, rival=rival,
                             refit=not held_out and not resume and not ctx.out_of_fold)


def train_plan(ctx: Context, profile, plan, evidence, recipe, resume: bool, settings: TrainConfig,
               held_out: bool) -> tuple[Context, TrainResult]:
    """(context, result): the plan fitted (`fit`), a linear head a fine-tuning plan kept, refitted on every label
    (`refit_kept_head`; a kept fine-tuned model is refitted inside `fit`, and the context's `train` then
    holds the held-out images too), then calibrated (`calibrate`)."""
    result = fit(ctx, profile, plan, evidence, recipe, resume, settings, held_out)
    if "refit_fine_tuning" in result.metrics:  # the model has trained on the held-out images too
        ctx = every_image(ctx)
    ctx, result = refit_kept_head(ctx, profile, evidence, recipe, result, held_out, settings)
    return ctx, calibrate(ctx, result, settings)


def refit_kept_head(ctx: Context, profile, evidence, recipe, result: TrainResult, held_out: bool,
                  settings: TrainConfig) -> tuple[Context, TrainResult]:
    """(context, result) after a fine-tuning plan kept a linear head (metrics["kept"]: fine-tuning skipped
    before it was paid for, its pilot abandoned, or the keep rule against it): that head refitted as a
    linear plan does, on every labelled image with C by cross-validation and out-of-fold validation
    (`train.context.all_labels`), instead of the head on the 80 % that were not held out. Its features are
    already in the cache; a rival's are those its comparison chose before the pilot (`train.finetune.
    feature_rival`), not compared again. Unchanged when no linear head was kept, without a cache, or when a
    hold-out is required (`held_out`: --val-dir, or cross_validate off) or a class has too few distinct images
    to fold."""
    if result.metrics.get("kept") != "linear-head" or ctx.cache is None:  # no cache: a refit is a new pass
        return ctx, result
    stage = "best" if "candidates" in result.metrics else "final"  # the rival of `feature_rival`, or phase 1
    plan = dataclasses.replace(result.plan, strategy="linear", feature_stage=stage, feature_views=0)
    every = all_labels(ctx, plan, held_out)
    if every is ctx:
        return ctx, result
    only = result.metrics.get("features") if stage == "best" else None  # chosen before the pilot: not again
    refit = fit_linear_plan(every, plan, evidence, n_stages(every), is_imbalanced(ctx, profile), recipe,
                            settings.learning_curve, only)
    note = "the kept linear head is refitted on all labelled images (no fine-tuning needs the hold-out)"
    every.reporter.on_note(note)
    metrics = {**result.metrics, **refit.metrics, "kept": "linear-head", "refit": "all labels"}  # the refit's own win
    history = refit.history if "skipped" in result.metrics.get("pilot", {}) else result.history  # epochs run
    return every, dataclasses.replace(refit, plan=result.plan, history=history, metrics=metrics,
                                      notes=result.notes + [note])


def set_rate(ctx: Context, profile, plan, recipe, lr, saved, settings: TrainConfig, lr_config: LrFindConfig):
    """`--lr`: (plan, {"lr": record} for metrics.json, or {}), by `train.lr_sweep.apply_rate`.

    `lr` is a head rate, or "auto" (the sweep first, its valley suggestion);
    the other groups keep their ratio to the head. Nothing changes without
    `lr`, for a linear plan (a note says so), or on a resume (its saved rates).
    """
    if lr is None:
        return plan, {}
    if saved:
        ctx.reporter.on_note(f"--lr {lr} is ignored on --resume: the saved plan's rates are kept")
        return plan, {}

    plan, record = apply_rate(ctx, plan, recipe, lr, is_imbalanced(ctx, profile), settings, lr_config)
    return plan, {"lr": record} if record else {}


def finish(ctx: Context, result: TrainResult, profile, evidence, pretrained: dict | None, test_scan: Scan | None,
           clock: dict, started: float) -> dict:
    """Check the result is finite, score the test folder, and write the run folder; returns metrics.

    Raises:
        TrainingError: the model gives non-finite outputs (nothing is saved).
    """
    if not np.isfinite(result.val_probs).all():
        raise TrainingError("the trained model gives NaN or infinite outputs on the validation images: "
                            "nothing was saved; lower learning_rate in a --recipe file")
    extra = {**result.metrics, "selection_metric": selection_metric(is_imbalanced(ctx, profile))}
    if pretrained is not None:
        extra["pretrained"] = pretrained
    if test_scan is not None:
        ctx.reporter.on_phase(f"evaluating on {len(test_scan.images)} test images")
        extra["test"] = scores(*result.score(test_scan), test_scan, ctx.classes)
        extra["test_accuracy"] = extra["test"]["accuracy"]
    header = {"run_folder": str(ctx.run.path), "data_root": str(Path(ctx.scan.source or ctx.scan.root).absolute()), "strategy": result.plan.strategy, "recipe": result.plan.recipe,
              "similarity": evidence.verdict, "size_category": profile.size_category}
    counts = {"n_train": len(ctx.train.images), "n_val": len(ctx.val.images), "n_skipped": len(ctx.scan.skipped)}
    result = with_diagnosis(ctx, result, extra)
    ctx.reporter.on_phase(f"saving to {ctx.run.path}")
    ctx.run.write_text(TRAINED_ON, "".join(f"{d}\n" for d in sorted({r.digest for r in ctx.train.images})))
    timings = lambda: {**{k: round(v, 3) for k, v in clock.items()},
                       "total": round(time.perf_counter() - started, 3)}
    metrics = write_run(ctx.run, result, ctx.classes, ctx.backbone.ref.image_size,
                        {**header, **extra, **counts, "profile": profile_facts(profile)}, timings,
                        val_paths=val_paths(ctx, result))
    return with_report(ctx, metrics)


def profile_facts(profile) -> dict:
    """The dataset profile for metrics.json: `Profile.to_dict` without its path lists (skipped.csv has them)."""
    return {k: v for k, v in profile.to_dict().items() if k not in ("root", "skipped", "duplicates")}


def val_paths(ctx: Context, result: TrainResult) -> list[str] | None:
    """The validation images' absolute paths in `result.val_probs` order; None where they cannot be matched
    (an image that could not be read left the probabilities shorter than the split)."""
    images = ctx.val.images
    if len(images) != len(result.val_probs) or not np.array_equal(ctx.labels(images), result.val_labels):
        ctx.reporter.on_note("predictions_val.csv not written: the validation predictions do not match the "
                             "split's images one for one (an image could not be read)")
        return None
    return [str(ctx.val.root / r.path) for r in images]


def with_report(ctx: Context, metrics: dict) -> dict:
    """Write RUN/report.html (`runs.report_page.write_report`), best effort: the run is already saved, so a
    failure is a note (in the returned metrics too), never an error."""
    try:
        write_report(ctx.run.path)
    except Exception as exc:  # noqa: BLE001 - the saved run must survive any failure of its report
        note = f"report.html not written ({type(exc).__name__}: {exc}); `finetune report {ctx.run.path}` retries"
        ctx.reporter.on_note(note)
        metrics = {**metrics, "notes": metrics["notes"] + [note]}
    return metrics


def with_diagnosis(ctx: Context, result: TrainResult, extra: dict) -> TrainResult:
    """Judge the training history (`diagnose`) into extra["diagnosis"]; a verdict other than healthy
    becomes a note with the next step."""
    if not result.history:
        return result
    verdict = diagnose_history(result.history, classes=len(ctx.classes),
                               metric=extra.get("selection_metric", "accuracy")).to_dict()
    extra["diagnosis"] = {k: verdict[k] for k in ("verdict", "reason", "next_step")}
    if verdict["verdict"] == "healthy":
        return result
    note = f"diagnosis: {verdict['verdict']}: {verdict['reason']}; next: {verdict['next_step']}"
    ctx.reporter.on_note(note)
    return dataclasses.replace(result, notes=result.notes + [note])


def encoder_start(run: RunFolder, unlabeled, base, weights: str, image_size, similarity: str, *, seed: int,
                  settings, greedy: bool, config: ScanConfig, reporter: Reporter) -> tuple:
    """(pretrained summary or None, base, weights, image_size, similarity) to train from: with `unlabeled`,
    the encoder pretrained into RUN/encoder.keras (`pretrain_encoder`), its domain stated as similar."""
    if unlabeled is None:
        return None, base, weights, image_size, similarity
    pretrained = pretrain_encoder(run, unlabeled, base=base, weights=weights, image_size=image_size, seed=seed,
                                  config=settings, greedy=greedy, scan_config=config, reporter=reporter)
    return (pretrained, str(run.file("encoder.keras")), "imagenet", pretrained["image_size"],
            "similar" if similarity == "auto" else similarity)


def pretrain_encoder(run: RunFolder, unlabeled, *, base, weights, image_size, seed, config, greedy,
                     scan_config: ScanConfig, reporter: Reporter) -> dict:
    """Pretrain RUN/encoder.keras on the unlabeled images (or reuse it on --resume); returns its summary."""
    path = run.file("encoder.keras")
    if path.exists() and companion(path, "pretrain.json").exists():
        reporter.on_note(f"reusing the encoder pretrained earlier in {path}")
        return run.read_json(companion(path, "pretrain.json").name)

    config = checked_pretrain_config(config or PRETRAIN)
    if image_size:
        config = dataclasses.replace(config, image_size=image_size)
    return pretrain(unlabeled, path, config=config, init_from=base, init_weights=weights, greedy=greedy,
                    seed=seed, scan_config=scan_config, reporter=reporter)


