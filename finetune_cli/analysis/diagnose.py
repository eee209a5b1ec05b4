"""A finished run's training history read back into a verdict and the next step to take.

Fine-tuning runs (history.csv: one row per epoch with epoch, loss, accuracy,
val_loss, val_accuracy, and lr_head when the engine wrote it) are judged by
the first rule that matches, thresholds from `DiagnoseConfig`; k is the number
of classes and ln(k) the cross-entropy of a uniform guess (chance level):

    verdict       evidence
    diverged      a loss is NaN or infinite; or the NaN guard lowered the rate
                  (plan.json's head rate above the one the history ran at); or a
                  training loss above `blowup` x ln(k); or a last training loss
                  above `end_rise` x the first
    too-low       (>= `min_epochs` epochs) the training loss fell by less than
                  `min_progress` of its first value, and the last training
                  accuracy is below `too_low_accuracy`
    overfitting   (>= `min_epochs` epochs) the last validation loss is
                  `overfit_rise` above its minimum at an earlier epoch, the
                  training loss fell since that epoch, and training accuracy
                  beats validation accuracy by `overfit_gap` at the end
    underfitting  the last training loss and the lowest validation loss are
                  both at least `underfit_loss` x ln(k)
    healthy       none of these

Linear-head runs (history.csv: one row per C tried, with C and cv_accuracy):

    underfitting  the best cross-validated accuracy is below
                  chance + `linear_underfit_skill` x (1 - chance), chance = 1/k
    linear        the best C is on an edge of the grid, beating its neighbour
                  by `linear_edge_margin`: the grid's end decided, so say which
                  end and what it means
    healthy       otherwise

k comes from metrics.json (`classes`) or labels.json; without either it is
estimated from the loss scale as exp(first validation loss), rounded, within
[2, `max_estimated_classes`], and the evidence says so (`classes_estimated`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from finetune_cli.analysis.scores import best_c
from finetune_cli.config import DIAGNOSE, DiagnoseConfig

#: Every verdict `Diagnosis.verdict` can hold.
VERDICTS = ("healthy", "diverged", "too-low", "overfitting", "underfitting", "linear")
#: Columns of a fine-tuning history (per epoch), and of a linear-head one (per C).
EPOCH_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
LINEAR_COLUMNS = ("C", "cv_accuracy")


@dataclass(frozen=True)
class Diagnosis:
    """A verdict on a run's history.

    Attributes:
        verdict: one of `VERDICTS`.
        reason: the evidence in words, with numbers.
        next_step: what to change next, naming the option or recipe field.
        evidence: the numbers the rules used (JSON-able; None where unknown).
        run: the run folder diagnosed (None for `diagnose_history`).
    """

    verdict: str
    reason: str
    next_step: str
    evidence: dict = field(default_factory=dict)
    run: str | None = None

    def to_dict(self) -> dict:
        """{run, verdict, reason, next_step, evidence}: the `diagnose --json` contract."""
        return {"run": self.run, **{k: v for k, v in asdict(self).items() if k != "run"}}


def diagnose_history(history: list[dict], *, classes: int | None = None, planned_lr: float | None = None,
                     used_lr: float | None = None, config: DiagnoseConfig = DIAGNOSE,
                     metric: str = "accuracy") -> Diagnosis:
    """Judge a training history (see the module docstring for the rules).

    Args:
        history: one dict per epoch (keys `EPOCH_COLUMNS`, optionally lr_head)
            or per C (keys `LINEAR_COLUMNS`), as history.csv holds; numbers,
            NaN or inf allowed in losses.
        classes: k, the number of classes (>= 2); None estimates it.
        planned_lr: the head's learning rate the plan asked for (plan.json).
        used_lr: the head's rate the history ran at; None: its first lr_head.
        metric: what the run chose by (metrics.json's selection_metric): with "macro_f1" (imbalanced
            classes) a linear history is judged on its cv_macro_f1 column, when it has one.

    Raises:
        ValueError: an empty history, or rows with neither set of columns.
    """
    if not history:
        raise ValueError("Expected at least one history row. Received: history=[]")
    if all(key in history[0] for key in LINEAR_COLUMNS):
        return _linear(history, classes, config, metric)
    missing = [key for key in EPOCH_COLUMNS if key not in history[0]]
    if missing:
        raise ValueError(f"Expected history rows with {EPOCH_COLUMNS} or {LINEAR_COLUMNS}. "
                         f"Received: keys={sorted(history[0])}")
    if used_lr is None and finite(history[0].get("lr_head")):
        used_lr = float(history[0]["lr_head"])
    facts = _epoch_facts(history, classes, planned_lr, used_lr, config)
    for rule in (_diverged, _too_low, _overfitting, _underfitting):
        found = rule(facts, config)
        if found is not None:
            return found
    return _healthy(facts)


# ---------------------------------------------------------------- reading a run folder


# ---------------------------------------------------------------- fine-tuning histories


def _epoch_facts(history: list[dict], classes: int | None, planned_lr, used_lr, config: DiagnoseConfig) -> dict:
    """The numbers the rules read (JSON-able), from the epochs before any non-finite loss."""
    cut = next((i for i, row in enumerate(history) if not (finite(row["loss"]) and finite(row["val_loss"]))),
               len(history))
    rows, bad = history[:cut], history[cut] if cut < len(history) else None
    estimated = classes is None
    if estimated:
        first = history[0]["val_loss"]
        guess = round(math.exp(min(first, 50.0))) if finite(first) else 2
        classes = int(min(max(guess, 2), config.max_estimated_classes))
    facts = {"epochs": len(history), "classes": classes, "classes_estimated": estimated,
             "chance_loss": math.log(classes), "learning_rate": used_lr, "planned_learning_rate": planned_lr,
             "retried": bool(planned_lr and used_lr and used_lr < planned_lr * (1 - 1e-6)),
             "non_finite_epoch": int(bad["epoch"]) if bad is not None else None,
             "non_finite": None if bad is None else ("loss" if not finite(bad["loss"]) else "validation loss")}
    if not rows:
        return facts
    losses, val_losses = [float(r["loss"]) for r in rows], [float(r["val_loss"]) for r in rows]
    top, best = losses.index(max(losses)), val_losses.index(min(val_losses))
    facts.update(first_loss=losses[0], last_loss=losses[-1], min_loss=min(losses), max_loss=losses[top],
                 max_loss_epoch=int(rows[top]["epoch"]), min_val_loss=val_losses[best],
                 best_epoch=int(rows[best]["epoch"]), loss_at_best=losses[best], last_val_loss=val_losses[-1],
                 last_epoch=int(rows[-1]["epoch"]), train_accuracy=float(rows[-1]["accuracy"]),
                 val_accuracy=float(rows[-1]["val_accuracy"]), best_rows=best, n_rows=len(rows))
    return facts


def _diverged(f: dict, config: DiagnoseConfig) -> Diagnosis | None:
    """NaN or inf; the NaN guard lowered the rate; a blown-up loss; a loss that ended above its start."""
    found = []
    if f["non_finite_epoch"] is not None:
        found.append(f"the {f['non_finite']} became NaN or infinite at epoch {f['non_finite_epoch']}")
    if f["retried"]:
        found.append(f"the NaN guard cut the head's learning rate from {f['planned_learning_rate']:.2g} to "
                     f"{f['learning_rate']:.2g} after a NaN loss (this history is the retry's)")
    blown = "max_loss" in f and f["max_loss"] > config.blowup * f["chance_loss"]
    if blown:
        found.append(f"training loss reached {_num(f['max_loss'])} at epoch {f['max_loss_epoch']}, "
                     f"{f['max_loss'] / f['chance_loss']:.3g} times the chance level {_chance(f)}")
    if ("last_loss" in f and f["n_rows"] > 1 and f["last_loss"] > config.end_rise * f["first_loss"]
            and f["last_loss"] > config.end_rise_floor * f["chance_loss"]):
        found.append(f"training loss ended at {_num(f['last_loss'])}, "
                     f"{f['last_loss'] / f['first_loss']:.3g} times its start {_num(f['first_loss'])}")
    if not found:
        return None
    lr = f["learning_rate"]
    if f["retried"] and len(found) == 1:
        step = (f"learning rate too high: start at the rate the retry trained at (learning_rate = {lr:.2g} "
                "in a --recipe file), or lower")
    else:
        step = "learning rate too high: divide it by 10 (" + (f"learning_rate = {lr / 10:.2g}" if lr else
                                                              "learning_rate") + " in a --recipe file)"
    return Diagnosis("diverged", "; ".join(found), step, _public(f))


def _too_low(f: dict, config: DiagnoseConfig) -> Diagnosis | None:
    """The training loss hardly fell while the training accuracy had room to grow."""
    if f["n_rows"] < config.min_epochs or f["first_loss"] <= 0:
        return None
    progress = (f["first_loss"] - f["min_loss"]) / f["first_loss"]
    if progress >= config.min_progress or f["train_accuracy"] >= config.too_low_accuracy:
        return None
    lr = f["learning_rate"]
    reason = (f"training loss fell only {progress:.1%} ({_num(f['first_loss'])} -> {_num(f['min_loss'])} at best) "
              f"over {f['n_rows']} epochs while training accuracy is {f['train_accuracy']:.0%}")
    step = "learning rate too low: multiply it by 10 (" + (f"learning_rate = {lr * 10:.2g}" if lr else
                                                            "learning_rate") + " in a --recipe file)"
    return Diagnosis("too-low", reason, step, {**_public(f), "progress": progress})


def _overfitting(f: dict, config: DiagnoseConfig) -> Diagnosis | None:
    """Validation loss rose from an earlier minimum while the training loss kept falling, with an accuracy gap."""
    if f["n_rows"] < config.min_epochs or f["best_rows"] == f["n_rows"] - 1:
        return None
    rise = (f["last_val_loss"] - f["min_val_loss"]) / max(f["min_val_loss"], 1e-12)
    gap = f["train_accuracy"] - f["val_accuracy"]
    if rise < config.overfit_rise or f["last_loss"] >= f["loss_at_best"] or gap < config.overfit_gap:
        return None
    reason = (f"validation loss rose from {_num(f['min_val_loss'])} (epoch {f['best_epoch']}) to "
              f"{_num(f['last_val_loss'])} (epoch {f['last_epoch']}) while training loss fell "
              f"{_num(f['loss_at_best'])} -> {_num(f['last_loss'])}; accuracy training {f['train_accuracy']:.0%} "
              f"vs validation {f['val_accuracy']:.0%}")
    step = (f"overfitting: fewer epochs (epochs = {f['best_epoch']} in a --recipe file), stronger regularisation "
            "(dropout, l2), more augmented views (feature_views, augmentation), or a frozen-feature strategy "
            "(--strategy linear)")
    return Diagnosis("overfitting", reason, step, {**_public(f), "val_loss_rise": rise, "accuracy_gap": gap})


def _underfitting(f: dict, config: DiagnoseConfig) -> Diagnosis | None:
    """Training and validation loss both stayed near a uniform guess's."""
    level = config.underfit_loss * f["chance_loss"]
    if f["last_loss"] < level or f["min_val_loss"] < level:
        return None
    reason = (f"training loss ends at {_num(f['last_loss'])} and validation loss is at best "
              f"{_num(f['min_val_loss'])}: {f['last_loss'] / f['chance_loss']:.0%} and "
              f"{f['min_val_loss'] / f['chance_loss']:.0%} of the chance level {_chance(f)}; accuracy training "
              f"{f['train_accuracy']:.0%}, validation {f['val_accuracy']:.0%} (chance {1 / f['classes']:.0%})")
    step = ("underfitting: train more stages (--recipe partial-2 or full), more epochs, or a higher learning rate "
            "(learning_rate in a --recipe file)")
    return Diagnosis("underfitting", reason, step, _public(f))


