"""`finetune diagnose RUN`: read a finished run's files and judge its training history.

The rules are `analysis.diagnose` (pure: history rows in, a `Diagnosis` out); this module reads the run
folder (history.csv, metrics.json, labels.json, plan.json) and hands them over.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

from finetune_cli.analysis.diagnose import EPOCH_COLUMNS, LINEAR_COLUMNS, Diagnosis, diagnose_history, finite
from finetune_cli.config import DIAGNOSE, DiagnoseConfig
from finetune_cli.errors import ModelFileError
from finetune_cli.files import read_json
from finetune_cli.runs.run import last_run, single_label_only


def diagnose(run: str | os.PathLike) -> dict:
    """A verdict on a finished run's training history, and the next step to take.

    Args:
        run: a run folder (the --out of `train`), its model.keras, or `last`.

    Returns:
        {"run", "verdict", "reason", "next_step", "evidence"}; verdict is one of `analysis.diagnose.VERDICTS`.

    Raises:
        ModelFileError: not a run, or a missing, empty or garbled history.csv.
    """
    return diagnose_run(run).to_dict()


#: Files of which a run folder holds at least one.
RUN_FILES = ("history.csv", "plan.json", "metrics.json", "model.keras", "state.json", "labels.json")


def diagnose_run(path, *, config: DiagnoseConfig = DIAGNOSE) -> Diagnosis:
    """Diagnose a run folder from RUN/history.csv, with RUN/metrics.json, labels.json and plan.json if present.

    Args:
        path: a run folder (the --out of `finetune train`), its model.keras,
            or "last" for the newest run under ./runs.

    Returns:
        The `Diagnosis`, its `run` the folder read and evidence["kept"]
        metrics.json's `kept` (None when absent).

    Raises:
        ModelFileError: no such run, not a run folder, or a missing, empty
            or garbled history.csv; one line saying what to do.
    """
    folder = last_run() if str(path) == "last" else Path(path).expanduser().absolute()
    folder = folder.parent if folder.suffix == ".keras" and folder.is_file() else folder
    single_label_only(_check_run(folder), "diagnose")
    history = _read_history(folder)
    metrics = _optional_json(folder / "metrics.json") or {}
    plan = (_optional_json(folder / "plan.json") or {}).get("plan")
    diagnosis = diagnose_history(history, classes=_n_classes(folder, metrics), planned_lr=_head_rate(plan),
                                 used_lr=_head_rate(metrics), config=config,
                                 metric=metrics.get("selection_metric", "accuracy"))
    if metrics.get("kept") == "linear-head" and diagnosis.verdict != "linear":
        diagnosis = replace(diagnosis, reason=diagnosis.reason + "; the run kept its linear head instead "
                            "(fine-tuning did not beat it on validation)")
    return replace(diagnosis, run=str(folder), evidence={**diagnosis.evidence, "kept": metrics.get("kept")})


def _check_run(folder: Path) -> Path:
    """`folder` if it is a run folder holding history.csv; else ModelFileError saying what to do."""
    if not folder.exists():
        raise ModelFileError(f"{folder} not found: give a run folder (the --out of `finetune train`) or `last`")
    if not folder.is_dir():
        raise ModelFileError(f"{folder} is not a folder: give a run folder (the --out of `finetune train`) or `last`")
    if not any((folder / name).exists() for name in RUN_FILES):
        raise ModelFileError(f"{folder} is not a run: it holds none of {', '.join(RUN_FILES)}; give the --out "
                             "folder of `finetune train`, or `last`")
    if not (folder / "history.csv").is_file():
        hint = (f"training stopped before it finished: `finetune train ... --out {folder} --resume` completes it"
                if (folder / "state.json").exists() else "the run did not finish training: train it again")
        raise ModelFileError(f"{folder} has no history.csv: {hint}, then diagnose it")
    return folder


def _read_history(folder: Path) -> list[dict]:
    """history.csv as a list of row dicts, its required columns as floats (empty cells: NaN).

    Raises:
        ModelFileError: empty, unparsable, or without the columns of either kind of run.
    """
    import pandas as pd

    file = folder / "history.csv"
    try:
        with warnings.catch_warnings():
            # a row longer than the header would otherwise become a silent index, or be cut short
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(file, index_col=False)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.ParserWarning) as exc:  # incl. UnicodeDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{file} is garbled ({first}): restore it from a copy, or train the run again") from None
    if frame.empty:
        raise ModelFileError(f"{file} holds no rows: the run recorded no epochs (a linear head on classes too "
                             "small to cross-validate records no C either); there is nothing to diagnose")
    needed = LINEAR_COLUMNS if all(c in frame.columns for c in LINEAR_COLUMNS) else EPOCH_COLUMNS
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ModelFileError(f"{file} is garbled: it lacks {', '.join(missing)} (its columns: "
                             f"{', '.join(map(str, frame.columns))[:120]}); restore it or train the run again")
    for column in needed:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][numbers.isna() & frame[column].notna()]
        if len(bad):
            raise ModelFileError(f"{file} is garbled: column {column} holds {str(bad.iloc[0])[:40]!r}, not a "
                                 "number; restore it or train the run again")
        frame[column] = numbers.astype(float)
    return frame.to_dict("records")


def _optional_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is absent, unreadable or not an object."""
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _n_classes(folder: Path, metrics: dict) -> int | None:
    """k from metrics.json's class list, else labels.json's; None when neither holds a list of 2 or more."""
    classes = metrics.get("classes")
    if not isinstance(classes, list):
        try:
            classes = read_json(folder / "labels.json")
        except (OSError, ValueError):
            classes = None
    return len(classes) if isinstance(classes, list) and len(classes) >= 2 else None


def _head_rate(holder) -> float | None:
    """holder["learning_rates"]["head"] (plan.json's plan, or metrics.json), if a finite number."""
    rates = holder.get("learning_rates") if isinstance(holder, dict) else None
    rate = rates.get("head") if isinstance(rates, dict) else None
    return float(rate) if finite(rate) else None
