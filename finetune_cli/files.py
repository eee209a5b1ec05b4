"""Files on disk: atomic writes, leftover cleanup, output checks. No TensorFlow.

Every file the tool writes goes through `atomic_path`: a temporary file in the
same folder (or a given temporary folder on the same disk), renamed over the
target when complete. The temporary file's name says who wrote it,

    .<target name>.~<host>.<pid>~<random><suffix>

so that a later run can tell a leftover of a killed process (same host, pid no
longer alive) from a file another live process is still writing, and remove
only the former (`remove_stale_temps`). A target name too long for that to fit
the file-system limit (`NAME_MAX` bytes) is cut and followed by a hash of the
whole name (`temp_target`), the same in every process. Staging folders (a
whole output built before it is moved in place) are named the same way.

Output folders, one rule for every command (`output_folder`, `claim_numbered`,
`create_folder`): a default folder or file `runs/<stem>-<N>` is created
exclusively when its number is picked, so two commands started together never
share one; a folder the tool creates carries `config.OUTPUT_MARKER` (so scans
skip it); an existing non-empty --out is refused unless --overwrite, and even
then only the command's own earlier outputs are replaced, never other files.
A failed write (disk full, read-only, name too long) is one `OutputError`
naming the path and what to do (`write_error`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from finetune_cli.config import JSON_MAX_BYTES, OUTPUT_MARKER, RUNS_DIR
from finetune_cli.errors import ModelFileError, OutputError

HOST = socket.gethostname().replace("~", "-").replace("/", "-")[:64]
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.~(?P<host>.+)\.(?P<pid>\d+)~")
#: A temporary file this old is a leftover whoever wrote it (shared folders, other hosts).
STALE_AFTER_S = 24 * 3600
#: The longest file name (bytes) of the usual file systems; every temporary name fits it.
NAME_MAX = 255
#: Bytes a temporary name keeps for its pid (10 digits), mkstemp's random part (8) and its suffix.
_PID_ROOM, _RANDOM_ROOM, SUFFIX_MAX = 10, 8, 24
#: errno values of a failed write that are the output's fault, not a bug: one line, not a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG,
                          errno.EACCES, errno.EPERM, errno.EIO})


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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path.name), suffix=_temp_suffix(suffix))
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_target(name: str) -> str:
    """The part of a temporary name that stands for the target file `name`.

    `name` itself, or, when `.<name>.~<host>.<pid>~<random><suffix>` could pass
    `NAME_MAX` bytes, its longest head that fits followed by `-` and 12 hex
    digits of a hash of the whole name: the same in every process, so
    `remove_stale_temps(folder, name)` still recognises the leftovers.
    """
    room = NAME_MAX - len(os.fsencode(f"..~{HOST}.~")) - _PID_ROOM - _RANDOM_ROOM - SUFFIX_MAX
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    head = encoded[: room - 13].decode("utf-8", "ignore") if _utf8(encoded) else os.fsdecode(encoded[: room - 13])
    return f"{head}-{hashlib.sha1(encoded).hexdigest()[:12]}"


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def temp_prefix(name: str) -> str:
    """`.<temp_target(name)>.~<host>.<pid>~`: how this process's temporary files and staging folders for `name`
    begin."""
    return f".{temp_target(name)}.~{HOST}.{os.getpid()}~"


def _temp_suffix(suffix: str) -> str:
    """`suffix`, or `.tmp` for one longer than `SUFFIX_MAX` bytes (the writers that go by it use short ones)."""
    return suffix if len(os.fsencode(suffix)) <= SUFFIX_MAX else ".tmp"


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
    """Remove leftover temporary files and staging folders (`is_stale_temp`) directly in `folder`; how many.

    Args:
        target: only those of this file name (in a user's folder, touch
            nothing but the leftovers of the file being written).
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    prefix = None if target is None else f".{temp_target(target)}.~"
    for entry in entries:
        path = Path(entry.path)
        mine = prefix is None or entry.name.startswith(prefix)
        if not mine or not is_stale_temp(path):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)  # a staging folder (`staging_folder`)
            else:
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
        raise write_error(path, exc) from None


