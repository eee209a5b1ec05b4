"""A trained run, loaded once and read by every later command (`predict`, `evaluate`).

`Run.load` accepts the `--out` folder of `finetune train` or its `model.keras`.
The class names come from inside the model file (`finetune.json` in its
archive); a `labels.json` beside it must agree, so an edited or damaged list
is refused instead of silently relabelling every prediction. Runs saved before
the names travelled in the model fall back on a validated `labels.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune_cli.config import DEFAULT_IMAGE_SIZE, RUNS_DIR
from finetune_cli.data.scan import Scan
from finetune_cli.errors import ModelFileError
from finetune_cli.files import read_json
from finetune_cli.models.files import MODEL_FACTS, archive_entries, input_of, input_side, load_model_file


@dataclass(frozen=True)
class Run:
    """A loaded run.

    Attributes:
        path: the run folder.
        model: Keras model, raw RGB (B, S, S, 3) in [0, 255] -> probabilities (B, k).
        classes: the k class names, in output order.
        image_size: S, the input side in pixels.
        plan, metrics: the run's plan.json and metrics.json, or None if absent.
        recipe: the run's recipe.toml text, or None.
        multi_label: the model gives one independent (sigmoid) probability per label (`train.multilabel`);
            `thresholds` (k,) are then its per-label decision thresholds and `separator` joins a label set.
    """

    path: Path
    model: object
    classes: list[str]
    image_size: int
    plan: dict | None = None
    recipe: str | None = None
    metrics: dict | None = None
    multi_label: bool = False
    thresholds: tuple = ()
    separator: str = ";"

    @classmethod
    def load(cls, path, multi_label: bool = False) -> "Run":
        """Load a run folder (or a model.keras inside one); `last` is the last finished run under ./runs.

        `multi_label`: the caller reads multi-label runs too (predict, evaluate); False refuses one.

        Raises:
            ModelFileError: not a run, a truncated or corrupt model, a model
                that is not a classifier, or class names that disagree; a multi-label run where the
                caller reads single-label runs only.
        """
        path = last_run() if str(path) == "last" else Path(path).expanduser().absolute()
        folder = path.parent if path.suffix == ".keras" else path
        model_file = path if path.suffix == ".keras" else path / "model.keras"
        if not model_file.is_file():
            raise ModelFileError(f"{model_file} not found: --model takes the --out folder of `finetune train`")
        facts, config = archive_entries(model_file, (MODEL_FACTS, "config.json"), ModelFileError)
        classes = _classes((facts or {}).get("classes"), folder / "labels.json")
        declared = input_of(config, model_file, ModelFileError)
        side = input_side(declared, None, model_file.name, DEFAULT_IMAGE_SIZE)
        task = _task(facts or {}, classes, model_file, multi_label)
        model = load_model_file(model_file, ModelFileError)
        _check_classifier(model, model_file, classes)
        return cls(folder, model, classes, side, _optional_json(folder / "plan.json"),
                   _optional_text(folder / "recipe.toml"), _optional_json(folder / "metrics.json"), *task)

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, k) float64, true labels (n,)) of the run's held-out validation images, from
        predictions_val.csv: out-of-fold for a linear plan validated by cross-validation.

        Raises:
            ModelFileError: no such file, or one from a version that did not keep every class's probability.
        """
        frame = read_predictions(self.path / "predictions_val.csv")
        columns = [PROB_PREFIX + name for name in self.classes]
        if frame is None or not set(columns) <= set(frame.columns) or not frame["true"].isin(self.classes).all():
            raise ModelFileError(f"{self.path} keeps no validation probabilities (predictions_val.csv with a "
                                 f"{PROB_PREFIX}CLASS column per class): train the run again with this version")
        probs = frame[columns].to_numpy(np.float64)
        if not np.isfinite(probs).all():
            raise ModelFileError(f"{self.path / 'predictions_val.csv'} is garbled (a probability is not a number): "
                                 "train the run again")
        return probs, np.array([self.classes.index(name) for name in frame["true"]])


TRAINED_ON = "trained_on.txt"
#: predictions_val.csv holds each class's probability in a column named PROB_PREFIX + the class.
PROB_PREFIX = "prob_"


