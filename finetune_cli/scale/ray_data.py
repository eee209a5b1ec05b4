"""`--engine ray`: `predict` and `extract-features` on a Ray cluster, written as Parquet shards.

    inputs -> listed files (driver, no decoding) -> ray.data.from_items -> map_batches(ShardWriter actors)
           -> one Parquet shard per batch (written by the actor) -> manifest.json (driver, last)

The driver only lists files; the actors read, decode (`data.images`, the rules
`inspect` uses), run the model they loaded once, and write their shard. A file
that cannot be used becomes a skipped row with its reason, never a crash. A
dead actor is restarted and its batch run again (`ScaleConfig.max_restarts`,
`max_task_retries`); shard names follow the batch's first row, so a rerun
replaces a shard instead of adding one. The rows equal the local engine's,
sorted by path. Inputs and `--out` may be local paths or URIs that pyarrow's
file systems read (`s3://`, `gs://`, `hdfs://`, `file://`). On a cluster of
several machines, local paths must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finetune_cli.config import IMAGE_SUFFIXES, JSON_MAX_BYTES, SCALE, SCAN, ScaleConfig, ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb, read_image_file
from finetune_cli.data.lists import expand_lists, is_uri
from finetune_cli.data.scan import Skipped, check_layout, is_ignored, natural_key, walk_files
from finetune_cli.errors import FinetuneError, FolderError, OutputError
from finetune_cli.files import parse_json, shown
from finetune_cli.models.backbones import build
from finetune_cli.models.stages import select_layer
from finetune_cli.runs.run import Run
from finetune_cli.scale.backend import connected

MANIFEST = "manifest.json"
FORMAT = "finetune-shards/1"
#: A local input file with one of these endings lists inputs, one per line ('#' starts a comment).


# ---------------------------------------------------------------- inputs


def filesystem(location: str):
    """(pyarrow FileSystem, path in it) for a URI, or the local file system and an absolute path."""
    from pyarrow import fs as pafs

    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except (ValueError, OSError) as exc:
            raise FolderError(f"cannot open {location}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())


def list_inputs(inputs: list[str], labelled: bool | None, relative: bool = False) -> tuple[list[dict], list[str]]:
    """The files to process, in order, without reading them: (items, URI roots they come from).

    Args:
        inputs: folders, image files, list files (`data.lists`) and URIs.
        labelled: True/None as `scan_folder` (class subfolders; None: if any), False: no labels.
        relative: local paths shown relative to their folder input (as `extract-features`), else absolute.

    Returns:
        items: dicts {index, path (text shown in the output), label, source (bytes: the path to
        read), fs (index into the URI roots; -1: local)}.

    Raises:
        FolderError: an input does not exist, or holds no file.
    """
    items, roots = [], []
    for entry in expand_lists(inputs):
        if is_uri(entry):
            roots.append(entry)
            found = _remote_files(entry, labelled, len(roots) - 1)
        else:
            found = _local_files(Path(entry).expanduser().absolute(), labelled, relative)
        items += sorted(found, key=lambda item: natural_key(item["path"]))
    if not items:
        raise FolderError(f"no files among the inputs: {', '.join(map(str, inputs))}")
    return [dict(item, index=i) for i, item in enumerate(items)], roots


def _local_files(path: Path, labelled: bool | None, relative: bool) -> list[dict]:
    """A local file or folder's files; paths shown absolute, or relative to the folder."""
    if not path.exists():
        raise FolderError(f"not found: {shown(str(path))}")
    if not path.is_dir():
        return [_item(str(path), "", os.fsencode(path), -1)]
    classes = sorted((p for p in path.iterdir() if p.is_dir() and not is_ignored(p.name)),
                     key=lambda p: natural_key(p.name))
    if labelled is None:
        labelled = bool(classes)
    if labelled:
        check_layout(path, classes)
    tops = classes if labelled else [path]
    return [_item(file.relative_to(path).as_posix() if relative else str(file), top.name if labelled else "",
                  os.fsencode(file), -1) for top in tops for file in walk_files(top, [])]


