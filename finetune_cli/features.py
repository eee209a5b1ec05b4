"""Frozen-feature extraction with an on-disk cache.

An entry is keyed by the image file's content hash within a namespace named
by (backbone identity incl. weights, layer, pooling, image size), so a changed
file recomputes only itself and a renamed file costs nothing. Entries are
written atomically (temp file + rename) and carry a checksum: a corrupt entry
is detected, dropped and recomputed. A warm run imports no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_cli.config import FEATURES, SCAN, FeatureConfig, ScanConfig, default_cache_dir
from finetune_cli.data.scan import ImageRecord, Scan, Skipped
from finetune_cli.errors import OutputError
from finetune_cli.files import atomic_write_bytes, check_output_file, read_json, remove_stale_temps, shown, writing
from finetune_cli.models.backbones import BaseRef

CHECKSUM_BYTES = 16
#: The file that marks a folder as a feature cache (the Cache Directory Tagging
#: standard: backup tools skip such folders). `cache clear` refuses a folder without it.
TAG_NAME = "CACHEDIR.TAG"
TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by finetune (its feature cache).\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
NAMESPACE = re.compile(r"^[0-9a-f]{24}$")
ENTRY = re.compile(r"^[0-9a-f]{32}\.f(32|16)$")
#: Entry file endings by dtype: float32 features, float16 activation maps.
SUFFIX = {"float32": ".f32", "float16": ".f16"}
TMP_DIR = ".tmp"


class FeatureCache:
    """Feature vectors on disk: `root/<namespace>/<digest[:2]>/<digest>.f32` (or `.f16`).

    `root/CACHEDIR.TAG` marks the folder as ours; temporary files live in
    `root/.tmp/` until renamed into place, and a later run removes those left
    by a killed process. Only namespaces and entries of this layout are ever
    deleted.
    """

    def __init__(self, root: Path, option: str = "--cache-dir"):
        self.root = Path(root)
        self.option = option  # where `root` came from, for messages: --cache-dir or $FINETUNE_CACHE_DIR

    @classmethod
    def at(cls, cache_dir: str | os.PathLike | None = None, *, write: bool = False) -> "FeatureCache":
        """The cache in `cache_dir`, else in `config.default_cache_dir()`.

        With `write`, the folder is created (or checked) for writing now, so
        a bad `--cache-dir` fails before any work.

        Raises:
            OutputError: (write) the folder cannot be created or written, or
                it holds other files and is not a feature cache.
        """
        option = "--cache-dir" if cache_dir or not os.environ.get("FINETUNE_CACHE_DIR") else "$FINETUNE_CACHE_DIR"
        cache = cls(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), option)
        return cache.prepare() if write else cache

    def check_folder(self) -> None:
        """Refuse a cache path that exists but is not a folder (a file, a special file).

        Raises:
            OutputError: naming the path and the setting it came from.
        """
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"feature cache {self.root} is a file, not a folder: point {self.option} at a folder")

    def is_cache(self) -> bool:
        """True when the folder carries our tag, or is an older untagged cache: namespace folders only.

        (A folder that holds anything else is never adopted: its tag would make
        backup tools skip the user's files.)
        """
        tag = self.root / TAG_NAME
        try:
            if tag.is_file() and "finetune" in tag.read_text("utf-8", "replace"):
                return True
            children = [p for p in self.root.iterdir() if p.name != TMP_DIR]
        except OSError:
            return False
        return bool(children) and all(NAMESPACE.match(p.name) and p.is_dir() for p in children)

    def prepare(self) -> "FeatureCache":
        """Create or adopt the folder for writing; remove stale temporary files (see `at`)."""
        where = f"feature cache {self.root}"
        try:
            if self.root.exists() and not self.root.is_dir():
                raise OutputError(f"{where} is a file, not a folder: give another --cache-dir, or --no-cache")
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.is_cache() and any(self.root.iterdir()):
                raise OutputError(f"{where} holds other files and is not a finetune feature cache: "
                                  "give an empty or new --cache-dir, or --no-cache")
            if not (self.root / TAG_NAME).is_file():  # a new folder, or an older cache: tag it
                atomic_write_bytes(self.root / TAG_NAME, TAG_TEXT.encode())
            (self.root / TMP_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot use {where}: {exc.strerror or exc}; give a writable --cache-dir, "
                              "or --no-cache") from None
        remove_stale_temps(self.root / TMP_DIR)
        return self

    def namespace(self, ref: BaseRef, layer: str, pooling: str, view: int = 0, dtype: str = "float32") -> str:
        """A folder name for one (backbone, weights, layer, pooling, size, view, dtype) combination."""
        key = f"{ref.identity}|layer={layer}|pool={pooling}|size={ref.image_size}"
        key += (f"|view={view}" if view else "") + ("" if dtype == "float32" else f"|dtype={dtype}")
        name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        meta = self.root / name / "meta.json"
        if not meta.exists():
            self._write(meta, json.dumps({"backbone": ref.label, "key": key}).encode())
        return name

    def _path(self, namespace: str, digest: str, dtype: str = "float32") -> Path:
        return self.root / namespace / digest[:2] / f"{digest}{SUFFIX[dtype]}"

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write_bytes(path, data, tmp_dir=self.root / TMP_DIR)
        except OSError as exc:
            raise OutputError(f"cannot write to the feature cache {self.root}: {exc.strerror or exc} "
                              "(disk full?); give another --cache-dir, or --no-cache") from None

    def get(self, namespace: str, digest: str, dtype: str = "float32") -> np.ndarray | None:
        """The cached vector (1-D, of `dtype`), or None if absent or corrupt."""
        path = self._path(namespace, digest, dtype)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        check, payload = blob[:CHECKSUM_BYTES], blob[CHECKSUM_BYTES:]
        width = np.dtype(dtype).itemsize
        if hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest() != check or len(payload) % width:
            path.unlink(missing_ok=True)
            return None
        return np.frombuffer(payload, dtype=dtype)

    def put(self, namespace: str, digest: str, vector: np.ndarray, dtype: str = "float32") -> None:
        payload = np.ascontiguousarray(vector, dtype=dtype).tobytes()
        check = hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()
        self._write(self._path(namespace, digest, dtype), check + payload)

    def _namespaces(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if NAMESPACE.match(p.name) and p.is_dir())
        except OSError:
            return []

    @staticmethod
    def _entries(space: Path) -> list[Path]:
        return [p for p in space.glob("??/*.f*") if ENTRY.match(p.name)]

    def info(self) -> dict:
        """Location, entry count and bytes, per namespace and in total (an unreadable meta.json is shown as such).

        Raises:
            OutputError: the cache path is a file (`check_folder`).
        """
        self.check_folder()
        spaces = []
        for space in self._namespaces():
            files = self._entries(space)
            try:
                described = read_json(space / "meta.json")
                described = described if isinstance(described, dict) else {}
            except (OSError, ValueError):
                described = {"backbone": "? (unreadable meta.json)"}
            spaces.append({
                "namespace": space.name,
                "backbone": described.get("backbone"),
                "key": described.get("key"),
                "entries": len(files),
                "bytes": sum(f.stat().st_size for f in files),
            })
        return {
            "path": str(self.root),
            "entries": sum(s["entries"] for s in spaces),
            "bytes": sum(s["bytes"] for s in spaces),
            "namespaces": spaces,
        }

    def clear(self) -> int:
        """Delete every entry this cache wrote; returns how many. Anything else stays.

        Raises:
            OutputError: the path is a file, or a folder that is not a feature cache (nothing is deleted).
        """
        if not self.root.exists():
            return 0
        self.check_folder()
        if not self.is_cache():
            raise OutputError(f"{self.root} is not a finetune feature cache (it has no {TAG_NAME}): nothing was "
                              "deleted; give the folder `finetune cache info` shows")
        removed = 0
        for space in self._namespaces():
            for entry in self._entries(space):
                entry.unlink(missing_ok=True)
                removed += 1
            (space / "meta.json").unlink(missing_ok=True)
            for folder in [*space.glob("??"), space]:
                _remove_if_empty(folder)
        remove_stale_temps(self.root / TMP_DIR)
        return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


@dataclass
class FeatureTable:
    """Features for the usable images of a scan.

    Attributes:
        records: the images, in row order.
        features: float32 (n, d); None when only the cache was filled (`keep=False`).
        layer: the layer the features come from.
        skipped: files that failed at decode time (after the scan), if any.
        computed: how many rows were computed (the rest came from the cache).
        notes: what the user should know (a batch lowered to fit memory).
    """

    records: list[ImageRecord]
    features: np.ndarray | None
    layer: str
    skipped: list[Skipped]
    computed: int
    notes: list[str] = field(default_factory=list)


def memory_batch(batch_size: int, image_size: int, settings: FeatureConfig = FEATURES) -> int:
    """The largest batch, 1 to `batch_size`, whose forward pass stays under `settings.memory_budget_mb`.

    The estimate is by pixels: one image costs S * S * 3 * 4 bytes (its float32 input) times
    `settings.activation_factor` (the activations and buffers alongside): at the defaults (2 GB, 8x)
    batch 32 stays 32 up to 836 px, and becomes 21 at 1024 px, 9 at 1500 px, 5 at 2048 px.
    """
    per_image = image_size * image_size * 3 * 4 * settings.activation_factor
    return max(1, min(batch_size, int(settings.memory_budget_mb * (1 << 20) // per_image)))


def batch_note(batch_size: int, batch: int, image_size: int, settings: FeatureConfig = FEATURES) -> str:
    """The note saying a batch was lowered by `memory_batch`."""
    return (f"batch {batch_size} -> {batch} at {image_size} px to stay under {settings.memory_budget_mb / 1024:g} GB "
            "of memory (a lower --image-size allows larger batches)")


def extract(scan: Scan, ref: BaseRef, *, layer: str | int | None = None, **options) -> FeatureTable:
    """Features of every usable image in `scan` from one layer; see `extract_many`."""
    return extract_many(scan, ref, layers=[layer], **options)[0]


def extract_many(
    scan: Scan,
    ref: BaseRef,
    *,
    layers: list[str | int | None],
    pooling: str | tuple[str, ...] = "avg",
    batch_size: int = 32,
    view: int = 0,
    cache: FeatureCache | None = None,
    config: ScanConfig = SCAN,
    progress: Callable[[int, int], None] | None = None,
    backbone=None,
    dtype: str | tuple[str, ...] = "float32",
    keep: bool | tuple[bool, ...] = True,
    note: Callable[[str], None] | None = None,
) -> list[FeatureTable]:
    """Features of every usable image in `scan`, from the cache where possible.

    Images missing from the cache for any layer go through the backbone once,
    every requested layer computed in that pass; each batch is cached at once.
    At large image sizes the batch is lowered to fit memory (`memory_batch`).

    Args:
        layers: each None (final features), a stage index, or a layer name.
        pooling: `avg` or `max` over a 4-D map's spatial axes, or `none` (the
            whole map, flattened: activations), or `maxarg` (each channel's
            maximum, then its flat argmax: 2C values); one, or one per layer.
        dtype: what the cache stores, `float32` or `float16` (one, or one per layer).
        keep: False fills the cache and returns no features, so memory stays
            flat however large the maps (needs a cache); one, or one per layer.
        view: 0 the image; k >= 1 its k-th augmented view (flip, crop); -1 its mirror (`augmented_view`).
        backbone: an already built `Backbone` for `ref`, to avoid rebuilding.
        note: told once when the batch is lowered (also in each table's notes).

    Returns:
        One `FeatureTable` per layer, rows following `scan.images` (minus late failures).
    """
    poolings, dtypes, keeps = _options(layers, pooling, dtype, keep, cache)
    keys = ["final" if layer in (None, "") else str(layer) for layer in layers]
    spaces = [cache.namespace(ref, *k) if cache else "" for k in zip(keys, poolings, [view] * len(keys), dtypes)]
    grids, missing = _lookup(scan, cache, spaces, dtypes, keeps)
    failed, notes = set(), []
    if missing:
        from finetune_cli.models.features import feature_batches

        batch, notes = _fitting_batch(batch_size, ref.image_size, note)
        paths = [scan.root / scan.images[i].path for i in missing]
        for start, matrices, ok in feature_batches(ref, paths, layers, poolings, batch, config, view, backbone):
            rows = missing[start : start + len(ok)]
            failed.update(i for i, good in zip(rows, ok) if not good)
            _store(scan, cache, grids, spaces, matrices, rows, ok, dtypes, keeps)
            if progress:
                progress(len(scan.images) - len(missing) + start + len(ok), len(scan.images))
    elif progress:
        progress(len(scan.images), len(scan.images))
    skipped = [Skipped(scan.images[i].path, "could not be read at extraction time") for i in sorted(failed)]
    rows = [i for i in range(len(scan.images)) if i not in failed]
    records = [scan.images[i] for i in rows]
    return [FeatureTable(records, np.stack([grid[i] for i in rows]).astype(np.float32) if kept else None, key,
                         skipped, len(missing), list(notes)) for grid, key, kept in zip(grids, keys, keeps)]


def _options(layers, pooling, dtype, keep, cache) -> tuple[tuple, tuple, tuple]:
    """(poolings, dtypes, keeps), one per layer, checked (see `extract_many`)."""
    poolings, dtypes, keeps = (_each(v, len(layers)) for v in (pooling, dtype, keep))
    if not set(poolings) <= {"avg", "max", "none", "maxarg"}:
        raise ValueError(f"Expected pooling 'avg', 'max', 'none' or 'maxarg'. Received: pooling={pooling!r}")
    if not all(keeps) and cache is None:
        raise ValueError("keep=False needs a cache to fill")
    return poolings, dtypes, keeps


def _fitting_batch(batch_size: int, image_size: int, note) -> tuple[int, list[str]]:
    """(`memory_batch`, [the note saying so] or []), the note also told to `note` when given."""
    batch = memory_batch(batch_size, image_size)
    if batch == batch_size:
        return batch, []
    text = batch_note(batch_size, batch, image_size)
    if note:
        note(text)
    return batch, [text]


def _lookup(scan: Scan, cache, spaces, dtypes, keeps) -> tuple[list[list], list[int]]:
    """(per layer: per image the cached vector, True (cached, not kept) or None; images missing any layer)."""
    cached = lambda space, r, dt: cache.get(space, r.digest, dt) if cache else None  # noqa: E731
    grids = [[(cached(space, r, dt) if kept else (cached(space, r, dt) is not None or None)) for r in scan.images]
             for space, dt, kept in zip(spaces, dtypes, keeps)]
    return grids, [i for i in range(len(scan.images)) if any(grid[i] is None for grid in grids)]


def _each(value, n: int) -> tuple:
    """A per-layer tuple from one value or a sequence of n."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _store(scan: Scan, cache, grids, spaces, matrices, rows: list[int], ok, dtypes, keeps) -> None:
    """Keep one computed batch, and cache it now: an interrupted pass keeps every finished batch."""
    for grid, space, matrix, dtype, kept in zip(grids, spaces, matrices, dtypes, keeps):
        for i, vector, good in zip(rows, matrix, ok):
            if good and grid[i] is None:
                grid[i] = vector if kept else True
                if cache:
                    cache.put(space, scan.images[i].digest, vector, dtype)


TABLE_FORMATS = (".parquet", ".csv", ".npz")


def check_table_path(path: Path, overwrite: bool = False) -> Path:
    """Validate a feature-table path before any work (see `files.check_output_file`)."""
    return check_output_file(path, overwrite=overwrite, suffixes=TABLE_FORMATS)


def write_table(table: FeatureTable, path: Path) -> Path:
    """Write path, label, f0..f{d-1} in the format the extension names; atomically.

    Paths are shown as text (`files.shown`). Call `check_table_path` before
    the work; a failed write (disk full, file-size limit) replaces nothing.

    Raises:
        OutputError.
    """
    path = Path(path).expanduser().absolute()
    paths = [shown(r.path) for r in table.records]
    labels = [r.label for r in table.records]
    suffix = path.suffix.lower()
    with writing(path) as tmp:
        if suffix == ".npz":
            np.savez(tmp, path=np.array(paths), label=np.array(labels), features=table.features)
        else:
            import pandas as pd

            frame = pd.DataFrame(table.features, columns=[f"f{i}" for i in range(table.features.shape[1])])
            frame.insert(0, "label", labels)
            frame.insert(0, "path", paths)
            if suffix == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, index=False)
    return path
