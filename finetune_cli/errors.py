"""One exception hierarchy for every mistake a user can make.

Each class says when it is raised. The CLI turns any `FinetuneError` into a
one-line message on stderr and exit code 2; nothing else is caught, so an
unexpected exception is a bug and shows its traceback.
"""


class FinetuneError(Exception):
    """Base class: a problem with the user's input, files or environment."""

    exit_code = 2


class FolderError(FinetuneError):
    """The image folder cannot be used as given (missing, no classes, too few images)."""


class BackboneError(FinetuneError):
    """An unknown backbone name, an unreadable model file, or a bad layer/stage."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights were asked for but cannot be downloaded or read."""


class UnsafeFileError(BackboneError):
    """A weights file would run code when loaded (a pickle naming globals outside the allowlist)."""


class RecipeError(FinetuneError):
    """A recipe file is missing, unparsable, or holds an invalid value."""


class SettingsError(FinetuneError):
    """An option value that is unknown or out of range (e.g. --noise 3)."""


class OutputError(FinetuneError):
    """An output path cannot be written (exists, read-only, disk full, bad extension)."""


class ModelFileError(FinetuneError):
    """A trained run folder or model file is missing or inconsistent."""


class TrainingError(FinetuneError):
    """Training could not produce a usable model (diverged after retries, out of memory)."""


class ExportError(FinetuneError):
    """An export cannot be made (a missing runtime, no held-out images) or fails its verification."""