#: What to do about a failed write, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.ENAMETOOLONG: "a name is too long for the file system: choose a shorter --out",
    errno.EFBIG: "the file passes a file-size limit (ulimit -f?): raise it or choose another --out",
    errno.EACCES: "permission denied: choose another --out",
    errno.EPERM: "not permitted: choose another --out",
}


def write_error(path, exc: OSError, doing: str = "write") -> OutputError:
    """The one-line error of a failed write: the path, the system's reason, and what to do.

    Args:
        doing: the verb of the message ("write", "create", "write into").
    """
    hint = _WRITE_HINTS.get(exc.errno, "choose another --out")
    return OutputError(f"cannot {doing} {path}: {exc.strerror or exc}; {hint}; nothing was replaced")


# ---------------------------------------------------------------- output folders: one rule


def write_marker(folder: Path, command: str | None = None) -> None:
    """Mark `folder` as an output of the tool: `OUTPUT_MARKER`, a tiny JSON ({"tool", "command"})."""
    facts = {"tool": "finetune", **({"command": command} if command else {})}
    (folder / OUTPUT_MARKER).write_text(json.dumps(facts) + "\n", "utf-8")


def held_names(folder: Path) -> list[str]:
    """The names in `folder` (sorted) other than `OUTPUT_MARKER`: [] when empty or holding only the marker."""
    try:
        return sorted(name for name in os.listdir(folder) if name != OUTPUT_MARKER)
    except OSError:
        return []


def create_folder(path: Path, *, command: str | None = None, parents: bool = False) -> bool:
    """Create the output folder `path` with its marker; False (nothing done) when it already is a folder.

    Args:
        parents: also create missing parent folders (they get no marker: they are not outputs).

    Raises:
        OutputError: a file is in the way, or the folder cannot be created.
    """
    if parents and not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(path.parent, exc, "create") from None
    try:
        path.mkdir()
    except FileExistsError:
        if path.is_dir():
            return False
        raise OutputError(f"--out {path} is a file: give a folder") from None
    except OSError as exc:
        raise write_error(path, exc, "create") from None
    _mark_new(path, command)
    return True


def _mark_new(path: Path, command: str | None) -> None:
    """Write the marker into the folder `path` just made; on failure remove the folder and raise OutputError."""
    try:
        write_marker(path, command)
    except OSError as exc:
        path.rmdir()
        raise write_error(path, exc, "write into") from None


def remove_created(path: Path) -> None:
    """Undo `create_folder`: remove the marker and the folder, if nothing else is in it."""
    (path / OUTPUT_MARKER).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass


def numbered(stem: str, suffix: str = "", root: Path = RUNS_DIR) -> Path:
    """The next free name `root/<stem>-<N><suffix>`, N one more than the highest taken (from 1).

    The stem is made file-name safe and cut to 100 characters. Only names a
    caller then creates exclusively are safe from a concurrent command: use
    `claim_numbered`.
    """
    stem = (re.sub(r"[^\w.-]+", "_", stem).strip("._") or "run")[:100]
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+){re.escape(suffix)}$")
    taken = [int(m[1]) for p in (root.iterdir() if root.is_dir() else ()) if (m := pattern.match(p.name))]
    return root / f"{stem}-{max(taken, default=0) + 1}{suffix}"


def claim_numbered(stem: str, suffix: str = "", root: Path = RUNS_DIR, *, command: str | None = None,
                   file: bool = False) -> Path:
    """A new `root/<stem>-<N><suffix>`, created exclusively now: two commands started together never get one name.

    A folder gets the output marker; with `file`, an empty file is created
    (the caller replaces it atomically). `root` is created with its marker
    when missing. A number taken meanwhile (FileExistsError) moves on to the next.

    Raises:
        OutputError: `root` cannot be written.
    """
    root = Path(root).expanduser().absolute()
    create_folder(root, parents=True)
    for _ in range(1000):
        path = numbered(stem, suffix, root)
        try:
            if file:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
                return path
            path.mkdir()
        except FileExistsError:
            continue  # another command took it a moment ago
        except OSError as exc:
            raise write_error(path, exc, "create") from None
        _mark_new(path, command)
        return path
    raise OutputError(f"cannot find a free name for {stem}-N{suffix} under {root}: give --out")


