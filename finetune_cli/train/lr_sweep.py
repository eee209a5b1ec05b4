"""The learning-rate sweep (fastai's `lr_find`; Keras has none): `finetune lr-find` and `train --lr auto`.

    rates     start_lr -> end_lr exponentially, one optimizer step per training batch
              (`engine.Trainer.train_step`: the engine's compiled step, every group
              scaled together, so the top and intermediate stages keep their ratio)
    smoothed  bias-corrected exponential moving average of the loss (beta 0.98);
              the sweep stops once it passes 4x its lowest value, or a loss is NaN
    restored  the model's weights afterwards, as they were before the sweep
    suggest   on the smoothed curve, without its first 10 and last 5 steps:
              valley   (the longest decreasing run, about halfway along it),
              steepest (the most negative slope against log lr),
              minimum  (the rate of the lowest loss, / 10);
              they "disagree" when the largest is more than 10x the smallest

Every number above is a field of `config.LrFindConfig`. The sweep writes
`lr.csv` (step, lr, loss, smoothed), `lr.png` and `lr.json` (the suggestions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from finetune_cli.config import LR_FIND, TRAIN, LrFindConfig, TrainConfig
from finetune_cli.errors import SettingsError, TrainingError
from finetune_cli.pages.figures import lr_figure

#: Fine-tuning strategies the sweep applies to (a linear head is not trained by gradient steps).
SWEPT = ("partial", "full")


@dataclass(frozen=True)
class LrSweep:
    """The sweep as run: one entry per step taken (n <= steps).

    Attributes:
        rates: (n,) the head's rate at each step, increasing.
        losses: (n,) each step's mean training loss on its batch.
        smoothed: (n,) bias-corrected exponential moving average of `losses`.
        stop: `end` (reached end_lr), `diverged` (smoothed > diverge_factor x
            its best) or `not finite` (a NaN or infinite loss, not recorded).
    """

    rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stop: str


@dataclass(frozen=True)
class LrSuggestions:
    """Head learning rates suggested by a sweep, and whether they agree.

    Attributes:
        valley: the rate about halfway along the longest decreasing run (used by `--lr auto`).
        steepest: the rate where the smoothed loss falls fastest against log lr.
        minimum: the rate of the lowest smoothed loss, divided by 10.
        spread: largest / smallest of the three, >= 1.
        disagree: spread > `LrFindConfig.disagree_factor`.
        index: {"valley", "steepest", "minimum"} -> the sweep step each was read at
            (for `minimum`, the step of the lowest loss itself).
    """

    valley: float
    steepest: float
    minimum: float
    spread: float
    disagree: bool
    index: dict

    def to_dict(self) -> dict:
        return {"valley": self.valley, "steepest": self.steepest, "minimum": self.minimum,
                "spread": self.spread, "disagree": self.disagree}


@dataclass(frozen=True)
class LrFinding:
    """A sweep, its suggestions, and what it was run on.

    Attributes:
        strategy, recipe: the fine-tuning plan swept.
        learning_rates: the plan's rates per group before the sweep (their
            ratios are what a chosen head rate keeps).
        folder: where lr.csv, lr.png and lr.json were written (None: not yet).
        seconds: the sweep's duration, model preparation excluded.
    """

    sweep: LrSweep
    suggestions: LrSuggestions
    strategy: str
    recipe: str
    learning_rates: dict
    config: LrFindConfig
    seconds: float
    folder: Path | None = None

    def to_dict(self) -> dict:
        """JSON-able: the suggestions, the sweep's extent, the plan swept."""
        sweep = self.sweep
        return {**self.suggestions.to_dict(), "steps": len(sweep.rates), "stop": sweep.stop,
                "first_lr": float(sweep.rates[0]), "last_lr": float(sweep.rates[-1]),
                "start_lr": self.config.start_lr, "end_lr": self.config.end_lr, "max_steps": self.config.steps,
                "disagree_factor": self.config.disagree_factor, "strategy": self.strategy, "recipe": self.recipe,
                "learning_rates": self.learning_rates, "seconds": round(self.seconds, 3),
                "folder": str(self.folder) if self.folder else None}


def checked_config(config: LrFindConfig) -> LrFindConfig:
    """`config` if its values are in range.

    Raises:
        SettingsError: saying which value is wrong.
    """
    if not 0 < config.start_lr < config.end_lr < math.inf:
        raise SettingsError(f"Expected 0 < start_lr < end_lr. Received: start_lr={config.start_lr}, "
                            f"end_lr={config.end_lr}")
    if config.steps < 2 or not 0 <= config.beta < 1 or config.diverge_factor <= 1:
        raise SettingsError(f"Expected steps >= 2, beta in [0, 1), diverge_factor > 1. Received: "
                            f"steps={config.steps}, beta={config.beta}, diverge_factor={config.diverge_factor}")
    return config


