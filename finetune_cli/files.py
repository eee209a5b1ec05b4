"""Files on disk: atomic writes, leftover cleanup, output checks. No TensorFlow.

Every file the tool writes goes through `atomic_path`: a temporary file in the
same folder (or a given temporary folder on the same disk), renamed over the
target when complete. The temporary file's name says who wrote it,

    .<target name>.~<host>.<pid>~<random><suffix>

so that a later run can tell a leftover of a killed process (same host, pid no
longer alive) from a file another live process is still writing, and remove
only the former (`remove_stale_temps`).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune_cli.errors import OutputError

HOST = socket.gethostname().replace("~", "-").replace("/", "-")
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.~(?P<host>.+)\.(?P<pid>\d+)~")
#: A temporary file this old is a leftover whoever wrote it (shared folders, other hosts).
STALE_AFTER_S = 24 * 3600


def _file_mode() -> int:
    """The mode an ordinary new file gets under the process umask (mkstemp's 0600 is for secrets)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp", tmp_dir: Path | None = None) -> Iterator[Path]:
    """A temporary file to write; it replaces `path` when the block ends well.

    On any error (or Ctrl-C) the temporary file is removed and `path` keeps
    its old content. The result gets an ordinary file's mode under the umask.

    Args:
        suffix: the temporary file's ending, for writers that go by it (Keras).
        tmp_dir: where the temporary file lives (same file system as `path`);
            default: beside `path`.
    """
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.~{HOST}.{os.getpid()}~", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `data` to `path` via a temporary file and a rename (see `atomic_path`)."""
    with atomic_path(path, tmp_dir=tmp_dir) as tmp:
        tmp.write_bytes(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """True for a temporary file of `atomic_path` whose writer is gone.

    Gone means: written on this host by a pid that is no longer alive, or
    older than `STALE_AFTER_S` whoever wrote it.
    """
    match = TEMP_NAME.match(path.name)
    if not match:
        return False
    if match["host"] == HOST and not _alive(int(match["pid"])):
        return True
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def remove_stale_temps(folder: Path, target: str | None = None) -> int:
    """Remove leftover temporary files (see `is_stale_temp`) directly in `folder`; returns how many.

    Args:
        target: only those of this file name (in a user's folder, touch
            nothing but the leftovers of the file being written).
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        path = Path(entry.path)
        mine = target is None or entry.name.startswith(f".{target}.~")
        if mine and entry.is_file(follow_symlinks=False) and is_stale_temp(path):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def check_output_file(path, *, overwrite: bool = False, suffixes: tuple[str, ...] = (),
                      option: str = "--out") -> Path:
    """Validate an output file path before any work; returns it absolute.

    Checks: a known ending (when `suffixes` is given), an existing parent
    folder that accepts new files, and no existing file unless `overwrite`
    (never a folder or a special file).

    Raises:
        OutputError: saying what is wrong and what to do.
    """
    path = Path(path).expanduser().absolute()
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"cannot write {path}: the extension must be one of {', '.join(suffixes)}")
    if path.exists() or path.is_symlink():
        kind = _kind(path)
        if kind != "file":
            raise OutputError(f"{option} {path} is {kind}, not a file: give the path of a new file")
        if not overwrite:
            raise OutputError(f"{path} already exists: pass --overwrite to replace it, or choose another {option}")
    check_writable_folder(path.parent, option)
    remove_stale_temps(path.parent, path.name)
    return path


def check_writable_folder(folder: Path, option: str = "--out") -> None:
    """Refuse a folder that is missing, not a folder, or does not accept new files.

    Raises:
        OutputError.
    """
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"cannot write into {folder}: it {what}; create the folder first or choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}; choose another {option}") from None


def _kind(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link"
    if stat.S_ISREG(mode):
        return "file"
    return "a folder" if stat.S_ISDIR(mode) else "a special file (device, pipe or socket)"


@contextmanager
def writing(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """`atomic_path` that turns a failed write (disk full, file-size limit, read-only) into OutputError.

    Args:
        suffix: the temporary file's ending, for writers that go by it
            (`.keras`, `.weights.h5`); default: the target's own.
    """
    try:
        with atomic_path(path, suffix or path.suffix or ".tmp") as tmp:
            yield tmp
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc} (disk full or a file-size limit?); "
                          "nothing was replaced") from None


def shown(path: str) -> str:
    """A path as printable text: bytes that are not UTF-8 appear as \\xNN escapes.

    File names from old archives may hold Latin-1 bytes; Python keeps them as
    surrogate escapes, which no text output (JSON, CSV, the terminal) accepts.
    """
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