def _healthy(f: dict) -> Diagnosis:
    reason = (f"validation loss fell to {_num(f['min_val_loss'])} at epoch {f['best_epoch']} of {f['last_epoch']} "
              f"(training loss {_num(f['first_loss'])} -> {_num(f['last_loss'])}); accuracy training "
              f"{f['train_accuracy']:.0%}, validation {f['val_accuracy']:.0%}")
    step = ("nothing to fix: use the run (`finetune predict IMAGES --model RUN`, `finetune evaluate FOLDER "
            "--model RUN`); for more accuracy, add images or try a larger --base")
    return Diagnosis("healthy", reason, step, _public(f))


# ---------------------------------------------------------------- linear-head histories


def _linear(history: list[dict], classes: int | None, config: DiagnoseConfig, metric: str = "accuracy") -> Diagnosis:
    """Judge the cross-validation curve over C (best C chosen as `train.linear.fit_linear` does), on the
    column of `metric` when every row has it (else cv_accuracy)."""
    column = f"cv_{metric}" if all(_finite_text(r.get(f"cv_{metric}")) for r in history) else "cv_accuracy"
    name = "macro-F1" if column == "cv_macro_f1" else "accuracy"
    rows = sorted(((float(r["C"]), float(r[column])) for r in history), key=lambda r: r[0])
    loss = {float(r["C"]): float(r["cv_log_loss"]) for r in history if _finite_text(r.get("cv_log_loss"))}
    grid = [c for c, _ in rows]
    best = grid.index(best_c([{"C": c, "cv_accuracy": a, "cv_log_loss": loss.get(c, 0.0)} for c, a in rows]))
    (c, accuracy), chance = rows[best], (1 / classes if classes else 0.0)
    evidence = {"classes": classes, "grid": grid, "metric": name, "cv_accuracy": [a for _, a in rows], "best_C": c,
                "best_cv_accuracy": accuracy, "chance_accuracy": chance, "edge": None}
    if accuracy < chance + config.linear_underfit_skill * (1 - chance):
        reason = (f"best cross-validated {name} {accuracy:.1%} (C = {c:g})"
                  + (f" with {classes} classes (chance {chance:.0%})" if classes else ""))
        step = ("underfitting: the frozen features do not separate the classes; fine-tune (--strategy partial, or "
                "--recipe partial-2 or full), take features from an earlier stage (feature_stage = \"best\" in a "
                "--recipe file), or try another --base")
        return Diagnosis("underfitting", reason, step, evidence)
    side = best - 1 if best == len(rows) - 1 else best + 1
    if len(rows) >= 2 and best in (0, len(rows) - 1) and accuracy - rows[side][1] >= config.linear_edge_margin:
        return _linear_edge(evidence, rows[side], strong=best == 0)
    where = (f"on the edge of the grid {_grid(grid)} but within {config.linear_edge_margin:.0%} of its neighbour "
             f"({rows[side][1]:.1%} at C = {rows[side][0]:g}): a plateau, not a limit"
             if len(rows) >= 2 and best in (0, len(rows) - 1) else f"inside the grid {_grid(grid)}")
    reason = f"cross-validated {name} {accuracy:.1%} at C = {c:g}, {where}"
    step = "nothing to fix: use the run; to go further, fine-tune the top stages (--strategy partial)"
    return Diagnosis("healthy", reason, step, evidence)