def _remote_files(uri: str, labelled: bool | None, fs_index: int) -> list[dict]:
    """A URI's files (one file, or a folder listed recursively); paths shown as URIs."""
    from pyarrow import fs as pafs

    system, base = filesystem(uri)
    try:
        info = system.get_file_info(base)
        listing = [] if info.type != pafs.FileType.Directory else \
            system.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise FolderError(f"cannot list {uri}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise FolderError(f"not found: {uri}")
    if info.type == pafs.FileType.File:
        return [_item(uri, "", base.encode(), fs_index)]
    prefix = uri.rstrip("/") + "/"
    files, folders = [], []
    for entry in listing:
        parts = entry.path[len(base.rstrip("/")) + 1:].split("/")
        if not any(is_ignored(p) for p in parts):
            (files if entry.type == pafs.FileType.File else folders).append(("/".join(parts), entry.path))
    labelled = any("/" not in rel for rel, _ in folders) if labelled is None else labelled
    if labelled and any("/" not in rel and Path(rel).suffix.lower() in IMAGE_SUFFIXES for rel, _ in files):
        raise FolderError(f"image(s) sit in {uri} beside the class folders: move them into a class folder")
    return [_item(prefix + rel, rel.split("/")[0] if labelled and "/" in rel else "", path.encode(), fs_index)
            for rel, path in files if not labelled or "/" in rel]


def _item(path: str, label: str, source: bytes, fs_index: int) -> dict:
    return {"path": shown(path), "label": label, "source": source, "fs": fs_index}


# ---------------------------------------------------------------- the actor


@dataclass(frozen=True)
class Job:
    """What every actor needs: plain, picklable values.

    Attributes:
        kind: `predict` (model: a run folder) or `features` (ref: a `BaseRef`, layer, pooling).
        out: the output folder (path or URI) the shards go to.
        roots: URI roots of remote inputs (each item's `fs` indexes them).
        threads: TensorFlow threads per actor.
    """

    kind: str
    out: str
    roots: tuple[str, ...] = ()
    model: str | None = None
    top_k: int = 1
    tta: int = 1
    ref: object = None
    layer: str | int | None = None
    pooling: str = "avg"
    config: ScanConfig = SCAN
    threads: int = 1


class ShardWriter:
    """A Ray actor: loads the model once, then for each batch decodes, runs the model and writes a shard.

    Returns per batch one summary row: {shard (file name, "" when no row was usable), first (index of the
    batch's first item), rows (int), skipped (JSON list of [path, reason])}.
    """

    def __init__(self, job: Job):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(job.threads)
        tf.config.threading.set_inter_op_parallelism_threads(job.threads)
        self.job = job
        self.forward, self.size, self.columns = _load_model(job, tf)
        self.out_fs, self.out_dir = filesystem(job.out)
        self.remote = [filesystem(root)[0] for root in job.roots]

    def __call__(self, batch: dict) -> dict:
        first = int(np.min(batch["index"]))
        pixels, salts, good, skipped = self._decode(batch)
        shard = ""
        if good.any():  # a batch of unusable files only writes no shard
            frame = self.columns(np.asarray(batch["path"])[good].tolist(),
                                 np.asarray(batch["label"])[good].tolist(), self._outputs(pixels, salts))
            shard = self._write(frame, first)
        return {"shard": [shard], "first": [first], "rows": [int(good.sum())], "skipped": [json.dumps(skipped)]}

    def _decode(self, batch: dict):
        """(pixels uint8 (g, S, S, 3), CRC-32 of each file, good bool (n,), [[path, reason], ...])."""
        rows = list(zip(batch["source"], batch["fs"].tolist()))
        with ThreadPoolExecutor(max_workers=max(2, self.job.threads)) as pool:
            results = list(pool.map(lambda row: self._decode_one(*row), rows))
        good = np.array([isinstance(r, tuple) for r in results], bool)
        skipped = [[path, r] for path, r in zip(batch["path"].tolist(), results) if not isinstance(r, tuple)]
        pixels = [r[0] for r in results if isinstance(r, tuple)]
        stack = np.stack(pixels) if pixels else np.zeros((0, self.size, self.size, 3), np.uint8)
        return stack, [r[1] for r in results if isinstance(r, tuple)], good, skipped

    def _decode_one(self, source: bytes, fs_index: int):
        """(pixels, crc32 of the bytes), or the reason the file cannot be used (as `inspect` words it)."""
        config = self.job.config
        try:
            data = read_image_file(source, config.max_bytes) if fs_index < 0 else self._read_remote(source, fs_index)
            return decode_rgb(data, config.max_pixels, config.background, self.size), zlib.crc32(data)
        except UnusableImage as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}"

    def _read_remote(self, source: bytes, fs_index: int) -> bytes:
        system, limit = self.remote[fs_index], self.job.config.max_bytes
        with system.open_input_stream(source.decode()) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise UnusableImage(f"too large: exceeds the cap of {limit:,} bytes")
        return data

    def _outputs(self, pixels: np.ndarray, salts: list[int]) -> np.ndarray:
        """Model outputs (g, d) float32; for predict with tta K, the mean over views 0..K-1 (as `probabilities`)."""
        from finetune_cli.data.pipeline import augmented_view

        views = []
        for view in range(self.job.tta if self.job.kind == "predict" else 1):
            batch = pixels if view == 0 else np.stack([augmented_view(p, view, s) for p, s in zip(pixels, salts)])
            views.append(self.forward(batch).numpy().reshape(len(batch), -1).astype(np.float32))
        return views[0] if len(views) == 1 else np.mean(views, axis=0, dtype=np.float64).astype(np.float32)

    def _write(self, frame, first: int) -> str:
        """Write one shard atomically (temporary name, then move); a rerun of the batch replaces it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{first:08d}.parquet"
        tmp = f"{self.out_dir}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, filesystem=self.out_fs)
        self.out_fs.move(tmp, f"{self.out_dir}/{name}")
        return name


def _load_model(job: Job, tf):
    """(forward: uint8 batch -> tensor, input side, columns(paths, labels, outputs) -> frame)."""
    import pandas as pd

    from finetune_cli.data.pipeline import image_spec

    if job.kind == "predict":
        from finetune_cli.models.inference import prediction_frame
        from finetune_cli.runs.run import Run

        run = Run.load(job.model)
        model, size = run.model, run.image_size

        def columns(paths, labels, outputs):
            return prediction_frame(paths, outputs, run.classes, job.top_k, job.tta)
    else:
        from finetune_cli.models.backbones import build
        from finetune_cli.models.features import pooled_model
        from finetune_cli.models.stages import select_layer

        backbone = build(job.ref)
        model = pooled_model(backbone.model, select_layer(backbone.model, job.layer), job.pooling)
        size = job.ref.image_size

        def columns(paths, labels, outputs):
            frame = pd.DataFrame(outputs, columns=[f"f{i}" for i in range(outputs.shape[1])])
            frame.insert(0, "label", labels)
            frame.insert(0, "path", paths)
            return frame
    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[image_spec(size)])
    return forward, size, columns


# ---------------------------------------------------------------- the driver


def prepare_out(out: str, overwrite: bool) -> None:
    """Create the output folder, or empty a previous one of ours with `overwrite`; before any work.

    Only shards and the manifest a previous run wrote are ever deleted.

    Raises:
        OutputError: it exists and is not empty (without `overwrite`), or holds files not ours, or
            cannot be created.
    """
    from pyarrow import fs as pafs

    system, folder = filesystem(out)
    try:
        info = system.get_file_info(folder)
        if info.type == pafs.FileType.File:
            raise OutputError(f"--out {out} is a file: with --engine ray, --out is a folder for Parquet shards")
        names = [] if info.type == pafs.FileType.NotFound else [
            e.base_name for e in system.get_file_info(pafs.FileSelector(folder))]
        ours = [n for n in names if n == MANIFEST or (n.startswith("part-") and n.endswith(".parquet"))]
        if names and (not overwrite or len(ours) < len(names) or MANIFEST not in names):
            why = "is not empty (--overwrite replaces a previous output)" if not overwrite else \
                "holds files that are not finetune shards: give a new or empty folder"
            raise OutputError(f"--out {out} {why}")
        for name in ours:
            system.delete_file(f"{folder}/{name}")
        system.create_dir(folder, recursive=True)
    except OSError as exc:
        raise OutputError(f"cannot use --out {out}: {exc}") from None


def run_job(job: Job, items: list[dict], *, address: str | None = None, settings: ScaleConfig = SCALE,
            progress=None, worker=ShardWriter, describe: dict | None = None) -> dict:
    """Process `items` with `workers` actors of `worker`, write the manifest; returns it.

    Args:
        progress: callback(done, total) as batches finish.
        worker: the actor class (a `ShardWriter`).
        describe: extra manifest fields (source, model, ...).
    """
    with connected(address, settings) as ray:
        gpus = settings.gpus_per_worker
        gpus = (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0) if gpus is None else gpus
        workers = settings.workers or _default_workers(ray.cluster_resources(), settings.cpus_per_worker, gpus)
        job = replace(job, threads=max(1, int(settings.cpus_per_worker)))
        batches = _map(ray, items, job, worker, workers, gpus, settings)
        done, summaries = 0, []
        try:
            for summary in batches.iter_rows():
                summaries.append(summary)
                done += summary["rows"] + len(json.loads(summary["skipped"]))
                if progress:
                    progress(done, len(items))
        except Exception as exc:
            raise _user_error(exc) or exc
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
    engine = {"kind": "ray", "workers": workers, "nodes": nodes, "gpus_per_worker": gpus, "address": address}
    manifest = _write_manifest(job, summaries, dict(describe or {}, engine=engine))
    if not manifest["rows"]:
        example = f" (e.g. {manifest['skipped'][0]['path']}: {manifest['skipped'][0]['reason']})" \
            if manifest["skipped"] else ""
        raise FolderError(f"no usable images among the inputs{example}; every file is listed in "
                          f"{job.out}/{MANIFEST}")
    return manifest


def _user_error(exc: BaseException) -> FinetuneError | None:
    """The user's mistake (a `FinetuneError` an actor raised, e.g. an unknown --layer) inside Ray's wrappers."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, FinetuneError):
            return type(exc)(str(exc))
        exc, seen = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__, seen + 1
    return None


