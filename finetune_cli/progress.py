"""What a long library call tells its caller while it works: a typed reporter.

The library calls these methods and never prints; the CLI passes the rich
implementation (`report.RichReporter`), tests a subclass that records, and a
Python user nothing at all (the base class does nothing).
"""

from __future__ import annotations


class Reporter:
    """Progress of `train`, `pretrain` and their steps; override what you need."""

    def on_phase(self, name: str) -> None:
        """A new step begins, e.g. "measuring similarity to the pretraining data"."""

    def on_progress(self, done: int, total: int) -> None:
        """Images processed so far in the current step (0 <= done <= total)."""

    def on_epoch(self, logs: dict, epochs: int) -> None:
        """An epoch ended. `logs`: epoch (1-based), loss, val_loss, images, seconds,
        and for classifiers accuracy and val_accuracy, for a distilled student
        agreement (top-1 matching the teachers', 0-1; its loss is the
        distillation loss) and val_accuracy, for pretraining phase (its loss is
        the reconstruction loss)."""

    def on_plan(self, plan, similarity) -> None:
        """The plan `train` decided (a `Plan`) and its evidence (a `Similarity`)."""

    def on_note(self, text: str) -> None:
        """Something the user should know: a retry, a fallback, a resume."""


QUIET = Reporter()
