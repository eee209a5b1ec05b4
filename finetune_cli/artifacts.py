"""The run folder: every file a training run leaves, each written atomically.

    model.keras      backbone + head, raw RGB [0, 255] in, probabilities out
    labels.json      class names in output order
    plan.json        the plan and the evidence it was decided from
    recipe.toml      the recipe used, verbatim
    history.csv      per-epoch (or per-C) training history
    metrics.json     strategy, similarity, size category, accuracies, calibration, timings
    curves.png       loss / accuracy per epoch (or CV accuracy per C)
    confusion.png    validation confusion matrix
    reliability.png  reliability diagram of the validation images, before and after calibration
    predictions_val.csv  per validation image: path, true, predicted, probability, p_true
    report.html      everything above as one self-contained page (`report_html`), written after metrics.json
    skipped.csv      files not used, with reasons
    checkpoint.keras, state.json   the last completed fine-tuning epoch (for --resume)
    best.weights.h5  the weights of the best epoch so far (for --resume)
    lr.csv, lr.png, lr.json   the learning-rate sweep of `train --lr auto` (and of `finetune lr-find`)

The class names and input size also travel inside model.keras (`finetune.json`
in its archive), so an edited labels.json cannot silently relabel a model.
A run that fails before it has anything to resume removes what it wrote.
A folder the run creates also holds `config.OUTPUT_MARKER` (scans skip it); a
folder holding only that marker counts as empty.
"""

from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune_cli.errors import OutputError, TrainingError
from finetune_cli.files import (check_writable_folder, claim_numbered, create_folder, held_names, remove_created,
                                 remove_stale_temps, writing)
from finetune_cli.files import read_json

#: The entry inside a saved model.keras archive that holds the run's facts.
MODEL_FACTS = "finetune.json"
#: Files whose presence makes an unfinished run worth keeping for --resume.
RESUMABLE = ("checkpoint.keras", "encoder.keras")