def _default_workers(resources: dict, cpus: float, gpus: float) -> int:
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // cpus))


def _map(ray, items, job, worker, workers, gpus, settings):
    """The lazy Ray Dataset of per-batch summaries (see `ShardWriter`)."""
    import ray.data

    data = ray.data.from_items(items)
    pool = ray.data.ActorPoolStrategy(size=workers)
    with warnings.catch_warnings():
        # Bounded restarts (Ray Data's default is forever) travel as remote args, which every Ray
        # from 2.9 takes; 2.60 warns that they will be renamed.
        warnings.simplefilter("ignore", DeprecationWarning)
        return data.map_batches(worker, fn_constructor_kwargs={"job": job}, batch_size=settings.batch_size,
                                batch_format="numpy", compute=pool, num_cpus=settings.cpus_per_worker,
                                num_gpus=gpus, max_restarts=settings.max_restarts,
                                max_task_retries=settings.max_task_retries)


def _write_manifest(job: Job, summaries: list[dict], describe: dict) -> dict:
    """manifest.json: shards in row order, rows, columns, skipped files, source, model, engine. Written last."""
    import pyarrow.parquet as pq

    system, folder = filesystem(job.out)
    summaries.sort(key=lambda s: s["first"])
    shards = [{"file": s["shard"], "rows": int(s["rows"])} for s in summaries if s["shard"]]
    skipped = [{"path": p, "reason": r} for s in summaries for p, r in json.loads(s["skipped"])]
    skipped.sort(key=lambda s: natural_key(s["path"]))
    columns = pq.read_schema(f"{folder}/{shards[0]['file']}", filesystem=system).names if shards else []
    manifest = {"format": FORMAT, "kind": job.kind, "shards": shards, "rows": sum(s["rows"] for s in shards),
                "columns": columns, "skipped": skipped, **describe}
    tmp = f"{folder}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with system.open_output_stream(tmp) as stream:
        stream.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    system.move(tmp, f"{folder}/{MANIFEST}")
    _remove_strays(system, folder, {s["file"] for s in shards})
    return manifest


