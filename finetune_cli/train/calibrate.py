"""Temperature scaling of the kept model, folded into its softmax layer (Guo et al. 2017).

    fit    one T > 0 on the validation probabilities (`calibration.fit_temperature`)
    judge  applied only when the validation images pin it down (not on an edge of
           `TrainConfig.temperature_range`) and it does not raise the validation NLL
    fold   the output Dense softmax layer, `classifier`, is replaced by a copy
           whose kernel and bias are divided by T: softmax((x W + b) / T),
           exactly the calibrated probabilities, in standard Keras layers
           (model.keras still loads with safe_mode=True)

It runs after fitting, so the fine-tuned-vs-linear comparison (`train.finetune.keep_better`)
sees the uncalibrated probabilities and the kept model is the one calibrated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from finetune_cli.analysis.calibration import Calibration, fit_temperature, nll, temper
from finetune_cli.config import TrainConfig
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.context import Context, TrainResult

#: A fitted log T this close to a bound of the range counts as on the edge (not pinned down).
EDGE_LOG_T = 1e-3


def calibrate(ctx: Context, result: TrainResult, settings: TrainConfig) -> TrainResult:
    """`result` with its model, validation probabilities and test scoring calibrated, and the evidence.

    Nothing changes when `settings.calibrate` is False, when there are no
    validation images, or when the validation probabilities are not finite
    (`tasks.train.finish` refuses those). When T is not applied, the reason is
    a note and `result.calibration` still records the fit.

    Returns:
        A `TrainResult` whose `calibration` is a `calibration.Calibration`
        (or `result` itself when nothing was fitted).
    """
    probs, labels = result.val_probs, result.val_labels
    if not settings.calibrate or len(labels) == 0 or not np.isfinite(probs).all():
        return result
    ctx.reporter.on_phase(f"calibrating: temperature scaling on {len(labels)} validation images")
    fitted = fit_temperature(probs, labels, settings.temperature_range)
    reason = missing_classes(getattr(ctx, "classes", None) or [], labels) or refusal(fitted, probs, labels, settings.temperature_range)
    model = None if reason else fold_temperature(result.model, fitted)
    if model is None and not reason:
        reason = ("the model's output layer is not a softmax Dense layer named `classifier` (an ensemble "
                  "averages its members' softmax outputs: no single layer to fold a temperature into)")
    before = np.asarray(probs, np.float64)
    after = before if reason else temper(before, fitted)
    calibration = Calibration(1.0 if reason else fitted, fitted, not reason, reason, before, after,
                              np.asarray(labels), settings.ece_bins)
    if reason:
        note = f"not calibrated (fitted temperature {fitted:.3g}): {reason}"
        ctx.reporter.on_note(note)
        return dataclasses.replace(result, calibration=calibration, notes=result.notes + [note])
    return dataclasses.replace(result, model=model, val_probs=after.astype(np.float32),
                               score=tempered(result.score, fitted), calibration=calibration)


def missing_classes(classes: list[str], labels: np.ndarray) -> str:
    """Why a temperature fitted on these validation labels (n,) must not be applied: a class is absent; else ""."""
    absent = [name for i, name in enumerate(classes) if not np.any(np.asarray(labels) == i)]
    if not absent:
        return ""
    return (f"the validation images hold no image of {', '.join(repr(a) for a in absent)}: a temperature "
            "fitted without a class is not applied")


def refusal(fitted: float, probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float]) -> str:
    """Why the fitted temperature must not be applied, or "" when it may.

    On an edge of `bounds` the NLL kept falling towards it: the images do
    not pin T down (typically no validation errors, where T -> 0 would make
    every prediction certain), so the model is left as it is.
    """
    if min(abs(np.log(fitted) - np.log(b)) for b in bounds) < EDGE_LOG_T:
        return (f"the temperature ran to the edge of its range {bounds[0]:g}-{bounds[1]:g}: the validation "
                "images cannot pin it down (too few, or no errors among them)")
    if nll(temper(probs, fitted), labels) > nll(probs, labels):
        return "it would raise the validation NLL"
    return ""


def fold_temperature(model, temperature: float):
    """The same network, raw pixels -> softmax(logits / T) (B, k), or None when the model cannot take it.

    The output layer must be a softmax Dense layer named `classifier` (every
    model `train` builds ends so); it is replaced by a copy with kernel / T
    and bias / T. Every other layer is shared with `model`, which keeps its
    own, uncalibrated, output layer.
    """
    keras = import_keras()
    try:
        dense = model.get_layer("classifier")
    except ValueError:
        return None
    config = dense.get_config()
    if (not isinstance(dense, keras.layers.Dense) or config.get("activation") != "softmax"
            or len(model.outputs) != 1 or model.outputs[0] is not dense.output):
        return None
    scaled = keras.layers.Dense.from_config(config)
    outputs = scaled(dense.input)
    scaled.set_weights([w / np.float32(temperature) for w in dense.get_weights()])
    return keras.Model(model.inputs, outputs, name=model.name)


def tempered(score, temperature: float):
    """A `train.context.Score` whose probabilities are `score`'s at `temperature` (unreadable rows stay 0)."""

    def calibrated(scan):
        probs, ok = score(scan)
        return (temper(probs, temperature) * np.asarray(ok)[:, None]).astype(np.float32), ok

    return calibrated
