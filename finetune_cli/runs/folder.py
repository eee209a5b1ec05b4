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
    report.html      everything above as one self-contained page (`runs.report_page`), written after metrics.json
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune_cli.data.scan import check_out_outside
from finetune_cli.errors import OutputError, SettingsError, TrainingError
from finetune_cli.files import (check_writable_folder, claim_numbered, create_folder, held_names, jsonable, read_json,
                                remove_created, remove_stale_temps, writing)
from finetune_cli.models.files import save_model_atomic
from finetune_cli.pages.figures import figure_png
from finetune_cli.progress import Reporter

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
        return self.write_text(name, json.dumps(value, indent=2, ensure_ascii=False, default=jsonable) + "\n")

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


def _stem(root: Path) -> str:
    """A run's default name: the data folder's name, or a label table's name without its ending."""
    return root.stem if root.is_file() else root.name


def open_run(out, root, resume: bool, reporter: Reporter) -> RunFolder:
    """The run folder: `out`, or a new numbered one; says which, and whether a resumed run is finished.

    Raises:
        OutputError (also an `out` inside the data folder `root`), SettingsError.
    """
    if out is None and resume:
        raise SettingsError("--resume continues the run in --out: give --out")
    check_out_outside(out, root)
    run = RunFolder(out, resume=resume) if out is not None else RunFolder.new(_stem(Path(root).resolve()))
    reporter.on_phase(f"run folder: {run.path}")
    if resume and run.finished:
        reporter.on_note(f"the run in {run.path} is finished: nothing to resume, nothing changed "
                         "(to train again, choose a new --out)")
    return run