@contextmanager
def drop_if_empty(path: Path | None) -> Iterator[None]:
    """When the block fails, remove `path` if it is still an empty file (a name `claim_numbered` claimed
    with `file`, never written); None: nothing to do."""
    try:
        yield
    except BaseException:
        if path is not None and path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
            path.unlink()
        raise


def staging_folder(parent: Path, target: str) -> Path:
    """A new hidden folder in `parent` to build the output `target` in before it is moved in place.

    Named like `atomic_path`'s temporary files (`temp_prefix(target)` + random
    + `.staging`, within `NAME_MAX`), so `remove_stale_temps(parent)` removes it
    once its process is gone or it is a day old.

    Raises:
        OSError: `parent` does not accept it.
    """
    return Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(target), suffix=".staging"))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the same cleanup runs.

    Only in the main thread (elsewhere a no-op); the previous handler is restored after. A library that
    catches the KeyboardInterrupt and raises its own error (TensorFlow does, when the signal lands while a
    tf.function binds its inputs) still ends as KeyboardInterrupt, chained to that error.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except Exception as exc:
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}") from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], None]]:
    """Within the block, Ctrl-C is held until the loop asks: yields `check()`, which raises KeyboardInterrupt
    once SIGINT has arrived. A second Ctrl-C raises at once.

    A KeyboardInterrupt raised wherever the signal happens to land can be lost: inside TensorFlow's iterator
    or a finaliser it is swallowed, and training goes on. Raised from the loop's own code, between steps, it
    always reaches the cleanup. Only in the main thread, and only over Python's default handler (an
    embedding program's own handler is left alone); elsewhere `check` does nothing.
    """
    hits: list[int] = []

    def check() -> None:
        if hits:
            raise KeyboardInterrupt

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield check
        return

    def hold(signum, frame):
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check()  # a Ctrl-C after the last step still interrupts