class RunFolder:
    """A run folder that never mixes two runs.

    Raises (on creation):
        OutputError: the folder holds files and `resume` is False, or it
            cannot be written (read-only, disk full).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, command: str | None = None):
        self.path = Path(path).expanduser().absolute()
        self.written: set[str] = set()
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} is a file: give a folder for the run")
        if self.path.is_dir():
            remove_stale_temps(self.path)
        held = self.path.is_dir() and bool(held_names(self.path))  # the output marker alone: empty
        if not resume and held:
            raise OutputError(
                f"run folder {self.path} already holds a run: choose a new --out, "
                "delete it, or pass --resume to continue it"
            )
        if resume:
            self._check_resumable()
        self.created = create_folder(self.path, command=command, parents=True)  # with the output marker
        check_writable_folder(self.path)

    @classmethod
    def new(cls, stem: str, command: str | None = None) -> "RunFolder":
        """A new numbered folder `runs/<stem>-<N>`, created exclusively (never an existing one; `files.claim_numbered`).

        Raises:
            OutputError: ./runs cannot be written.
        """
        folder = cls(claim_numbered(stem, command=command))
        folder.created = True
        return folder

    def _check_resumable(self) -> None:
        if (self.path / "plan.json").exists():
            return
        if (self.path / "encoder.keras").exists():
            raise OutputError(
                f"pretraining in {self.path} was interrupted before training began: its last good encoder, "
                f"{self.path / 'encoder.keras'}, works as --base; to start over, move the folder away"
            )
        raise OutputError(f"nothing to resume in {self.path}: it holds no plan.json from an earlier run")

    @property
    def finished(self) -> bool:
        """True once metrics.json, the last file a run writes, exists."""
        return (self.path / "metrics.json").exists()

    @contextmanager
    def guarded(self) -> Iterator["RunFolder"]:
        """Clean up after a failure inside the block (see `discard`), then re-raise.

        A `TrainingError` (diverged, unusable result) discards even a
        checkpoint: resuming it would fail the same way. Any other failure,
        Ctrl-C included, keeps a run that can be resumed.
        """
        try:
            yield self
        except TrainingError:
            self.discard(keep_resumable=False)
            raise
        except BaseException:
            self.discard()
            raise

    def discard(self, keep_resumable: bool = True) -> bool:
        """Remove what this run wrote, unless (with `keep_resumable`) it left something to --resume.

        Only files this object wrote are removed, and the folder itself only
        when this run created it. Returns True when something was removed.
        """
        if keep_resumable and any((self.path / name).exists() for name in RESUMABLE):
            return False
        for name in self.written:
            (self.path / name).unlink(missing_ok=True)
        remove_stale_temps(self.path)
        if self.created:
            remove_created(self.path)
        return bool(self.written)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        self.written.add(name)
        with writing(self.file(name)) as tmp:
            tmp.write_bytes(data)
        return self.file(name)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, value) -> Path:
        return self.write_text(name, json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable) + "\n")

    def read_json(self, name: str):
        """A JSON file of the folder, read within `config.JSON_MAX_BYTES` (`files.read_json`).

        Raises:
            OSError: missing or unreadable; `files.JSONFileError` (a ValueError): too large, not JSON, too deep.
        """
        return read_json(self.file(name))

    def write_frame(self, name: str, frame) -> Path:
        return self.write_text(name, frame.to_csv(index=False))

    def save_model(self, model, name: str = "model.keras", facts: dict | None = None) -> Path:
        self.written.add(name)
        return save_model_atomic(model, self.file(name), facts)

    def save_weights(self, model, name: str) -> Path:
        """Weights only (`.weights.h5`), atomically."""
        self.written.add(name)
        with writing(self.file(name), ".weights.h5") as tmp:  # Keras goes by the ending
            model.save_weights(tmp)
        return self.file(name)

    def save_figure(self, name: str, figure) -> Path:
        return self.write_bytes(name, figure_png(figure))


def write_run(run: RunFolder, result, classes: list[str], image_size: int, facts: dict, timings,
              val_paths: list[str] | None = None) -> dict:
    """Write a fitted result into the run folder: model, history, plots, then metrics.json (last).

    Args:
        result: a `train.context.TrainResult`.
        facts: metrics known before writing (strategy, similarity, counts, test scores).
        timings: () -> {step: seconds}, read after the model is saved.
        val_paths: the validation images' absolute paths, in `result.val_probs` order: written with
            their predictions to predictions_val.csv; None: no such file.

    Returns:
        The metrics, as written to metrics.json.
    """
    import numpy as np
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    probs, labels = result.val_probs, result.val_labels
    run.save_model(result.model, facts={"classes": classes, "image_size": image_size})
    matrix = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(classes))))
    run.write_frame("history.csv", pd.DataFrame(result.history))
    run.save_figure("curves.png", curves_figure(result.history))
    run.save_figure("confusion.png", confusion_figure(matrix, classes))
    if result.calibration is not None:
        run.save_figure("reliability.png", reliability_figure(result.calibration))
        facts = {**facts, "calibration": result.calibration.facts()}
    if val_paths is not None:
        run.write_frame("predictions_val.csv", predictions_frame(val_paths, classes, labels, probs))
    metrics = {**facts, "val_accuracy": float(np.mean(probs.argmax(1) == labels)), "classes": classes,
               "learning_rates": result.plan.learning_rates, "notes": result.notes, "timings_s": timings()}
    run.write_json("metrics.json", metrics)
    return metrics


def predictions_frame(paths: list[str], classes: list[str], labels, probs):
    """One row per image: path, true, predicted, probability (of the prediction), p_true (of the truth).

    Args:
        paths: n paths (shown as printable text); labels: (n,) class indices; probs: (n, k) in [0, 1].
    """
    import numpy as np
    import pandas as pd

    from finetune_cli.files import shown

    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    guess, rows = probs.argmax(1), np.arange(len(labels))
    return pd.DataFrame({"path": [shown(p) for p in paths], "true": [classes[i] for i in labels],
                         "predicted": [classes[i] for i in guess], "probability": probs[rows, guess].round(6),
                         "p_true": probs[rows, labels].round(6)})


def read_predictions(path: Path):
    """A `predictions_frame` read back (class names kept as text, "" not NaN), or None if unreadable or not one."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={"path": str, "true": str, "predicted": str}, keep_default_na=False)
    except (OSError, ValueError):
        return None
    return frame if {"path", "true", "predicted", "probability", "p_true"} <= set(frame.columns) else None