def checked_rate(value: float | str | None) -> float | str | None:
    """A `--lr` value: None (the recipe's rate), "auto", or a finite rate > 0 (also given as text).

    Raises:
        SettingsError: anything else.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None if value is None else "auto"
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0 < rate < math.inf:
        raise SettingsError(f"--lr takes auto or a learning rate > 0 (e.g. 1e-3). Received: {value!r}")
    return rate


def schedule(config: LrFindConfig = LR_FIND) -> np.ndarray:
    """(steps,) rates from start_lr to end_lr (both included), a constant ratio apart."""
    return config.start_lr * (config.end_lr / config.start_lr) ** (np.arange(config.steps) / (config.steps - 1))


def sweep(step: Callable[[object, float], float], batches: Iterable, config: LrFindConfig = LR_FIND,
          progress: Callable[[int, int], None] | None = None) -> LrSweep:
    """Take one step per batch (`batches` cycled) at each rate of `schedule`, until it ends or diverges.

    Args:
        step: (batch, head rate) -> the batch's mean loss after training on it.
        progress: called with (steps done, steps at most).
    """
    rows, average, best, stop = [], 0.0, math.inf, "end"
    for i, (rate, batch) in enumerate(zip(schedule(config), _cycle(batches))):
        loss = step(batch, float(rate))
        if not math.isfinite(loss):
            stop = "not finite"
            break
        average = config.beta * average + (1 - config.beta) * loss
        smoothed = average / (1 - config.beta ** (i + 1))
        rows.append((rate, loss, smoothed))
        best = min(best, smoothed)
        if progress:
            progress(i + 1, config.steps)
        if smoothed > config.diverge_factor * best:
            stop = "diverged"
            break
    table = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return LrSweep(table[:, 0], table[:, 1], table[:, 2], stop)


def _cycle(batches: Iterable):
    """The batches over and over (a fresh pass, reshuffled, each time round)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise TrainingError("no training batches to sweep the learning rate over")


def sweep_trainer(trainer, batches, head_rate: float, config: LrFindConfig = LR_FIND,
                  progress: Callable[[int, int], None] | None = None) -> LrSweep:
    """`sweep` on the engine's compiled step of `trainer`; its model's weights are restored afterwards.

    Args:
        trainer: an `engine.Trainer` whose head group runs at `head_rate`;
            every group is scaled by (swept rate / head_rate).
        batches: an iterable of batches matching the trainer's signature.

    The optimizers' state (moments, step count) is the sweep's; `Trainer.fit`
    makes fresh ones.
    """
    start = trainer.model.get_weights()
    try:
        return sweep(lambda batch, rate: trainer.train_step(batch, rate / head_rate), batches, config, progress)
    finally:
        trainer.model.set_weights(start)


def suggest(rates: np.ndarray, smoothed: np.ndarray, config: LrFindConfig = LR_FIND) -> LrSuggestions:
    """Valley, steepest and minimum/10 of a sweep's smoothed loss curve (see the module docstring).

    Args:
        rates: (n,) increasing rates; smoothed: (n,) the smoothed loss at each.

    Raises:
        TrainingError: fewer than 2 steps (the loss was not finite from the start).
    """
    rates, smoothed = np.asarray(rates, np.float64), np.asarray(smoothed, np.float64)
    n = len(rates)
    if n < 2:
        raise TrainingError(f"the learning-rate sweep stopped after {n} step(s): the loss was not finite from the "
                            "start, so there is no curve to read; check the images, or lower start_lr")
    low, high = config.skip_start, n - config.skip_end
    if high - low < 3:
        low, high = 0, n
    curve, logs = smoothed[low:high], np.log(rates[low:high])
    index = {"valley": low + valley_index(curve),
             "steepest": low + int(np.argmin(np.diff(curve) / np.diff(logs))),
             "minimum": low + int(np.argmin(curve))}
    values = (float(rates[index["valley"]]), float(rates[index["steepest"]]), float(rates[index["minimum"]]) / 10)
    spread = max(values) / min(values)
    return LrSuggestions(*values, spread, spread > config.disagree_factor, index)