def trained_on(folder: Path) -> frozenset[str] | None:
    """The content digests (32 hex digits) of the images that trained the run in `folder` (its
    `TRAINED_ON`, one per line, written by `train`); None for a run from an older version or a bad file."""
    path = Path(folder) / TRAINED_ON
    try:
        if path.stat().st_size > 64 * 1024 * 1024:
            return None
        lines = path.read_text("ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return frozenset(lines) if all(re.fullmatch(r"[0-9a-f]{32}", line) for line in lines) else None


def single_label_only(folder: Path, command: str) -> None:
    """Refuse a multi-label run (its metrics.json says so) for a `command` built for single-label runs.

    Raises:
        ModelFileError: naming the command and what reads such a run.
    """
    if (_optional_json(Path(folder) / "metrics.json") or {}).get("task") == "multi-label":
        raise ModelFileError(f"{folder} is a multi-label run: `{command}` is built for single-label runs; "
                             "evaluate and predict read it, and its metrics.json holds the per-label scores")


def _task(facts: dict, classes: list[str], model_file: Path, allowed: bool) -> tuple:
    """(multi_label, thresholds, separator) from the model's facts, checked before the model is loaded.

    Raises:
        ModelFileError: a multi-label run where it is not `allowed`, or thresholds that do not fit its labels.
    """
    if facts.get("task") != "multi-label":
        return False, (), ";"
    if not allowed:
        raise ModelFileError(f"{model_file.parent} is a multi-label run (one probability per label): this command "
                             "reads single-label runs; predict and evaluate read multi-label runs")
    thresholds = facts.get("thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != len(classes) or not all(
            isinstance(t, (int, float)) and 0 < t < 1 for t in thresholds):
        raise ModelFileError(f"{model_file} is multi-label but its thresholds are damaged: train the run again")
    return True, tuple(float(t) for t in thresholds), str(facts.get("separator") or ";")


def _classes(inside: list | None, labels_file: Path) -> list[str]:
    """The class names: the model's own, checked against labels.json when both exist."""
    listed = _read_labels(labels_file) if labels_file.exists() else None
    if inside is not None and listed is not None and listed != inside:
        raise ModelFileError(f"{labels_file} lists {listed} but the model was trained on {inside}, in that "
                             "order: restore labels.json, or delete it to use the model's own list")
    if inside is None and listed is None:
        raise ModelFileError(f"{labels_file} not found: --model takes the --out folder of `finetune train`")
    return list(inside if inside is not None else listed)


def _read_labels(labels_file: Path) -> list[str]:
    """labels.json validated: a JSON list of distinct, non-empty class names (read within `JSON_MAX_BYTES`)."""
    try:
        value = read_json(labels_file)
    except OSError as exc:
        raise ModelFileError(f"{labels_file} is unreadable ({exc.strerror or exc}): restore it from the run") from None
    except ValueError as exc:  # too large, not UTF-8, not JSON, nested too deeply: the message names the file
        raise ModelFileError(f"{exc}; it should be the run's list of class names") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        try:
            held = json.dumps(value)[:80]
        except (RecursionError, ValueError):
            held = f"a {type(value).__name__} nested too deeply"
        raise ModelFileError(f"{labels_file} must be a JSON list of class names; it holds {held}")
    if len(set(value)) != len(value):
        raise ModelFileError(f"{labels_file} names a class twice: {value}")
    return value


def _check_classifier(model, model_file: Path, classes: list[str]) -> None:
    shape = model.output_shape
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise ModelFileError(f"{model_file} is not a classifier: its output is {shape}, not (batch, classes); "
                             "--model takes the --out folder of `finetune train`")
    if shape[-1] != len(classes):
        raise ModelFileError(f"{model_file} has {shape[-1]} outputs but its class list names {len(classes)}")


def _optional_json(path: Path) -> dict | None:
    """A JSON file's value (read within `JSON_MAX_BYTES`), or None when absent, unreadable, too large or too deep."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _optional_text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (OSError, ValueError):
        return None


def last_run(root: Path = RUNS_DIR) -> Path:
    """The last finished run under `root`: the folder whose metrics.json (the last file a run writes) is newest,
    among those holding a model.keras. An unfinished run (no metrics.json yet, or killed) is never `last`.

    Raises:
        ModelFileError: there is none.
    """
    finished = [p for p in root.glob("*/metrics.json") if (p.parent / "model.keras").is_file()] if root.is_dir() else []
    if not finished:
        raise ModelFileError(f"--model last: no finished run under {root.absolute()} (a run is finished once it "
                             "has written metrics.json); give a run folder")
    return max(finished, key=lambda p: p.stat().st_mtime).parent.absolute()


def resolve_run(path, note=None) -> Path:
    """The run folder `path` names, absolute; `last` is the last finished run under ./runs (`last_run`).

    `last` is the keyword even when the current folder holds a folder named
    `last`: scripts that say `--model last` keep meaning the newest finished
    run whatever folder they run in. Such a folder is then named in a note
    (`note(text)`, e.g. a line on stderr): it is used when given as `./last`.
    Any other `path` (a run folder or its model file) is returned absolute, unchecked (`Run.load` checks).

    Raises:
        ModelFileError: `last` with no finished run.
    """
    if str(path) != "last":
        return Path(path).expanduser().absolute()
    try:
        chosen = last_run()
    except ModelFileError as exc:
        if Path("last").is_dir():
            raise ModelFileError(f"{exc}; to use the folder {Path('last').absolute()}, give it as ./last") from None
        raise
    if Path("last").is_dir() and note is not None:
        note(f"note: `last` means the last finished run under {RUNS_DIR}/ ({chosen}); to use the folder "
             f"{Path('last').absolute()}, give it as ./last")
    return chosen


def training_overlap(run: Run, scan: Scan, probs: np.ndarray, ok: np.ndarray) -> dict:
    """{"n_training_images": images of `scan` that trained the run (by content), and, when some but not all
    did, "held_out_accuracy" on the others (0-1) and "n_held_out"}; {} when the run records no training images.

    A run that trained on every image (a linear plan validated out-of-fold) scores its own folder almost
    perfectly; that number is not a held-out score, and the result says so.
    """
    trained = trained_on(run.path)
    if trained is None:
        return {}
    seen = np.array([r.digest in trained for r in scan.images], bool)
    facts = {"n_training_images": int((seen & ok).sum())}
    rest = ~seen & ok
    if facts["n_training_images"] and rest.any():
        labels = np.array([run.classes.index(r.label) for r in scan.images])
        facts.update(n_held_out=int(rest.sum()),
                     held_out_accuracy=float((probs[rest].argmax(1) == labels[rest]).mean()))
    return facts


def read_predictions(path: Path):
    """A `predictions_frame` read back (class names kept as text, "" not NaN), or None if unreadable or not one."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={"path": str, "true": str, "predicted": str}, keep_default_na=False)
    except (OSError, ValueError):
        return None
    return frame if {"path", "true", "predicted", "probability", "p_true"} <= set(frame.columns) else None
