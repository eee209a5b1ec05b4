"""The run folder: every file a training run leaves, each written atomically.

    model.keras      backbone + head, raw RGB [0, 255] in, probabilities out
    labels.json      class names in output order
    plan.json        the plan and the evidence it was decided from
    recipe.toml      the recipe used, verbatim
    history.csv      per-epoch (or per-C) training history
    metrics.json     strategy, similarity, size category, accuracies, timings
    curves.png       loss / accuracy per epoch (or CV accuracy per C)
    confusion.png    validation confusion matrix
    skipped.csv      files not used, with reasons
    checkpoint.keras, state.json   the last completed fine-tuning epoch (for --resume)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from finetune_cli.errors import OutputError
from finetune_cli.features import atomic_write_bytes


class RunFolder:
    """A run folder that never mixes two runs.

    Raises (on creation):
        OutputError: the folder holds files and `resume` is False, or it
            cannot be written (read-only, disk full).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False):
        self.path = Path(path).expanduser().absolute()
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--out {self.path} is a file: give a folder for the run")
        if not resume and self.path.exists() and any(self.path.iterdir()):
            raise OutputError(
                f"run folder {self.path} already holds a run: choose a new --out, "
                "delete it, or pass --resume to continue it"
            )
        if resume and not (self.path / "plan.json").exists():
            raise OutputError(f"nothing to resume in {self.path}: it holds no plan.json from an earlier run")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise OutputError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    def file(self, name: str) -> Path:
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        try:
            atomic_write_bytes(self.file(name), data)
        except OSError as exc:
            raise OutputError(f"cannot write {self.file(name)}: {exc.strerror or exc} (disk full?)") from None
        return self.file(name)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, value) -> Path:
        return self.write_text(name, json.dumps(value, indent=2, ensure_ascii=False, default=_jsonable) + "\n")

    def read_json(self, name: str):
        return json.loads(self.file(name).read_text(encoding="utf-8"))

    def write_frame(self, name: str, frame) -> Path:
        return self.write_text(name, frame.to_csv(index=False))

    def save_model(self, model, name: str = "model.keras") -> Path:
        """Save a Keras model via a temp file and a rename: the old file stays loadable until then."""
        target = self.file(name)
        tmp = self.path / f".{target.stem}.tmp.keras"
        try:
            model.save(tmp)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot save {target}: {exc.strerror or exc} (disk full?)") from None
        return target

    def save_figure(self, name: str, figure) -> Path:
        import io

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return self.write_bytes(name, buffer.getvalue())


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def curves_figure(history: list[dict]):
    """Loss and accuracy per epoch, or CV accuracy per C for a linear run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def confusion_figure(matrix, classes: list[str]):
    """A labelled confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