def valley_index(losses: np.ndarray) -> int:
    """The index about halfway along the longest decreasing run of `losses` (fastai's `valley`).

    The run is the longest strictly decreasing subsequence (so one noisy
    step does not break it), starting as late as it can (a flat stretch
    before the descent is not part of it), spanning indices first..last;
    the point is first + span // 3 + span // 6 with span = last - first,
    fastai's formula.
    """
    n = len(losses)
    length, first = np.ones(n, dtype=int), np.arange(n)
    for i in range(1, n):
        higher = np.flatnonzero(losses[:i] > losses[i])
        if higher.size:
            longest = higher[length[higher] == length[higher].max()]
            j = longest[np.argmax(first[longest])]
            length[i], first[i] = length[j] + 1, first[j]
    last = int(np.argmax(length))
    span = last - first[last]
    return int(first[last] + span // 3 + span // 6)


def with_head_rate(plan, rate: float):
    """`plan` with its head at `rate` and every other group at the same ratio to it as before."""
    factor = rate / plan.learning_rates["head"]
    return replace(plan, learning_rates={k: v * factor for k, v in plan.learning_rates.items()})


def find(ctx, plan, recipe, balanced: bool, settings: TrainConfig = TRAIN, config: LrFindConfig = LR_FIND) -> LrFinding:
    """Sweep the head rate on the model and data `fit_finetune_plan` would train for `plan`.

    The model is built as fine-tuning builds it (head from the linear
    solution; cached frozen-prefix activations or images end to end) and
    trained by the engine's step; the backbone's weights are as before
    afterwards.

    Raises:
        SettingsError: a linear plan, or `config` out of range.
        TrainingError: no usable curve (see `suggest`).
    """
    from finetune_cli.train.finetune import start_fine_tuning
    from finetune_cli.train.setup import finetuner

    checked_config(config)
    if plan.strategy not in SWEPT:
        raise SettingsError(f"the learning-rate sweep needs a fine-tuning plan ({', '.join(SWEPT)}). "
                            f"Received: strategy={plan.strategy}")
    model, trainable, train_data, val_data = start_fine_tuning(ctx, plan, recipe, balanced, settings)
    trainer, _ = finetuner(trainable, plan, recipe, val_data, whole=model)
    ctx.reporter.on_phase(f"lr-find: head rate {config.start_lr:.0e} -> {config.end_lr:g} over {config.steps} steps "
                          f"at most (stages {list(plan.train_stages)} at their ratios)")
    started = time.perf_counter()
    result = sweep_trainer(trainer, train_data, plan.learning_rates["head"], config, ctx.reporter.on_progress)
    seconds = time.perf_counter() - started
    return LrFinding(result, suggest(result.rates, result.smoothed, config), plan.strategy, plan.recipe,
                     dict(plan.learning_rates), config, seconds)


def write_sweep(run, finding: LrFinding) -> LrFinding:
    """Write lr.csv (step 1-based, lr, loss, smoothed), lr.png and lr.json into `run` (a `RunFolder`), atomically."""
    import pandas as pd

    sweep_ = finding.sweep
    frame = pd.DataFrame({"step": np.arange(1, len(sweep_.rates) + 1), "lr": sweep_.rates, "loss": sweep_.losses,
                          "smoothed": sweep_.smoothed})
    run.write_frame("lr.csv", frame)
    marks = {name: (getattr(finding.suggestions, name), step) for name, step in finding.suggestions.index.items()}
    run.save_figure("lr.png", lr_figure(sweep_.rates, sweep_.losses, sweep_.smoothed, marks,
                                        finding.suggestions.spread if finding.suggestions.disagree else None))
    finding = replace(finding, folder=run.path)
    run.write_json("lr.json", finding.to_dict())
    return finding


def notes(finding: LrFinding) -> list[str]:
    """Lines for the user: the suggestions, why the sweep stopped, and a disagreement."""
    s, sweep_ = finding.suggestions, finding.sweep
    why = {"end": "reached the end rate", "diverged": f"the smoothed loss passed "
           f"{finding.config.diverge_factor:g}x its best", "not finite": "the loss became NaN or infinite"}[sweep_.stop]
    lines = [f"lr-find: {len(sweep_.rates)} steps, {sweep_.rates[0]:.1e} -> {sweep_.rates[-1]:.1e} ({why}); "
             f"suggestions: valley {s.valley:.2e}, steepest {s.steepest:.2e}, minimum/10 {s.minimum:.2e}"]
    if s.disagree:
        lines.append(f"the lr-find suggestions disagree by {s.spread:.0f}x (more than "
                     f"{finding.config.disagree_factor:g}x): the loss curve is noisy or has no clear valley; "
                     "look at lr.png before trusting the valley")
    return lines


def apply_rate(ctx, plan, recipe, lr: float | str, balanced: bool, settings: TrainConfig = TRAIN,
               config: LrFindConfig = LR_FIND):
    """`train --lr`: the plan with its head rate set (the other groups keep their ratio to it).

    Args:
        lr: a rate > 0, or "auto": sweep first (lr.csv, lr.png, lr.json into
            the run folder) and take the valley suggestion.

    Returns:
        (plan, record): record is what plan.json and metrics.json keep under
        "lr" (requested, head_rate, learning_rates, and the sweep's
        suggestions for auto), or None for a linear plan, which `--lr` does
        not apply to (a note says so, and the plan is unchanged).
    """
    if plan.strategy not in SWEPT:
        ctx.reporter.on_note(f"--lr {lr} does not apply to a {plan.strategy} plan (a linear head fitted by "
                             "logistic regression, not by gradient steps): ignored")
        return plan, None
    record: dict = {"requested": lr}
    if lr == "auto":
        finding = write_sweep(ctx.run, find(ctx, plan, recipe, balanced, settings, config))
        for line in notes(finding):
            ctx.reporter.on_note(line)
        record.update(sweep=finding.to_dict())
        lr = finding.suggestions.valley
    plan = with_head_rate(plan, lr)
    record.update(head_rate=lr, learning_rates=dict(plan.learning_rates))
    ctx.run.write_json("plan.json", {**ctx.run.read_json("plan.json"), "plan": plan.to_dict(), "lr": record})
    ctx.reporter.on_phase(f"head learning rate {lr:.2e} (--lr {record['requested']}); the other groups keep "
                          "their ratio to it")
    return plan, record


