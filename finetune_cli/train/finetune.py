"""Fitting a fine-tuning plan: the head from the linear solution, then the plan's stages.

    phase 1: logistic regression on cached final features -> the head's starting weights
    phase 2: the engine (`train.engine`) trains the head and the plan's stages
             at their own rates, on
             - cached activations of the frozen prefix, when the plan leaves the
               lower stages frozen (`train.prefix`): the prefix runs once per
               image and view, never per epoch;
             - or images end to end, when every stage trains (or no cache).

`model.keras` is always the whole network, raw pixels in: the prefix model and
the trained top share their layers with it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from finetune_cli.analysis.calibration import nll
from finetune_cli.analysis.scores import metric_value, selection_metric
from finetune_cli.data.splits import content_groups
from finetune_cli.errors import TrainingError
from finetune_cli.models.heads import classifier
from finetune_cli.models.inference import probabilities
from finetune_cli.runtime.devices import replicas
from finetune_cli.train import flips, prefix, strength
from finetune_cli.train.averaging import WeightAverage, keep_average
from finetune_cli.train.compare import METRIC_NAMES, compare_on_validation
from finetune_cli.train.context import Context, TrainResult, class_weights, every_image
from finetune_cli.train.engine import Callback, Diverged, fit_with_retries
from finetune_cli.train.curve import table_curve
from finetune_cli.train.linear import fit_linear
from finetune_cli.train.resume import load_checkpoint

BEST_WEIGHTS = "best.weights.h5"


def fit_finetune_plan(ctx: Context, plan, recipe, balanced: bool, resume: bool, settings, callbacks=(),
                      after=None, rival=None, refit: bool = False) -> TrainResult:
    """Fine-tune as the plan says (see the module docstring); retries at lr/10 when it diverges.

    Args:
        settings: a `config.TrainConfig` (retries, activation cache, `average`).
        callbacks: more engine callbacks (`train.averaging`), run after the standard ones.
        after: (result, trainable, val_data) -> TrainResult, applied before the comparison with
            the linear head (`train.ensemble` builds snapshot members there).
        rival: () -> a linear result on other features or None (`feature_rival`), called unless fine-tuning
            is skipped for lack of headroom; when it beats phase 1's head on validation, the pilot and the
            keep rule hold fine-tuning to it, and it is the run's result when fine-tuning does not beat it.
        refit: the validation images are a hold-out split from the training folder: a kept fine-tuned model
            on cached activations is then trained again on both (`refit_fine_tuned`, with
            `settings.refit_fine_tuned`).

    Raises:
        TrainingError: still diverging after `settings.max_retries` retries.
    """
    from finetune_cli.train.setup import predict_batches

    clock = [time.perf_counter()]
    model, state = _start(ctx, recipe, resume)
    cut = _cut(ctx, model, plan, settings)
    curve, metric = getattr(settings, "learning_curve", False), selection_metric(balanced)
    baseline = _fit_head(ctx, model, cut, balanced, settings, curve) if state is None else None
    plain = getattr(settings, "average", "none") == "none" and after is None and not callbacks  # no ensemble
    why = no_headroom(baseline, settings) if baseline is not None and plain and settings.headroom_check else None
    if why is not None:
        return linear_only(ctx, model, plan, baseline, why)
    baseline, rival = _bar(ctx, baseline, rival, metric)
    averager = _averager(settings)
    piloted = _piloted(baseline, averager, after, callbacks, settings, plan.epochs)
    views = Views(ctx, model, cut, recipe, balanced, settings, baseline) if piloted and _deferred(plan, cut) else None
    plan, flipped = _check_flips(ctx, plan, cut, baseline, settings) if views is None else (plan, {})
    plan, strengthened = _check_strength(ctx, plan, cut, baseline, settings)
    clock.append(time.perf_counter())
    first = plan if views is None else dataclasses.replace(plan, feature_views=0)  # the pilot's: view 0 alone
    trainable, train_data, val_data = _datasets(ctx, model, cut, first, recipe, balanced, settings)
    clock.append(time.perf_counter())
    pilot = _pilot(baseline, settings, metric) if piloted else None
    extra = list(callbacks) + ([averager] if averager else [])
    state, plan, notes, pilot = _train(ctx, model, trainable, plan, recipe, (train_data, val_data), state, settings,
                                       extra, pilot, baseline if cut is not None else None, metric, views)
    clock.append(time.perf_counter())
    flipped = views.flipped if views is not None else flipped
    averaging = _keep_average(ctx, averager, trainable, val_data, notes)
    probs, labels = predict_batches(trainable, val_data)
    score = lambda scan: probabilities(model, scan, ctx.backbone.ref.image_size, ctx.batch_size, ctx.config)
    metrics = {"train_accuracy": state.history[-1]["accuracy"], "best_epoch": state.best_epoch,
               "fine_tuning_s": _steps(clock, state, pilot, views), **averaging, **_devices(),
               **curve_of(baseline), **flipped, **strengthened}
    result = TrainResult(model, plan, state.history, probs, labels, metrics, score, notes + _slow_note(state.history))
    if after is not None:
        result = after(result, trainable, val_data)
    result = _judge(ctx, result, baseline, pilot, rival, metric, settings)
    if refit and settings.refit_fine_tuned and cut is not None and plain and result.metrics.get("kept") != "linear-head":
        result = refit_fine_tuned(ctx, model, trainable, cut, plan, recipe, balanced, settings, baseline, result)
    return result


def _steps(clock: list[float], state, pilot, views) -> dict:
    """metrics["fine_tuning_s"] from `clock` (start, after phase 1 and the checks, after the inputs, after
    training): seconds of the linear head, the inputs (with `views`, the views paid after the pilot too), the
    epochs (every pilot arm's included) and the rest (validation and checkpoints)."""
    epochs = sum(h["seconds"] for h in state.history) + (pilot.other_arms_s if pilot is not None else 0.0)
    late = views.seconds if views is not None else 0.0
    steps = {"linear_head": clock[1] - clock[0], "inputs": clock[2] - clock[1] + late, "epochs": epochs,
             "validation_and_checkpoints": clock[3] - clock[2] - epochs - late}
    return {k: round(v, 2) for k, v in steps.items()}


def _judge(ctx: Context, result: TrainResult, baseline: Baseline | None, pilot, rival, metric: str,
           settings) -> TrainResult:
    """The fine-tuned `result` as judged: the linear head (or the rival) after an abandoned `pilot`, the keep
    rule's choice (`keep_better`), or `result` itself (a resumed run, or the keep rule off)."""
    if pilot is not None:
        result = dataclasses.replace(result, metrics={**result.metrics, "pilot": pilot.record()})
        if pilot.abandoned:
            return keep_linear(ctx, result, baseline, pilot.note(), rival)
    if baseline is None:
        ctx.reporter.on_note("resumed: the linear head of the first start is not kept, so no comparison with it")
        return result
    return keep_better(ctx, result, baseline, metric, rival) if settings.keep_better else result


def refit_fine_tuned(ctx: Context, model, trainable, cut, plan, recipe, balanced: bool, settings, baseline: Baseline,
                     result: TrainResult) -> TrainResult:
    """`result` with its model trained again on the training and held-out images together (`every_image`).

    The refit starts where the held-out run started (the frozen backbone, phase 1's head), and runs the held-out
    run's best number of epochs at the rates each of them ran at, with no validation: every labelled image is
    now a training image. The hold-out has done its jobs first (early stopping, the pilot, the keep rule), and
    its probabilities from the held-out run stay the run's validation figures and calibrate the refit (they
    are out of sample; the refit's own would not be). When the refit diverges, the held-out run's model is
    kept, and the note says so. metrics["refit"] is "all labels", metrics["refit_fine_tuning"] the record.
    """
    every, epochs, started = every_image(ctx), int(result.metrics["best_epoch"]), time.perf_counter()
    kept = model.get_weights()
    ctx.backbone.model.set_weights(baseline.frozen)
    model.get_layer("classifier").set_weights([baseline.head.kernel, baseline.head.bias])
    y = every.labels(every.train.images)
    train_data, _ = prefix.datasets(every, cut, plan.feature_views, y, class_weights(y, len(ctx.classes), balanced)[y],
                                    recipe.batch_size, settings.activation_dtype, settings.activation_budget_mb,
                                    settings.activation_shift, plan.flips)
    head = plan.learning_rates["head"]
    scales = [h.get("lr_head", head) / head for h in result.history[:epochs]] or [1.0]
    ctx.reporter.on_phase(f"refit: the kept fine-tuned model trained again on all {len(y)} labelled images "
                          f"({len(ctx.val.images)} held out until now), {epochs} epoch(s) as the held-out run's best")
    try:
        _refit_epochs(trainable, model, plan, recipe, train_data, epochs, scales)
    except Diverged as exc:
        model.set_weights(kept)
        note = f"the refit on all labelled images stopped ({exc}): kept the model trained without the hold-out"
        ctx.reporter.on_note(note)
        return dataclasses.replace(result, notes=result.notes + [note])
    record = {"images": len(y), "held_out_images": len(ctx.val.images), "epochs": epochs,
              "seconds": round(time.perf_counter() - started, 2)}
    note = (f"the kept fine-tuned model is trained again on all {len(y)} labelled images for {epochs} epoch(s); "
            f"the validation figures are those of the run that held {len(ctx.val.images)} of them out")
    ctx.reporter.on_note(note)
    return dataclasses.replace(result, metrics={**result.metrics, "refit": "all labels", "refit_fine_tuning": record},
                               notes=result.notes + [note])


class _Rates(Callback):
    """Epoch e + 1 of a refit at `scales[e]` x the plan's rates (the rates the held-out run's epoch ran at)."""

    def __init__(self, scales: list[float]):
        self.scales = scales

    def on_epoch_end(self, trainer, state, logs: dict) -> None:
        state.scale = self.scales[min(logs["epoch"], len(self.scales) - 1)]
        trainer.set_scale(state.scale)


def _refit_epochs(trainable, model, plan, recipe, train_data, epochs: int, scales: list[float]) -> None:
    """`epochs` epochs of the engine on `train_data` (`setup.finetuner` without its schedule: no validation,
    early stopping or plateau decay; the NaN guard on the training loss)."""
    from finetune_cli.train.engine import LoopState
    from finetune_cli.train.setup import finetuner

    trainer, _ = finetuner(trainable, plan, recipe, (), whole=model, extra=[_Rates(scales)], schedule=False)
    trainer.fit(train_data, lambda: {}, epochs, LoopState(scale=scales[0]))


def feature_rival(ctx: Context, plan, similarity, n_stages: int, balanced: bool, settings) -> TrainResult | None:
    """The linear head fine-tuning on data unlike the pretraining data must also beat, or None.

    For a plan with similarity `different`, or one whose probe found an earlier stage at least as good as
    the final one (`earlier_stage_holds`), and `settings.feature_rival`: the trouble cell's linear
    plan (`train.linear.fit_linear_plan` with feature_stage `best`: the probe's best earlier stage,
    the probed stages together, and raw pixels, compared by cross-validated accuracy on the training
    images), fitted on cached features after phase 1 and before any fine-tuning is paid for. Final features that
    ImageNet shaped can lose to an earlier stage, or to the pixels themselves (digits: 90 % against 96 %;
    brain MRI scans, probed `similar` within the margin: stage 4 88 % against the final stage's 84 % by CV).
    """
    if not settings.feature_rival or not (plan.similarity == "different" or earlier_stage_holds(similarity)):
        return None
    from finetune_cli.train.linear import fit_linear_plan

    ctx.reporter.on_phase("linear heads on earlier stages and raw pixels: the bar fine-tuning must also beat")
    linear = dataclasses.replace(plan, strategy="linear", feature_stage="best", feature_views=0, train_stages=(),
                                 top_stages=(), epochs=0)
    return fit_linear_plan(ctx, linear, similarity, n_stages, balanced)


def earlier_stage_holds(similarity) -> bool:
    """Whether the similarity probe measured an earlier stage at least as good as the final one (its best
    stage is not the last it probed: ties go to the later stage); False for a verdict given, not measured."""
    stages = [int(k) for k in similarity.stage_accuracy]
    return bool(stages) and similarity.best_stage < max(stages)


def _bar(ctx: Context, baseline: Baseline | None, rival, metric: str):
    """(the Baseline the pilot and the keep rule compare with, the rival's result or None): the result of
    `rival()` when its validation `metric` beats phase 1's head, which is said; else phase 1's head alone."""
    rival = rival() if rival is not None and baseline is not None else None
    if rival is None:
        return baseline, None
    score = metric_value(metric, rival.val_labels, rival.val_probs.argmax(1))
    if score <= baseline.val_score(metric):
        return baseline, None
    ctx.reporter.on_note(f"the linear head on {rival.metrics['features']} scores {score:.1%} on validation against "
                         f"{baseline.val_score(metric):.1%} on the final features: fine-tuning must beat it")
    bar = Baseline(baseline.head, rival.val_probs, rival.val_labels, baseline.frozen, baseline.curve)
    return bar, rival


def _start(ctx: Context, recipe, resume: bool):
    """(whole model, LoopState): from the checkpoint, or (with a head still to fit, None) a new one."""
    if resume and ctx.run.file("checkpoint.keras").exists():
        model, state = load_checkpoint(ctx.run)
        ctx.reporter.on_note(f"resuming after epoch {state.epoch} (optimizer state starts afresh)")
        return model, state
    model = classifier(ctx.backbone.model, ctx.backbone.model.layers[-1].name, len(ctx.classes),
                       dropout=recipe.dropout, l2=recipe.l2)
    return model, None


@dataclasses.dataclass
class Baseline:
    """The linear head of phase 1, kept to compare the fine-tuned model against.

    Attributes:
        head: the `train.linear.LinearHead` on frozen final features.
        val_probs: (n_val, k) its validation probabilities; val_labels: (n_val,).
        frozen: the backbone's weights before fine-tuning (`model.get_weights()` order).
        curve: the head's learning curve (`train.curve.table_curve`), or None when not measured.
    """

    head: object
    val_probs: np.ndarray
    val_labels: np.ndarray
    frozen: list
    curve: dict | None = None

    @property
    def val_accuracy(self) -> float:
        """The linear head's accuracy (0-1) on the validation images."""
        return float((self.val_probs.argmax(1) == self.val_labels).mean())

    def val_score(self, metric: str) -> float:
        """The linear head's `metric` (`analysis.scores.metric_value`, 0-1) on the validation images."""
        return metric_value(metric, self.val_labels, self.val_probs.argmax(1))


def _cut(ctx: Context, model, plan, settings):
    """Where the frozen prefix ends (`train.prefix.split`), or None: no cache, or caching turned off."""
    return prefix.split(model, plan, settings.max_steps_back) if ctx.cache is not None and settings.cache_prefix else None


def _fit_head(ctx: Context, model, cut, balanced: bool, settings, curve: bool = False) -> Baseline:
    """Phase 1: the head's weights from logistic regression on frozen final features.

    With a prefix cut, the same backbone pass also caches the cut's activations
    of view 0 (training and validation images), so the frozen stages run once
    for the head, the comparison and fine-tuning.
    """
    ctx.reporter.on_phase("phase 1: linear head on frozen final features")
    if cut is None:
        table, val_table = (ctx.features(scan, [None])[0] for scan in (ctx.train, ctx.val))
    else:
        table, val_table = (ctx.features(scan, [None, cut.layer], pooling=("avg", "none"),
                                         dtype=("float32", settings.activation_dtype), keep=(True, False))[0]
                            for scan in (ctx.train, ctx.val))
    head = fit_linear(table.features, ctx.labels(table.records), len(ctx.classes), balanced=balanced, seed=ctx.seed,
                      groups=content_groups(r.digest for r in table.records))
    model.get_layer("classifier").set_weights([head.kernel, head.bias])
    curve = table_curve(ctx, table, head.C, balanced) if curve else None
    return Baseline(head, head.probabilities(val_table.features), ctx.labels(val_table.records),
                    ctx.backbone.model.get_weights(), curve)


def curve_of(baseline: Baseline | None) -> dict:
    """{"learning_curve": the phase-1 head's curve} for metrics, or {} (none measured, or a resumed run)."""
    return {"learning_curve": baseline.curve} if baseline is not None and baseline.curve is not None else {}


def _check_flips(ctx: Context, plan, cut, baseline: Baseline | None, settings) -> tuple:
    """(plan, {"flip_check": record} or {}): `train.flips.flip_check` on a new run whose training would flip
    images, the plan without flips when the check says a flip changes the class (plan.json says so too)."""
    if baseline is None or not settings.flip_check or not flips.needs_check(plan, cut) or not len(ctx.val.images):
        return plan, {}
    record = flips.flip_check(ctx, baseline.head, settings.flip_check_images, settings.flip_max_loss)
    ctx.reporter.on_note(record["note"])
    plan = dataclasses.replace(plan, flips=record["flips"])
    if ctx.run.file("plan.json").exists():  # a resumed run trains as this one did
        ctx.run.write_json("plan.json", {**ctx.run.read_json("plan.json"), "plan": plan.to_dict(), "flip_check": record})
    return plan, {"flip_check": record}


def _check_strength(ctx: Context, plan, cut, baseline: Baseline | None, settings) -> tuple:
    """(plan, {"augmentation_check": record} or {}): `train.strength.strength_check` on a new run that trains end
    to end with on-line augmentation, the plan at the strength the check chose (plan.json says so too)."""
    if baseline is None or not settings.strength_check or not strength.needs_check(plan, cut) or not len(ctx.val.images):
        return plan, {}
    record = strength.strength_check(ctx, baseline.head, plan.augmentation, plan.flips, settings.flip_check_images,
                                     settings.strength_max_loss)
    ctx.reporter.on_note(record["note"])
    plan = dataclasses.replace(plan, augmentation=record["augmentation"])
    if ctx.run.file("plan.json").exists():  # a resumed run trains as this one did
        ctx.run.write_json("plan.json", {**ctx.run.read_json("plan.json"), "plan": plan.to_dict(),
                                         "augmentation_check": record})
    return plan, {"augmentation_check": record}


def no_headroom(baseline: Baseline, settings) -> dict | None:
    """Why fine-tuning cannot pay here, read off the phase-1 linear head before any of it is paid for; None
    when it might. {"skipped", "note", evidence...} when either:

    - "no headroom": the head makes no validation error and reaches `settings.headroom_cv_accuracy`
      cross-validated on the training images;
    - "too few errors to measure": the head's learning curve (`train.curve`) expects it to be wrong on
      fewer validation images, even at the low end of its 95 % interval, than the keep rule needs to see
      fine-tuning win (`wins_needed`): a gain fine-tuning made could not be told from noise.
    """
    cv, n_val = baseline.head.best_cv, int(len(baseline.val_labels))
    facts = {"linear_head_cv_accuracy": cv, "linear_head_val_accuracy": baseline.val_accuracy, "n_val": n_val}
    if baseline.val_accuracy == 1.0 and np.isfinite(cv) and cv >= settings.headroom_cv_accuracy:
        return {"skipped": "no headroom", **facts, "note": (
            f"fine-tuning skipped: the linear head makes no error on the {n_val} validation images and "
            f"{cv:.1%} cross-validated accuracy on the training images (at least "
            f"{settings.headroom_cv_accuracy:.1%}), so no gain could be measured")}
    return _too_few_errors(baseline.curve, n_val, wins_needed(settings.compare_interval), facts)


def wins_needed(level: float) -> int:
    """The fewest validation images fine-tuning must turn from wrong to right (none the other way) before the
    keep rule's paired bootstrap interval at `level` (0-1) excludes 0: with b such images of n, a resample
    misses all of them with probability (1 - b/n)^n < exp(-b), which must fall below (1 - level) / 2."""
    return int(np.ceil(np.log(2 / (1 - level))))


def _too_few_errors(curve: dict | None, n_val: int, needed: int, facts: dict) -> dict | None:
    """no_headroom's second reason (see there), from the learning-curve record, or None."""
    now = next((row for row in (curve or {}).get("forecast", []) if row["multiple"] == 1.0), None)
    errors = n_val * (1 - now["low"]) if now is not None else float("inf")
    if errors >= needed:
        return None
    return {"skipped": "too few errors to measure", **facts, "expected_accuracy": now["accuracy"],
            "expected_accuracy_low": now["low"], "expected_val_errors_at_most": round(errors, 2),
            "wins_needed": needed, "curve_verdict": curve.get("verdict"), "note": (
                f"fine-tuning skipped: the linear head's learning curve expects {now['accuracy']:.1%} accuracy "
                f"(at least {now['low']:.1%} at 95 %), so it is wrong on at most {errors:.1f} of the {n_val} "
                f"validation images; the keep rule needs fine-tuning to win on {needed} of them to tell a gain "
                "from noise, so no gain could be measured")}


def linear_only(ctx: Context, model, plan, baseline: Baseline, why: dict) -> TrainResult:
    """The linear head of phase 1 as the run's result, fine-tuning skipped before it was paid for (`why`, from
    `no_headroom`)."""
    note = why["note"] + "; kept the linear head (--strategy partial or full forces fine-tuning)"
    ctx.reporter.on_note(note)
    size = ctx.backbone.ref.image_size
    score = lambda scan: probabilities(model, scan, size, ctx.batch_size, ctx.config)  # noqa: E731
    pilot = {k: v for k, v in why.items() if k != "note"}
    metrics = {"C": baseline.head.C, "kept": "linear-head", **curve_of(baseline), "pilot": pilot}
    return TrainResult(model, plan, baseline.head.scores, baseline.val_probs, baseline.val_labels, metrics, score,
                       [note])


def _piloted(baseline, averager, after, callbacks, settings, epochs: int) -> bool:
    """Whether fine-tuning runs as a pilot first: a new run (a linear head to beat), the keep rule on, a
    schedule longer than the pilot (else the keep rule alone judges), and no weight averaging, ensemble
    members or extra callbacks that ask for the whole schedule."""
    return (baseline is not None and settings.keep_better and 0 < settings.pilot_epochs < epochs
            and averager is None and after is None and not callbacks)


class Pilot(Callback):
    """Fine-tuning's first `epochs` epochs as a pilot, with the linear head of phase 1 as the bar to beat.

    After the pilot's last epoch the best epoch so far must beat the linear
    head on the same validation images as the keep rule (`keep_better`) would
    judge it: a `metric` (accuracy, or macro-F1 for imbalanced classes) higher
    by at least `tolerance` validation images (the fewest the keep rule could
    tell from noise, `wins_needed`), or, within that noise either way, a
    cross-entropy lower by `margin` (a fraction). Otherwise training stops there
    (`abandoned`) and the linear head is kept, so fine-tuning that cannot win
    costs its pilot epochs, not its schedule.
    """

    def __init__(self, baseline: Baseline, epochs: int, metric: str = "accuracy", tolerance: int = 0,
                 margin: float = 0.01):
        self.epochs, self.margin, self.metric = epochs, margin, metric
        self.slack = max(tolerance - 0.5, 0) / max(len(baseline.val_labels), 1)  # strictly fewer than tolerance
        self.bar = (baseline.val_score(metric), float(nll(baseline.val_probs, baseline.val_labels, floor=1e-7)))
        self.best = (-1.0, float("inf"))
        self.abandoned, self.arms, self.other_arms_s = False, [], 0.0  # rate arms (`_pilot_arms`)

    def on_epoch_end(self, trainer, state, logs: dict) -> None:
        if logs["epoch"] > self.epochs:  # the schedule after a pilot that won, on the same trainer
            return
        epoch = (float(logs[f"val_{self.metric}"]), float(logs["val_loss"]))
        if self.rank(epoch) > self.rank(self.best):
            self.best = epoch
        if logs["epoch"] == self.epochs and not self.wins():
            self.abandoned, state.stop = True, True

    def beats(self, epoch: tuple) -> bool:
        """Whether an epoch's (score, cross-entropy) beats the linear head (see the class docstring)."""
        (score, loss), (bar_score, bar_loss) = epoch, self.bar
        return score > bar_score + self.slack + 1e-9 or (score >= bar_score - self.slack - 1e-9
                                                          and loss < bar_loss * (1 - self.margin))

    def wins(self) -> bool:
        """Whether the best pilot epoch beats the linear head."""
        return self.beats(self.best)

    def rank(self, epoch: tuple | None = None) -> tuple:
        """A sort key of an epoch's (score, cross-entropy), by default the best one's: a winning epoch first,
        then by score, then by the lower cross-entropy."""
        epoch = self.best if epoch is None else epoch
        return self.beats(epoch), epoch[0], -epoch[1]

    def note(self) -> str:
        (score, loss), (bar_score, bar_loss) = self.best, self.bar
        return (f"fine-tuning abandoned after its {self.epochs}-epoch pilot: best validation {METRIC_NAMES[self.metric]} "
                f"{score:.1%} (cross-entropy {loss:.3f}) does not beat the linear head's {bar_score:.1%} "
                f"({bar_loss:.3f}); kept the linear head")

    def record(self) -> dict:
        """metrics["pilot"]: the bar, the pilot's best epoch, and whether it was abandoned (scores under
        "val_<metric>")."""
        key = f"val_{self.metric}"
        return {"epochs": self.epochs, "metric": self.metric, "linear_head": {key: self.bar[0], "val_loss": self.bar[1]},
                "best": {key: self.best[0], "val_loss": self.best[1]}, "abandoned": self.abandoned,
                "margin": self.margin, "score_slack": self.slack, **({"arms": self.arms} if self.arms else {})}


def _pilot(baseline: Baseline, settings, metric: str) -> Pilot:
    """A `Pilot` of `settings.pilot_epochs` epochs against `baseline`, within the keep rule's noise."""
    return Pilot(baseline, settings.pilot_epochs, metric, wins_needed(settings.compare_interval),
                 settings.tie_loss_margin)


def _train(ctx: Context, model, trainable, plan, recipe, data: tuple, state, settings, extra: list, pilot,
           arms_bar: Baseline | None, metric: str, views: "Views | None" = None):
    """(state, plan as run, notes, pilot): the engine on `data` (train, validation batches), with the `pilot`
    when there is one. When that pilot is abandoned at the planned rates (no NaN retry) and `arms_bar` is given
    (cached activations), the other rate arms are tried from the same start (`_pilot_arms`), and the best that
    beats the head goes on. With `views` (`Views`: `data` holds view 0 alone), the pilot and its arms run on
    view 0, and the cached views are paid for only when one of them goes on. What goes on after a pilot keeps
    its optimizers (`_fit`'s engine)."""
    planned, first = plan, settings.pilot_epochs if views is not None else None  # None: the whole schedule
    arms = pilot is not None and arms_bar is not None and len(settings.pilot_rate_factors) > 1
    start = trainable.get_weights() if arms else None
    state, plan, notes, engine = _fit(ctx, model, trainable, plan, recipe, *data, state, settings.max_retries,
                                      extra + ([pilot] if pilot else []), metric, epochs=first)
    whole = first is None  # the fit above ran the whole schedule (its pilot stops it when abandoned)
    if arms and pilot.abandoned and plan == planned:  # (a NaN retry already lowered the rates: no more arms)
        state, plan, notes, pilot, engine = _pilot_arms(ctx, model, trainable, start, (pilot, state, plan, notes,
                                                        engine), recipe, data, arms_bar, settings, metric)
        whole = False
    if pilot is None or pilot.abandoned or whole:
        return state, plan, notes, pilot
    plan, data = (plan, data) if views is None else views(plan, data)
    state, plan, more, _ = _fit(ctx, model, trainable, plan, recipe, *data, state, settings.max_retries, extra,
                                metric, engine=engine)
    return state, plan, notes + more, pilot


def _deferred(plan, cut) -> bool:
    """Whether the pilot runs on view 0 before the cached views are paid for: it trains on cached activations
    and the plan has augmented views (`Views`)."""
    return cut is not None and plan.feature_views > 0


class Views:
    """The cached augmented views of a plan on cached activations, paid for after a winning pilot.

    The prefix's activations of view 0 come with phase 1's backbone pass; each
    further view is one more pass over the training images (on 480 brain MRI
    scans, 2 views took 15 s against 18 s for both pilot arms). The pilot and
    its arms train on view 0 alone; when one goes on, the flip check runs
    (`_check_flips`: the views flip only where a flip keeps the class), the
    views are computed, and the rest of the schedule trains on them. A pilot
    that is abandoned costs neither.

    Attributes:
        seconds: the time the flip check and the views took (0 until called).
        flipped: {"flip_check": record} or {} (`_check_flips`).
    """

    def __init__(self, ctx: Context, model, cut, recipe, balanced: bool, settings, baseline: Baseline):
        self.ctx, self.model, self.cut, self.recipe, self.balanced = ctx, model, cut, recipe, balanced
        self.settings, self.baseline, self.seconds, self.flipped = settings, baseline, 0.0, {}

    def __call__(self, plan, data: tuple) -> tuple:
        """(plan after the flip check, (train batches over view 0 and the views, `data`'s validation batches))."""
        started = time.perf_counter()
        plan, self.flipped = _check_flips(self.ctx, plan, self.cut, self.baseline, self.settings)
        _, train_data, _ = _datasets(self.ctx, self.model, self.cut, plan, self.recipe, self.balanced, self.settings)
        self.seconds = time.perf_counter() - started
        return plan, (train_data, data[1])


def _pilot_arms(ctx: Context, model, trainable, start: list, first: tuple, recipe, data: tuple, baseline: Baseline,
                settings, metric: str):
    """(state, plan, notes, pilot, engine) of the best pilot over the rate arms, after the pilot at the plan's
    rates (`first`: its pilot, state, plan, notes and engine) was abandoned.

    On cached activations a pilot costs seconds, and the rate that fine-tunes well differs from set to set (on
    1,000 clothing photos `partial`'s head rate 1e-3 lost 4.5 points of validation accuracy in its first epoch,
    1e-4 lowered the cross-entropy at once; on 1,000 sign photos 1e-3 won). Each other arm starts from `start`
    (the weights before fine-tuning) at the first arm's rates times one of `settings.pilot_rate_factors[1:]`
    and runs the pilot's epochs; the linear head is the bar for all of them (`Pilot`). The best arm
    (`Pilot.rank`) goes on from its best epoch's weights (saved as the best-weights file) with its own
    optimizers, or, when none beats the head, is the abandoned pilot the run reports. Every arm runs the whole
    pilot: judged after one epoch, the higher rate loses where it wins after two (800 sign photos: 1e-3 at
    84.0 % against 1e-4's 89.0 % after one epoch, 97.2 % on test against 92.3 % in the end). The pilot's record
    gains "arms": each arm's head rate, epochs, best epoch, verdict and seconds.
    """
    base, arms = dict(first[2].learning_rates), [(*first, model.get_weights())]
    for factor in settings.pilot_rate_factors[1:]:
        trainable.set_weights(start)
        arm = dataclasses.replace(first[2], learning_rates={k: v * factor for k, v in base.items()})
        pilot = _pilot(baseline, settings, metric)
        state, arm, notes, engine = _fit(ctx, model, trainable, arm, recipe, *data, None, settings.max_retries,
                                         [pilot], metric, epochs=settings.pilot_epochs)
        arms.append((pilot, state, arm, notes, engine, model.get_weights()))
    pilot, state, arm, notes, engine, weights = max(arms, key=lambda a: a[0].rank())
    model.set_weights(weights)
    ctx.run.save_weights(model, BEST_WEIGHTS)  # the file the rest of the schedule restores from is this arm's
    pilot.arms = _arms_record(arms, metric)
    pilot.other_arms_s = sum(a["seconds"] for a, (p, *_) in zip(pilot.arms, arms) if p is not pilot)
    key = f"val_{metric}"
    shown = "; ".join(f"head lr {a['head_lr']:.0e}: {a['best'][key]:.1%} ({a['best']['val_loss']:.3f})"
                      for a in pilot.arms)
    verdict = f"going on at head lr {arm.learning_rates['head']:.0e}" if not pilot.abandoned else "none beats it"
    note = f"pilot arms ({settings.pilot_epochs} epochs each) against the linear head: {shown}; {verdict}"
    ctx.reporter.on_note(note)
    return state, arm, notes + [note], pilot, engine


def _arms_record(arms: list, metric: str) -> list[dict]:
    """metrics["pilot"]["arms"]: per arm (pilot, state, plan, ...) its head rate, epochs, best epoch, verdict and
    seconds."""
    key = f"val_{metric}"
    return [{"head_lr": plan.learning_rates["head"], "epochs": len(state.history),
             "best": {key: pilot.best[0], "val_loss": pilot.best[1]}, "wins": pilot.wins(),
             "seconds": round(sum(h["seconds"] for h in state.history), 2)} for pilot, state, plan, *_ in arms]


def keep_linear(ctx: Context, result: TrainResult, baseline: Baseline, note: str,
                rival: TrainResult | None = None) -> TrainResult:
    """The linear head of phase 1 (or the `rival`) as the run's model (after an abandoned pilot), with `note`
    said and kept."""
    ctx.reporter.on_note(note)
    metrics = {**result.metrics, "kept": "linear-head"}
    return _linear_result(ctx, result, baseline, metrics, result.notes + [note], rival)


def keep_better(ctx: Context, result: TrainResult, baseline: Baseline, metric: str = "accuracy",
                rival: TrainResult | None = None) -> TrainResult:
    """Keep the fine-tuned model only if it beats the linear head on the same validation images.

    Better means a higher validation `metric` (accuracy, or macro-F1 for imbalanced
    classes) beyond noise, or a score within noise and a cross-entropy lower by `tie_loss_margin`; otherwise the
    linear head on the original frozen features
    is kept (it is simpler, and fine-tuning that does not win is noise or
    overfitting). Both scores, the paired bootstrap interval of the accuracy
    difference and the choice go into metrics["comparison"] and a note. With a
    `rival` (`_bar`), `baseline` holds its validation probabilities and the rival is kept instead.
    """
    comparison = compare_on_validation(result.val_probs, result.val_labels, baseline.val_probs,
                                       baseline.val_labels, seed=ctx.seed, metric=metric)
    ctx.reporter.on_note(comparison["note"])
    metrics = {**result.metrics, "comparison": comparison, "kept": comparison["kept"]}
    notes = result.notes + [comparison["note"]]
    if comparison["kept"] == "fine-tuned":
        return dataclasses.replace(result, metrics=metrics, notes=notes)
    return _linear_result(ctx, result, baseline, metrics, notes, rival)


def _linear_result(ctx: Context, result: TrainResult, baseline: Baseline, metrics: dict, notes: list,
                   rival: TrainResult | None = None) -> TrainResult:
    """`result` with the linear head on the original frozen features (or the `rival`) as its model (the
    fine-tuned one dropped)."""
    ctx.backbone.model.set_weights(baseline.frozen)  # the fine-tuned model shares these layers; it is dropped
    if rival is not None:
        metrics = {**metrics, **{k: rival.metrics[k] for k in ("C", "features", "candidates") if k in rival.metrics},
                   "train_accuracy_fine_tuned": metrics.pop("train_accuracy"), "train_accuracy": rival.metrics["train_accuracy"]}
        return dataclasses.replace(rival, plan=result.plan, history=result.history, metrics=metrics, notes=notes)
    head = baseline.head
    model = classifier(ctx.backbone.model, ctx.backbone.model.layers[-1].name, len(ctx.classes),
                       kernel=head.kernel, bias=head.bias)
    size = ctx.backbone.ref.image_size
    score = lambda scan: probabilities(model, scan, size, ctx.batch_size, ctx.config)  # noqa: E731
    metrics.update(C=head.C, train_accuracy_fine_tuned=metrics.pop("train_accuracy"))
    return dataclasses.replace(result, model=model, val_probs=baseline.val_probs, val_labels=baseline.val_labels,
                               metrics=metrics, score=score, notes=notes)


def _datasets(ctx: Context, model, cut, plan, recipe, balanced: bool, settings):
    """(the model the engine trains, train batches, validation batches): on cached activations or images."""
    from finetune_cli.data.pipeline import augmenter, labelled_batches

    y_train, y_val = ctx.labels(ctx.train.images), ctx.labels(ctx.val.images)
    weights = class_weights(y_train, len(ctx.classes), balanced)[y_train]
    if cut is not None:
        train_data, val_data = prefix.datasets(ctx, cut, plan.feature_views, y_train, weights, recipe.batch_size,
                                               settings.activation_dtype, settings.activation_budget_mb,
                                               settings.activation_shift, plan.flips)
        return cut.top, train_data, val_data
    if plan.train_stages and min(plan.train_stages) > 1:
        ctx.reporter.on_note("the frozen stages run every epoch (" + ("--no-cache" if ctx.cache is None else
                             "no clean cut below the trained stages") + ")")
    size = ctx.backbone.ref.image_size
    train_data = labelled_batches(ctx.train.paths(), y_train, weights, size, recipe.batch_size,
                                  shuffle_seed=ctx.seed, augment=augmenter(plan.augmentation, plan.flips), config=ctx.config)
    val_data = labelled_batches(ctx.val.paths(), y_val, np.ones(len(y_val)), size, recipe.batch_size,
                                config=ctx.config)
    return model, train_data, val_data


def _averager(settings):
    """A `train.averaging.WeightAverage` for `settings.average` swa or ema, else None."""
    if getattr(settings, "average", "none") == "none":
        return None

    return WeightAverage(settings.average)


def _keep_average(ctx: Context, averager, trainable, val_data, notes: list) -> dict:
    """{"averaging": record} after `train.averaging.keep_average` (its note added), or {} without averaging."""
    if averager is None:
        return {}

    record, note = keep_average(averager, trainable, val_data)
    notes.append(note)
    ctx.reporter.on_note(note)
    return {"averaging": record}


def _fit(ctx: Context, model, trainable, plan, recipe, train_data, val_data, state, retries: int, extra=(),
         metric: str = "accuracy", epochs: int | None = None, engine: tuple | None = None):
    """Run the engine with checkpoints, the NaN policy and `extra` callbacks to epoch `epochs` (default the plan's);
    returns (state, plan as run, notes, engine). `engine` ((trainer, validate) an earlier call returned, with its
    `state`) goes on with that trainer's optimizers and callbacks."""
    from finetune_cli.train.setup import finetuner

    notes: list[str] = []
    base_rates = dict(plan.learning_rates)

    def checkpoint(_, state, improved: bool):
        if improved:
            ctx.run.save_weights(model, BEST_WEIGHTS)
        ctx.run.save_model(model, "checkpoint.keras")
        ctx.run.write_json("state.json", dataclasses.asdict(state))

    def restore_best(_):
        ctx.reporter.on_note(f"restoring the best epoch's weights from {BEST_WEIGHTS}")
        model.load_weights(ctx.run.file(BEST_WEIGHTS))

    def retry(exc, factor):
        nonlocal plan
        plan = dataclasses.replace(plan, learning_rates={k: v * factor for k, v in base_rates.items()})
        notes.append(f"{exc}: learning rate too high; retrying at lr/10 (head {plan.learning_rates['head']:.2g})")
        ctx.reporter.on_note(notes[-1])
        _announce(ctx, plan)

    trainer, validate = engine or finetuner(trainable, plan, recipe, val_data, checkpoint=checkpoint,
                                            restore_best=restore_best, whole=model, extra=extra, metric=metric,
                                            progress=lambda s, total: ctx.reporter.on_epoch(s.history[-1], total))
    _announce(ctx, plan)
    try:
        state = fit_with_retries(trainer, train_data, validate, epochs or plan.epochs, state, retries=retries,
                                 on_retry=retry)
    except Diverged as exc:
        raise TrainingError(f"{exc} even at head lr {plan.learning_rates['head']:.2g}: the learning rate "
                            "is too high or the data is broken; lower learning_rate in a --recipe file") from None
    return state, plan, notes, (trainer, validate)


def _announce(ctx: Context, plan) -> None:
    rates = plan.learning_rates
    ctx.reporter.on_phase(f"phase 2: fine-tuning stages {list(plan.train_stages)} (head lr {rates['head']:.2g}, "
                          f"top {rates['top']:.2g}, intermediate {rates['intermediate']:.2g})")


def _devices() -> dict:
    """{"devices": n} when the engine's steps ran on n > 1 replicas (`train --devices`, `runtime.devices`), else {}."""
    n = replicas()
    return {"devices": n} if n > 1 else {}


def _slow_note(history: list[dict]) -> list[str]:
    """A note when the validation loss barely moved (the rate may be too low)."""
    if len(history) >= 2 and history[0]["val_loss"] > 0:
        moved = (history[0]["val_loss"] - min(h["val_loss"] for h in history)) / history[0]["val_loss"]
        if abs(moved) < 0.01 and history[-1]["accuracy"] < 0.9:
            return ["validation loss barely moved: the learning rate may be too low for this data"]
    return []


def start_fine_tuning(ctx: Context, plan, recipe, balanced: bool, settings):
    """What `fit_finetune_plan` trains in a new run, built the same way, for the learning-rate sweep.

    The head from the linear solution (phase 1), then the engine's inputs:
    cached frozen-prefix activations or images end to end (`_datasets`).

    Returns:
        (whole model: raw pixels -> probabilities, the model the engine trains
        (the whole one or its top above the cut), train batches, validation
        batches), batches of (inputs float32, labels int32 (B,), weights float32 (B,)).
    """
    model, _ = _start(ctx, recipe, resume=False)
    cut = _cut(ctx, model, plan, settings)
    _fit_head(ctx, model, cut, balanced, settings)
    trainable, train_data, val_data = _datasets(ctx, model, cut, plan, recipe, balanced, settings)
    return model, trainable, train_data, val_data