@dataclass
class OutputFolder:
    """The output folder of one command that writes a set of files (a gallery: explain, attack, audit, ...).

    Attributes:
        path: the folder, absolute.
        created: made by this command (removed again when the command fails).
        command: the command's name (`explain`), in the marker and in messages.
        owned: the top-level names the command writes (files, or `maps` folder): all it replaces.
    """

    path: Path
    created: bool
    command: str
    owned: tuple[str, ...]

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A staging folder inside `path` to write the whole output into, then moved in place.

        When the block ends well, the command's earlier outputs (`owned`) are
        removed and the staged entries moved in: old and new never mix. On any
        failure, Ctrl-C or SIGTERM the staging folder is removed, and `path`
        too when this command created it.

        Raises:
            OutputError: a write failed (disk full, read-only, a name too long).
        """
        try:
            staging = staging_folder(self.path, self.command)
        except OSError as exc:
            self.discard()
            raise write_error(self.path, exc, "write into") from None
        try:
            with sigterm_as_interrupt():
                yield staging
                self._commit(staging)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.discard()
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
                raise write_error(self.path, exc, "write into") from None
            if isinstance(exc, OutputError):  # name the output, not the staging folder that is gone
                raise OutputError(str(exc).replace(str(staging), str(self.path))) from None
            raise

    def _commit(self, staging: Path) -> None:
        for name in self.owned:
            _remove(self.path / name)
        for name in sorted(os.listdir(staging)):
            os.replace(staging / name, self.path / name)
        staging.rmdir()

    def discard(self) -> None:
        """Remove the folder if this command created it (and nothing else was put in it)."""
        if self.created:
            remove_created(self.path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def output_folder(out, stem: str, *, command: str, owned: tuple[str, ...] = (), overwrite: bool = False,
                  root: Path = RUNS_DIR) -> OutputFolder:
    """The output folder of `command`, checked before any work (see `OutputFolder.staged` for the writing).

    - None: a new numbered `root/<stem>-<N>`, created exclusively now (`claim_numbered`).
    - a missing `out`: created with the marker, only inside an existing folder
      (a typo in its parent is refused, not built).
    - an existing folder: leftovers of killed runs are removed; then it must be
      empty (the marker aside), or with `overwrite` hold nothing but `owned`
      names, this command's earlier outputs: the tool never deletes a file it
      did not write, so a folder holding other files is refused even then.

    Raises:
        OutputError: `out` is a file, holds files (see above), cannot be created or written.
    """
    if out is None:
        return OutputFolder(claim_numbered(stem, root=root, command=command), True, command, tuple(owned))
    folder = Path(out).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file: give a folder")
    created = False
    if folder.is_dir():
        remove_stale_temps(folder)
        _check_reusable(folder, command, owned, overwrite)
    elif folder.parent.is_dir():
        created = create_folder(folder, command=command)
    try:
        check_writable_folder(folder)
    except OutputError:
        if created:
            remove_created(folder)
        raise
    return OutputFolder(folder, created, command, tuple(owned))


def _check_reusable(folder: Path, command: str, owned: tuple[str, ...], overwrite: bool) -> None:
    held = held_names(folder)
    listed = lambda names: ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")  # noqa
    if held and not overwrite:
        raise OutputError(f"--out {folder} already holds {listed(held)}: pass --overwrite to replace the earlier "
                          f"`finetune {command}` output, or choose another --out")
    foreign = [name for name in held if name not in owned]
    if foreign:
        raise OutputError(f"--out {folder} holds {listed(foreign)}, not written by `finetune {command}`: "
                          f"--overwrite replaces only its own files ({', '.join(owned)}); choose another --out")


def shown(path: str) -> str:
    """A path as printable text: bytes that are not UTF-8 appear as \\xNN escapes.

    File names from old archives may hold Latin-1 bytes; Python keeps them as
    surrogate escapes, which no text output (JSON, CSV, the terminal) accepts.
    """
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- bounded JSON reading


class JSONFileError(ModelFileError, ValueError):
    """A JSON file of the tool's own is too large, not UTF-8, not JSON, or nested too deeply.

    Also a ValueError, so that a caller which treats an unreadable file as
    damaged or absent (`except (OSError, ValueError)`) keeps doing so.
    """


def read_json(path, *, max_bytes: int = JSON_MAX_BYTES, error: type[Exception] = JSONFileError):
    """The JSON value in the file `path`, read through a size cap: never more than `max_bytes` + 1 bytes.

    Args:
        max_bytes: the largest file accepted (default `config.JSON_MAX_BYTES`); the declared size
            (stat) is checked before reading, the bytes read are capped too (a growing file).
        error: what a bad content raises; a one-line message naming `path`.

    Raises:
        OSError: the file cannot be opened or read (missing, a folder, no permission).
        `error`: larger than `max_bytes`, not UTF-8, not JSON, or nested too deeply.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise error(_too_large(str(path), size, max_bytes))
        data = handle.read(max_bytes + 1)
    return parse_json(data, str(path), error, max_bytes=max_bytes)


def parse_json(text: str | bytes, name: str, error: type[Exception] = JSONFileError, *,
               max_bytes: int | None = None):
    """`json.loads(text)` that fails in one line naming `name`, never with a RecursionError.

    Args:
        text: JSON text, or bytes (UTF-8, -16 or -32).
        max_bytes: if given, a longer `text` is refused before parsing.

    Raises:
        `error`: too long, not UTF-8, not JSON, or nested deeper than Python's recursion limit
            (about 1,000 levels; the tool's own files nest fewer than 20).
    """
    if max_bytes is not None and len(text) > max_bytes:
        raise error(_too_large(name, len(text), max_bytes, at_least=True))
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{name} is JSON nested too deeply to read (more than about {_depth()} levels): it is not "
                    "a file this tool wrote; restore or remove it") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise error(f"{name} is not valid JSON ({detail}): restore or remove it") from None


def _too_large(name: str, size: int, cap: int, at_least: bool = False) -> str:
    held = f"more than {cap:,}" if at_least else f"{size:,}"
    return (f"{name} holds {held} bytes, over the {cap / (1 << 20):g} MB cap on a JSON file of this tool: "
            "it is not a file this tool wrote; restore or remove it")


def _depth() -> int:
    import sys

    return sys.getrecursionlimit()


def jsonable(value):
    """`json.dumps` default for the values runs hold: arrays and numpy numbers (`tolist`), paths (text)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
