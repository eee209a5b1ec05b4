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

from finetune_cli.artifacts import MODEL_FACTS
from finetune_cli.config import DEFAULT_IMAGE_SIZE, RUNS_DIR
from finetune_cli.errors import ModelFileError, OutputError
from finetune_cli.files import check_writable_folder
from finetune_cli.models.files import archive_entries, input_of, input_side, load_model_file


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
    """

    path: Path
    model: object
    classes: list[str]
    image_size: int
    plan: dict | None = None
    recipe: str | None = None
    metrics: dict | None = None

    @classmethod
    def load(cls, path) -> "Run":
        """Load a run folder (or a model.keras inside one); `last` is the newest run under ./runs.

        Raises:
            ModelFileError: not a run, a truncated or corrupt model, a model
                that is not a classifier, or class names that disagree.
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
        model = load_model_file(model_file, ModelFileError)
        _check_classifier(model, model_file, classes)
        return cls(folder, model, classes, side, _optional_json(folder / "plan.json"),
                   _optional_text(folder / "recipe.toml"), _optional_json(folder / "metrics.json"))


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
    """labels.json validated: a JSON list of distinct, non-empty class names."""
    try:
        value = json.loads(labels_file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{labels_file} is unreadable ({exc}): restore it from the run") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ModelFileError(f"{labels_file} must be a JSON list of class names; it holds {json.dumps(value)[:80]}")
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
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _optional_text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (OSError, ValueError):
        return None


def numbered(stem: str, suffix: str = "", root: Path = RUNS_DIR) -> Path:
    """The next free `root/<stem>-<N><suffix>`, N one more than the highest taken (from 1).

    The caller creates it (exclusively, so two runs never share one).
    """
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "run"
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+){re.escape(suffix)}$")
    taken = [int(m[1]) for p in (root.iterdir() if root.is_dir() else ()) if (m := pattern.match(p.name))]
    return root / f"{stem}-{max(taken, default=0) + 1}{suffix}"


def output_folder(out, stem: str) -> Path:
    """`out`, or a new numbered `runs/<stem>-<N>`: created if missing, checked writable.

    An explicit `out` is created only inside an existing folder (a typo in its
    parent is refused, not built); the default one with its parents.

    Raises:
        OutputError: `out` is a file, cannot be created, or does not accept new files.
    """
    folder = (Path(out) if out is not None else numbered(stem)).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file: give a folder")
    if out is None or folder.parent.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror or exc}; choose another --out") from None
    check_writable_folder(folder)
    return folder


def last_run(root: Path = RUNS_DIR) -> Path:
    """The run folder under `root` whose model.keras is newest.

    Raises:
        ModelFileError: there is none.
    """
    models = sorted(root.glob("*/model.keras"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not models:
        raise ModelFileError(f"--model last: no finished run under {root.absolute()}; give a run folder")
    return models[-1].parent.absolute()
