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
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from finetune_cli.config import SCAN, ScanConfig, default_cache_dir
from finetune_cli.data.scan import ImageRecord, Scan, Skipped
from finetune_cli.errors import OutputError
from finetune_cli.models.backbones import BaseRef

CHECKSUM_BYTES = 16


def _file_mode() -> int:
    """The mode an ordinary new file gets under the process umask (mkstemp's 0600 is for secrets)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside `path` to write; it replaces `path` when the block ends well.

    On any error (or Ctrl-C) the temporary file is removed and `path` keeps
    its old content. The result gets an ordinary file's mode under the umask.
    `suffix` is the temporary file's ending, for writers that go by it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class FeatureCache:
    """Feature vectors on disk: `root/<namespace>/<digest[:2]>/<digest>.f32`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def at(cls, cache_dir: str | os.PathLike | None = None) -> "FeatureCache":
        """The cache in `cache_dir`, else in `config.default_cache_dir()`."""
        return cls(Path(cache_dir) if cache_dir else default_cache_dir())

    def namespace(self, ref: BaseRef, layer: str, pooling: str, view: int = 0) -> str:
        """A folder name for one (backbone, weights, layer, pooling, size, view) combination."""
        key = f"{ref.identity}|layer={layer}|pool={pooling}|size={ref.image_size}"
        key += f"|view={view}" if view else ""
        name = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        meta = self.root / name / "meta.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps({"backbone": ref.label, "key": key}).encode())
        return name

    def _path(self, namespace: str, digest: str) -> Path:
        return self.root / namespace / digest[:2] / f"{digest}.f32"

    def get(self, namespace: str, digest: str) -> np.ndarray | None:
        """The cached vector (float32, 1-D), or None if absent or corrupt."""
        path = self._path(namespace, digest)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        check, payload = blob[:CHECKSUM_BYTES], blob[CHECKSUM_BYTES:]
        if hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest() != check or len(payload) % 4:
            path.unlink(missing_ok=True)
            return None
        return np.frombuffer(payload, dtype=np.float32)

    def put(self, namespace: str, digest: str, vector: np.ndarray) -> None:
        payload = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        check = hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()
        atomic_write_bytes(self._path(namespace, digest), check + payload)

    def info(self) -> dict:
        """Location, entry count and bytes, per namespace and in total."""
        spaces = []
        for meta in sorted(self.root.glob("*/meta.json")):
            files = list(meta.parent.glob("*/*.f32"))
            described = json.loads(meta.read_text())
            spaces.append({
                "namespace": meta.parent.name,
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
        """Delete every entry; returns how many were removed."""
        removed = self.info()["entries"]
        if self.root.exists():
            shutil.rmtree(self.root)
        return removed


@dataclass
class FeatureTable:
    """Features for the usable images of a scan.

    Attributes:
        records: the images, in row order.
        features: float32 (n, d).
        layer: the layer the features come from.
        skipped: files that failed at decode time (after the scan), if any.
        computed: how many rows were computed (the rest came from the cache).
    """

    records: list[ImageRecord]
    features: np.ndarray
    layer: str
    skipped: list[Skipped]
    computed: int


def extract(scan: Scan, ref: BaseRef, *, layer: str | int | None = None, **options) -> FeatureTable:
    """Features of every usable image in `scan` from one layer; see `extract_many`."""
    return extract_many(scan, ref, layers=[layer], **options)[0]


def extract_many(
    scan: Scan,
    ref: BaseRef,
    *,
    layers: list[str | int | None],
    pooling: str = "avg",
    batch_size: int = 32,
    view: int = 0,
    cache: FeatureCache | None = None,
    config: ScanConfig = SCAN,
    progress: Callable[[int, int], None] | None = None,
    backbone=None,
) -> list[FeatureTable]:
    """Features of every usable image in `scan`, from the cache where possible.

    Images missing from the cache for any layer go through the backbone once,
    with every requested layer computed in that one pass.

    Args:
        layers: each None (final features), a stage index, or a layer name.
        pooling: `avg` or `max` over the spatial axes of a 4-D map.
        view: 0 for the image as is; k >= 1 for the k-th deterministic
            augmented view (flip, crop), cached separately.
        backbone: an already built `Backbone` for `ref`, to avoid rebuilding.

    Returns:
        One `FeatureTable` per layer, rows following `scan.images` (minus late failures).
    """
    if pooling not in ("avg", "max"):
        raise ValueError(f"Expected pooling 'avg' or 'max'. Received: pooling={pooling!r}")
    keys = ["final" if layer in (None, "") else str(layer) for layer in layers]
    spaces = [cache.namespace(ref, key, pooling, view) if cache else "" for key in keys]
    grids = [[cache.get(space, r.digest) if cache else None for r in scan.images] for space in spaces]
    missing = [i for i in range(len(scan.images)) if any(grid[i] is None for grid in grids)]
    failed = set()
    if missing:
        from finetune_cli.models.features import compute_features

        records = [scan.images[i] for i in missing]
        done_before = len(scan.images) - len(missing)
        computed, ok = compute_features(
            ref, [scan.root / r.path for r in records], layers, pooling, batch_size, config, view, backbone,
            lambda done, total: progress(done_before + done, len(scan.images)) if progress else None,
        )
        for grid, space, matrix in zip(grids, spaces, computed):
            for row, (i, record) in enumerate(zip(missing, records)):
                if not ok[row]:
                    failed.add(i)
                elif grid[i] is None:
                    grid[i] = matrix[row]
                    if cache:
                        cache.put(space, record.digest, matrix[row])
    elif progress:
        progress(len(scan.images), len(scan.images))
    skipped = [Skipped(scan.images[i].path, "could not be read at extraction time") for i in sorted(failed)]
    keep = [i for i in range(len(scan.images)) if i not in failed]
    records = [scan.images[i] for i in keep]
    return [
        FeatureTable(records, np.stack([grid[i] for i in keep]).astype(np.float32), key, skipped, len(missing))
        for grid, key in zip(grids, keys)
    ]


TABLE_FORMATS = (".parquet", ".csv", ".npz")


def check_table_path(path: Path) -> Path:
    """Validate an output path before any work: known extension, writable folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in TABLE_FORMATS:
        raise OutputError(f"cannot write {path}: the extension must be one of {', '.join(TABLE_FORMATS)}")
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder for {path}: {exc.strerror}") from None
    if not os.access(path.absolute().parent, os.W_OK):
        raise OutputError(f"cannot write {path}: its folder is read-only")
    return path


def write_table(table: FeatureTable, path: Path) -> Path:
    """Write path, label, f0..f{d-1} in the format the extension names; atomically."""
    path = check_table_path(path)
    paths = [r.path for r in table.records]
    labels = [r.label for r in table.records]
    suffix = path.suffix.lower()
    with atomic_path(path.absolute(), suffix) as tmp:
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