def save_model_atomic(model, target: Path, facts: dict | None = None) -> Path:
    """Save a Keras model via a temp file and a rename: an old file stays loadable until then.

    Args:
        facts: JSON-able facts stored inside the archive as `finetune.json`
            (class names, input size); Keras ignores the extra entry.

    Raises:
        OutputError: the folder cannot be written (read-only, disk full).
    """
    with writing(target, ".keras") as tmp:  # Keras picks the format by the ending
        model.save(tmp)
        if facts is not None:
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(MODEL_FACTS, json.dumps(facts, ensure_ascii=False))
    return target


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def curves_figure(history: list[dict]):
    """Loss and accuracy per epoch, or CV accuracy per C for a linear run."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    if history and "C" in history[0]:
        axes[0].semilogx([h["C"] for h in history], [h["cv_accuracy"] for h in history], "o-")
        axes[0].set(xlabel="C (inverse L2 strength)", ylabel="cross-validated accuracy", title="linear head")
        axes[1].axis("off")
    else:
        epochs = [h["epoch"] for h in history]
        for key, axis in (("loss", axes[0]), ("accuracy", axes[1])):
            axis.plot(epochs, [h[key] for h in history], "o-", label="train")
            axis.plot(epochs, [h["val_" + key] for h in history], "o-", label="validation")
            axis.set(xlabel="epoch", title=key)
            axis.legend()
    figure.tight_layout()
    return figure


def lr_figure(rates, losses, smoothed, marks: dict, spread: float | None = None):
    """Loss against learning rate (log x): each step's loss, its smoothed curve, and the suggestions.

    Args:
        rates, losses, smoothed: (n,) the sweep (`train.lr_find.LrSweep`).
        marks: suggestion name -> (suggested rate, the step it was read at):
            a marker on the curve at that step and a dashed line at the rate.
        spread: the suggestions' largest / smallest when they disagree (said in the title).
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    axis.semilogx(rates, losses, color="0.75", linewidth=1, label="loss per step")
    axis.semilogx(rates, smoothed, color="C0", label="smoothed")
    for k, (name, (rate, step)) in enumerate(marks.items()):
        colour = f"C{k + 1}"
        axis.plot(rates[step], smoothed[step], "o", color=colour)
        axis.axvline(rate, color=colour, linestyle="--", linewidth=1,
                     label=f"{'minimum/10' if name == 'minimum' else name} {rate:.1e}")
    low, high = min(smoothed), max(smoothed)
    pad = max(high - low, 0.05 * abs(high), 1e-3) * 0.25
    axis.set_ylim(low - pad, high + pad)  # the smoothed curve decides; single noisy steps may leave the frame
    title = "learning-rate sweep" + (f": suggestions disagree by {spread:.0f}x" if spread else "")
    axis.set(xlabel="learning rate (head)", ylabel="training loss", title=title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def reliability_figure(calibration):
    """Reliability diagrams of the validation images, before and after temperature scaling.

    Args:
        calibration: a `calibration.Calibration` (before, after (n, k); labels (n,); bins).

    Each panel: accuracy per equal-width confidence bin (bars; the count of
    images above each), the diagonal of perfect calibration, and the ECE.
    """
    from finetune_cli.calibration import ece, reliability

    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    after = f"after (T = {calibration.temperature:.3g})" if calibration.applied else "after (not applied)"
    for axis, (title, probs) in zip(axes, (("before", calibration.before), (after, calibration.after))):
        table = reliability(probs, calibration.labels, calibration.bins)
        edges, filled = table["edges"], table["count"] > 0
        width = edges[1] - edges[0]
        axis.bar(edges[:-1][filled], table["accuracy"][filled], width=width, align="edge", edgecolor="k",
                 label="accuracy")
        axis.plot(table["confidence"][filled], table["confidence"][filled], "o", color="C3", markersize=4,
                  label="mean confidence")
        for left, top, n in zip(edges[:-1][filled], table["accuracy"][filled], table["count"][filled]):
            axis.text(left + width / 2, top + 0.01, str(n), ha="center", va="bottom", fontsize=7)
        axis.plot([0, 1], [0, 1], "--", color="0.5", linewidth=1)
        score = ece(probs, calibration.labels, calibration.bins)
        axis.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top probability)",
                 title=f"{title}: ECE {score:.1%}")
    axes[0].set_ylabel(f"accuracy ({len(calibration.labels)} validation images)")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def confusion_figure(matrix, classes: list[str]):
    """A labelled confusion matrix (rows: true class, columns: predicted)."""
    import numpy as np

    plt = _pyplot()
    side = min(12, 2 + 0.5 * len(classes))
    figure, axis = plt.subplots(figsize=(side, side))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=90)
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title="validation confusion matrix")
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", fontsize=8)
    figure.tight_layout()
    return figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pretrain_curves_figure(history: list[dict]):
    """Reconstruction loss per epoch (train and held-out), one panel per phase."""
    plt = _pyplot()
    phases = list(dict.fromkeys(h["phase"] for h in history))
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.5), squeeze=False)
    for axis, phase in zip(axes[0], phases):
        rows = [h for h in history if h["phase"] == phase]
        epochs = [h["epoch"] for h in rows]
        axis.plot(epochs, [h["loss"] for h in rows], "o-", label="train")
        axis.plot(epochs, [h["val_loss"] for h in rows], "o-", label="held-out")
        axis.set(xlabel="epoch", ylabel="mean squared error", title=phase)
        axis.legend()
    figure.tight_layout()
    return figure


def reconstructions_figure(clean, noisy, reconstructed):
    """A grid: held-out inputs, their corrupted versions, and the reconstructions.

    Args:
        clean, noisy: (n, S, S, 3) in [0, 255]; reconstructed: (n, S, S, 3) in [0, 1].
    """
    import numpy as np

    plt = _pyplot()
    n = len(clean)
    figure, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    rows = (("input", np.asarray(clean) / 255.0), ("noisy input", np.asarray(noisy) / 255.0),
            ("reconstruction", np.asarray(reconstructed)))
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            axes[r, c].imshow(np.clip(images[c], 0, 1))
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    return figure