def _linear_edge(evidence: dict, neighbour: tuple[float, float], strong: bool) -> Diagnosis:
    """The best C is the grid's smallest (`strong` regularisation) or largest: say which and what it means."""
    c, accuracy = evidence["best_C"], evidence["best_cv_accuracy"]
    end = "strongest" if strong else "weakest"
    reason = (f"best C is on the edge of the grid {_grid(evidence['grid'])}: cross-validated {evidence['metric']} "
              f"{accuracy:.1%} at "
              f"C = {c:g}, the {end} regularisation tried, vs {neighbour[1]:.1%} at C = {neighbour[0]:g}")
    if strong:
        step = ("the head is limited by noise, not by its flexibility: more images, or more augmented views "
                "(feature_views in a --recipe file), let it use weaker regularisation")
    else:
        step = ("the head wants more flexibility than a linear boundary on these features: fine-tune the top "
                "stages (--strategy partial, or --recipe partial-2)")
    return Diagnosis("linear", reason, step, {**evidence, "edge": "strong" if strong else "weak"})


# ---------------------------------------------------------------- helpers


def _grid(grid: list[float]) -> str:
    """A C grid in a line: `[0.001 .. 10, 9 values]` (or the values themselves, up to four)."""
    return f"[{', '.join(f'{c:g}' for c in grid)}]" if len(grid) <= 4 else f"[{grid[0]:g} .. {grid[-1]:g}, {len(grid)} values]"


def _finite_text(value) -> bool:
    """True for a finite number, or text (a CSV cell) that reads as one."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def finite(value) -> bool:
    """True for a finite real number (numpy's too), False for NaN, inf, None, text and booleans."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: float) -> str:
    """0.41, 12.30, 4.5e+27: two decimals in the usual range, else three significant digits."""
    return f"{value:.2f}" if 0.01 <= abs(value) < 1000 else f"{value:.3g}"


def _chance(f: dict) -> str:
    guessed = " (k estimated from the first validation loss)" if f["classes_estimated"] else ""
    return f"ln({f['classes']}) = {f['chance_loss']:.2f}{guessed}"


def _public(f: dict) -> dict:
    """The facts without the rules' row indices."""
    return {k: v for k, v in f.items() if k not in ("best_rows", "n_rows")}