def _remove_strays(system, folder: str, listed: set[str]) -> None:
    """Delete shards no batch reported (left by a batch rerun with other boundaries) and temporaries."""
    from pyarrow import fs as pafs

    for entry in system.get_file_info(pafs.FileSelector(folder)):
        stray = entry.base_name.startswith("part-") and entry.base_name not in listed
        if stray or (entry.base_name.startswith(".") and entry.base_name.endswith(".tmp")):
            system.delete_file(entry.path)


def read_output(out: str):
    """The rows of a sharded output as one pandas frame, shards in manifest order.

    Raises:
        OutputError: no readable manifest (an unfinished or foreign folder).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    system, folder = filesystem(out)
    try:
        with system.open_input_stream(f"{folder}/{MANIFEST}") as stream:
            manifest = parse_json(stream.read(JSON_MAX_BYTES + 1), f"{out}/{MANIFEST}", max_bytes=JSON_MAX_BYTES)
    except (OSError, ValueError) as exc:
        raise OutputError(f"{out} has no readable {MANIFEST} ({exc}): not a finished sharded output") from None
    frames = [pq.read_table(f"{folder}/{s['file']}", filesystem=system).to_pandas() for s in manifest["shards"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=manifest["columns"])


# ---------------------------------------------------------------- the two commands


def predict(inputs, run_dir, *, out: str, overwrite: bool = False, top_k: int = 1, tta: int = 1,
            address: str | None = None, settings: ScaleConfig = SCALE, config: ScanConfig = SCAN,
            progress=None, worker=ShardWriter) -> tuple[dict, list[Skipped]]:
    """`predict` on Ray: (manifest, skipped files). Rows as `tasks.predict.predict`'s frame.

    The run is checked here before any work (`Run.load`), then loaded once per actor.

    Raises:
        SettingsError, OutputError, ModelFileError, FolderError.
    """
    run = Run.load(run_dir)
    items, roots = list_inputs(list(inputs), labelled=False)
    prepare_out(str(out), overwrite)
    job = Job("predict", str(out), tuple(roots), model=str(run.path), top_k=top_k, tta=tta, config=config)
    manifest = run_job(job, items, address=address, settings=settings, progress=progress, worker=worker,
                       describe={"source": [str(i) for i in inputs], "model": str(run.path)})
    return manifest, [Skipped(s["path"], s["reason"]) for s in manifest["skipped"]]


def extract_features(root, ref, *, out: str, overwrite: bool = False, layer=None, pooling: str = "avg",
                     address: str | None = None, settings: ScaleConfig = SCALE, config: ScanConfig = SCAN,
                     progress=None, worker=ShardWriter) -> tuple[dict, list[Skipped]]:
    """`extract-features` on Ray: (manifest, skipped files). Rows: path, label, f0..f{d-1}, as the local table.

    `ref` is a `BaseRef`; each actor builds it once. The feature cache is not used (it is local disk).

    Raises:
        SettingsError, OutputError, FolderError, BackboneError.
    """
    items, roots = list_inputs([str(root)], labelled=None, relative=True)
    if layer not in (None, ""):
        _check_layer(ref, layer)
    prepare_out(str(out), overwrite)
    job = Job("features", str(out), tuple(roots), ref=ref, layer=layer, pooling=pooling, config=config)
    manifest = run_job(job, items, address=address, settings=settings, progress=progress, worker=worker,
                       describe={"source": [str(root)], "model": ref.label, "layer": layer, "pooling": pooling})
    return manifest, [Skipped(s["path"], s["reason"]) for s in manifest["skipped"]]


def _check_layer(ref, layer) -> None:
    """Refuse an unknown --layer here, before any actor starts.

    Raises:
        BackboneError: from `select_layer`, naming the valid stages.
    """
    select_layer(build(ref).model, layer)
