"""Reading `.keras` files safely: integrity, declared input size, facts, loading.

A `.keras` file is a zip archive holding `config.json` (the architecture),
the weights and, for models this tool saved, `finetune.json` (class names,
input size). Everything here is checked from the archive before Keras builds
anything, so a truncated file or a model declaring 30000 px inputs is refused
with one line instead of a traceback or an exhausted memory.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from finetune_cli.config import IMAGE_SIZE_RANGE
from finetune_cli.errors import BackboneError, FinetuneError


def archive_json(path: Path, name: str, error: type[FinetuneError] = BackboneError) -> dict | None:
    """A JSON entry of a `.keras` archive, or None when the archive has no such entry (see `archive_entries`)."""
    return archive_entries(path, (name,), error)[0]


def archive_entries(path: Path, names: tuple[str, ...], error: type[FinetuneError] = BackboneError) -> list:
    """JSON entries of a `.keras` archive, each None when absent; the archive is checked once.

    Raises:
        `error`: the file is missing, truncated or corrupt (the zip's CRCs are checked).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            if broken is not None:
                raise zipfile.BadZipFile(f"bad CRC in {broken}")
            present = set(archive.namelist())
            return [json.loads(archive.read(name)) if name in present else None for name in names]
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise error(f"{path} is truncated or corrupt (not a complete .keras file: {exc}); "
                    "save or copy it again") from None


def declared_input(path: Path, error: type[FinetuneError] = BackboneError) -> tuple | None:
    """The (height, width) fixed by the model's input layer, None where free; None if nothing is declared."""
    return input_of(archive_json(path, "config.json", error), path, error)


def input_of(config: dict | None, path: Path, error: type[FinetuneError] = BackboneError) -> tuple | None:
    """`declared_input` from an archive's already read `config.json`."""
    if config is None:
        raise error(f"{path} is not a Keras model file (its archive has no config.json)")
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            shape = layer.get("config", {}).get("batch_shape") or []
            if len(shape) == 4 and (shape[1] or shape[2]):
                return shape[1], shape[2]
    return None


def input_side(declared: tuple | None, requested: int | None, label: str, default: int) -> int:
    """The one image-size rule, for registry names and model files alike.

    Args:
        declared: (height, width) a model file fixes, or None.
        requested: `--image-size`, or None.
        default: the side when neither declares one.

    Returns:
        The square side in pixels, within `config.IMAGE_SIZE_RANGE`.

    Raises:
        BackboneError: a non-square or out-of-range declared size, or a
            `--image-size` that differs from it, saying which size is needed.
    """
    low, high = IMAGE_SIZE_RANGE
    if declared is not None:
        height, width = declared
        if height != width or not height:
            raise BackboneError(f"{label} takes {height}x{width} images, but finetune feeds square ones: "
                                "save the model with a square input, or with a free (None, None) one")
        if not low <= height <= high:
            raise BackboneError(f"{label} declares {height} px inputs; finetune accepts {low} to {high}: "
                                "save the model with a smaller input, or with a free (None, None) one")
        if requested and requested != height:
            raise BackboneError(f"{label} takes {height} px images, not --image-size {requested}: "
                                f"drop --image-size or pass --image-size {height}")
        return height
    side = requested or default
    if not low <= side <= high:
        raise BackboneError(f"--image-size {side} is out of range: give {low} to {high}")
    return side


def load_model_file(path: Path, error: type[FinetuneError] = BackboneError):
    """Load a `.keras` file in safe mode (no code from the file runs), after the archive checks.

    Raises:
        `error`: truncated or corrupt, or refused by Keras (Lambda layers, custom objects).
    """
    from finetune_cli.tfquiet import import_keras

    declared_input(path, error)
    try:
        return import_keras().saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise error(
            f"cannot load model file {path}: {str(exc).splitlines()[0][:300]} "
            "(files are loaded in Keras safe mode: Lambda layers and custom code are refused)"
        ) from None
