"""Reading `.keras` files safely: integrity, declared input size, facts, loading.

A `.keras` file is a zip archive holding `config.json` (the architecture),
the weights and, for models this tool saved, `finetune.json` (class names,
input size). Everything here is checked from the archive before Keras builds
anything, so a truncated file or a model declaring 30000 px inputs is refused
with one line instead of a traceback or an exhausted memory.

Reading is bounded: each member's declared size is checked against its cap
(`config.ARCHIVE_JSON_MAX_BYTES` for the JSON members, `ARCHIVE_MAX_BYTES` for
all together) before anything is inflated, and inflating is capped as well, so
a zip bomb (`config.json` of 2 GB of spaces in a 2 MB file) is refused in
milliseconds. The archive is checked and its JSON members read once per process
and file version, however many checks ask (`checked_members`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from finetune_cli.config import ARCHIVE_JSON_MAX_BYTES, ARCHIVE_MAX_BYTES, IMAGE_SIZE_RANGE
from finetune_cli.errors import BackboneError, FinetuneError
from finetune_cli.files import parse_json, writing
from finetune_cli.runtime.keras import import_keras

#: The archive members read (and kept) by `archive_entries`: Keras' own and this tool's facts.
JSON_MEMBERS = ("config.json", "metadata.json", "finetune.json")
#: Archives already checked in this process: (path, device, inode, size, mtime) -> {member: bytes}.
_CHECKED: dict[tuple, dict[str, bytes]] = {}
_CHECKED_MAX = 4


def archive_json(path: Path, name: str, error: type[FinetuneError] = BackboneError) -> dict | None:
    """A JSON entry of a `.keras` archive, or None when the archive has no such entry (see `archive_entries`)."""
    return archive_entries(path, (name,), error)[0]


def archive_entries(path: Path, names: tuple[str, ...], error: type[FinetuneError] = BackboneError) -> list:
    """JSON entries (of `JSON_MEMBERS`) of a `.keras` archive, each None when absent.

    The archive is checked and its small members read once per process and
    file version (`checked_members`), however many callers ask.

    Raises:
        `error`: the file is missing, truncated or corrupt (the zip's CRCs are checked), a member is
            larger than its cap (a zip bomb), or a JSON member is malformed or nested too deeply.
    """
    members = checked_members(path, error)
    return [parse_json(members[name], f"{path} (member {name})", error) if name in members else None
            for name in names]


def checked_members(path: Path, error: type[FinetuneError] = BackboneError) -> dict[str, bytes]:
    """{name: bytes} of the archive's `JSON_MEMBERS`, after checking the whole archive within caps.

    Before anything is inflated, each member's declared size is checked (JSON members at most
    `config.ARCHIVE_JSON_MAX_BYTES`, all members together at most `config.ARCHIVE_MAX_BYTES`);
    then JSON members are read with a hard cap (a header may lie) and every other member is
    streamed through its CRC check, counted against the same caps.

    Raises:
        `error`: as `archive_entries`.
    """
    try:
        stat = os.stat(path)
        key = (str(Path(path).absolute()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in _CHECKED:
            return _CHECKED[key]
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_declared(infos, path, error)
            members = {info.filename: _inflate(archive, info, path, error) for info in infos}
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise error(f"{path} is truncated or corrupt (not a complete .keras file: {exc}); "
                    "save or copy it again") from None
    kept = {name: data for name, data in members.items() if name in JSON_MEMBERS}
    while len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = kept
    return kept


def _check_declared(infos: list, path: Path, error: type[FinetuneError]) -> None:
    """Refuse a member whose header declares more than its cap, before inflating anything."""
    for info in infos:
        if info.filename in JSON_MEMBERS and info.file_size > ARCHIVE_JSON_MAX_BYTES:
            raise error(_bomb(path, info.filename, f"declares {info.file_size:,} bytes inflated",
                              ARCHIVE_JSON_MAX_BYTES))
    total = sum(info.file_size for info in infos)
    if total > ARCHIVE_MAX_BYTES:
        largest = max(infos, key=lambda info: info.file_size)
        raise error(_bomb(path, largest.filename, f"declares {largest.file_size:,} bytes inflated (all members "
                                                  f"{total:,})", ARCHIVE_MAX_BYTES))


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, error) -> bytes:
    """A JSON member's bytes, or b"" for another member once its CRC is checked; capped while reading."""
    is_json = info.filename in JSON_MEMBERS
    cap = ARCHIVE_JSON_MAX_BYTES if is_json else ARCHIVE_MAX_BYTES
    chunks, seen = [], 0
    with archive.open(info) as stream:
        while chunk := stream.read(1 << 20):
            seen += len(chunk)
            if seen > cap:
                raise error(_bomb(path, info.filename, f"inflates past {cap:,} bytes (its header declares "
                                                       f"{info.file_size:,})", cap))
            if is_json:
                chunks.append(chunk)
    return b"".join(chunks)


def _bomb(path: Path, name: str, what: str, cap: int) -> str:
    return (f"{path} is refused: its member {name} {what}, over the {cap / (1 << 20):,.0f} MB cap "
            "(a zip bomb, or not a model file this tool can read); nothing was loaded")


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
    declared_input(path, error)
    try:
        return import_keras().saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise error(
            f"cannot load model file {path}: {str(exc).splitlines()[0][:300]} "
            "(files are loaded in Keras safe mode: Lambda layers and custom code are refused)"
        ) from None


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


#: The entry inside a saved model.keras archive that holds the run's facts.
MODEL_FACTS = "finetune.json"
