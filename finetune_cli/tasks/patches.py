"""`finetune patches`: for each unit of a layer, the image crops that excite it most.

Steps, each a plain value to the next:

    scan       the folder (labelled or flat)                                 -> Scan
    activate   per image and unit, the spatial maximum and where it is, via
               the feature cache (pooling `maxarg`: 2C numbers per image, never
               the whole map, so memory stays flat as folders grow)          -> (n, C) maxima, (n, C) argmax
    choose     the units (named, or the most active: highest mean maximum)
               and per unit the `top` images with the highest maximum       -> rows
    crop       each unit's receptive field (`models.receptive`) at its argmax,
               from the image as the network saw it (squashed to S x S)     -> pictures
    write      patches.png (a row per unit), patches.csv, index.html        -> summary
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from finetune_cli.analysis.units import grid, layer_name, pick_units, png_bytes
from finetune_cli.config import FEATURES, PATCHES, SCAN, PatchesConfig, ScanConfig
from finetune_cli.data.images import decode_rgb, read_image_file
from finetune_cli.data.scan import scan_folder
from finetune_cli.features import FeatureCache, extract
from finetune_cli.files import output_folder, shown, writing
from finetune_cli.models.backbones import build, resolve
from finetune_cli.models.receptive import receptive_field
from finetune_cli.pages.html import Tile, figure, page, section, tiles, write_page

#: What `patches` writes into its folder, by kind (all that --overwrite replaces there).
FILES = {"grid": "patches.png", "csv": "patches.csv", "html": "index.html"}


def patches(root, base: str, *, layer, units: int | None = None, unit_ids=None, top: int | None = None, out=None,
            overwrite: bool = False, weights: str = "imagenet", image_size: int | None = None,
            batch_size: int = FEATURES.batch_size, cache_dir=None, use_cache: bool = True, config: ScanConfig = SCAN,
            settings: PatchesConfig = PATCHES, progress=None) -> dict:
    """For each unit of `layer`, the `top` image crops (its receptive field at the argmax) that excite it most.

    Args:
        layer: a stage index or a layer name (`finetune layers --base B`).
        units: how many units (default `config.PATCHES.units`): the most active (highest mean per-image maximum).
        unit_ids: these units instead (0..C-1).
        out: the folder for patches.png, patches.csv, index.html; None: a new `runs/<folder name>-patches-N`.
        overwrite: replace an earlier patches output in `out` (refused without it when `out` holds files).

    Returns:
        {"folder", "base", "layer", "image_size", "receptive_field": {"size", "jump", "start"} (per axis),
         "units": [{"unit", "mean_max", "patches": [{"rank", "path", "activation", "y", "x",
         "box": [top, left, bottom, right]}]}], "skipped", "files"}.

    Raises:
        FolderError, BackboneError (bad layer, unsupported layer on the path), SettingsError (unit out of range),
        OutputError.
    """
    scan = scan_folder(root, labelled=None, config=config, for_training=False)
    ref = resolve(base, weights, image_size)
    backbone = build(ref)
    name = layer_name(backbone.model, layer, base)
    field = receptive_field(backbone.model, name)
    channels = int(backbone.model.get_layer(name).output.shape[-1])
    if unit_ids:
        pick_units(channels, 1, unit_ids)  # an out-of-range unit fails before the pass over the folder
    target = output_folder(out, f"{Path(root).resolve().name}-patches", command="patches",
                           owned=tuple(FILES.values()), overwrite=overwrite)
    with target.staged() as staging:
        cache = FeatureCache.at(cache_dir, write=True) if use_cache else None
        table = extract(scan, ref, layer=name, pooling="maxarg", batch_size=batch_size, cache=cache, config=config,
                        progress=progress, backbone=backbone)
        maxima, where = table.features[:, :channels], table.features[:, channels:].astype(np.int64)
        chosen = pick_units(channels, units or settings.units, unit_ids,
                            np.argsort(-maxima.mean(axis=0), kind="stable"))
        rows = top_rows(maxima, where, chosen, top or settings.top, field, ref.image_size)
        crops = crop_all(scan.root, [r.path for r in table.records], rows, ref.image_size, config)
        summary = _summary(scan, table, ref, name, field, chosen, rows, maxima)
        write_outputs(staging, summary, crops, settings.cell)
        summary["files"] = {kind: str(target.path / file) for kind, file in FILES.items()}
    return summary


def _summary(scan, table, ref, name: str, field, chosen: list[int], rows: list[dict], maxima: np.ndarray) -> dict:
    """The summary of `api.patches`, its "files" still missing."""
    summary = {"folder": str(scan.root), "base": ref.label, "layer": name, "image_size": ref.image_size,
               "receptive_field": {"size": list(field.size), "jump": list(field.jump), "start": list(field.start)},
               "units": [], "skipped": [{"path": shown(s.path), "reason": s.reason}
                                        for s in (*scan.skipped, *table.skipped)]}
    for unit in chosen:
        mine = [r for r in rows if r["unit"] == unit]
        summary["units"].append({"unit": unit, "mean_max": float(maxima[:, unit].mean()),
                                 "patches": [{**r, "path": shown(table.records[r["row"]].path)} for r in mine]})
    return summary


def top_rows(maxima: np.ndarray, where: np.ndarray, units: list[int], top: int, field, side: int) -> list[dict]:
    """Per unit, the `top` images by that unit's maximum: unit, rank, row, activation, y, x, box (t, l, b, r).

    maxima, where: (n, C) per image and unit, the spatial maximum and its flat index (y * w + x).
    """
    rows = []
    width = field.grid[1]
    for unit in units:
        order = np.argsort(-maxima[:, unit], kind="stable")[:top]
        for rank, row in enumerate(order):
            y, x = divmod(int(where[row, unit]), width)
            rows.append({"unit": unit, "rank": rank + 1, "row": int(row), "activation": float(maxima[row, unit]),
                         "y": y, "x": x, "box": list(field.box(y, x, side))})
    return rows


def crop_all(root: Path, paths: list[str], rows: list[dict], side: int, config: ScanConfig) -> dict:
    """{(unit, rank): uint8 crop} from each image decoded once at side x side (as the network saw it)."""
    crops, decoded = {}, {}
    for r in rows:
        if r["row"] not in decoded:
            data = read_image_file(root / paths[r["row"]], config.max_bytes)
            decoded[r["row"]] = decode_rgb(data, config.max_pixels, config.background, side)
        top, left, bottom, right = r["box"]
        crops[r["unit"], r["rank"]] = decoded[r["row"]][top:bottom, left:right]
    return crops


def write_outputs(folder: Path, summary: dict, crops: dict, cell: int) -> dict:
    """patches.png (one row per unit, best crop first), patches.csv and index.html; returns their paths."""
    units = summary["units"]
    picture = png_bytes(grid([[crops[u["unit"], p["rank"]] for p in u["patches"]] for u in units], cell))
    files = {kind: folder / name for kind, name in FILES.items()}
    with writing(files["grid"]) as tmp:
        tmp.write_bytes(picture)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["unit", "rank", "path", "activation", "y", "x", "top", "left", "bottom", "right"])
    for u in units:
        for p in u["patches"]:
            writer.writerow([u["unit"], p["rank"], p["path"], f"{p['activation']:.6g}", p["y"], p["x"], *p["box"]])
    with writing(files["csv"]) as tmp:
        tmp.write_text(text.getvalue(), "utf-8")
    field = summary["receptive_field"]
    notes = [f"{summary['base']}, layer {summary['layer']}: each crop is the unit's receptive field "
             f"({field['size'][0]} x {field['size'][1]} px of the {summary['image_size']} px input, clipped at the "
             "border) where the unit is most active in that image."]
    parts = [section(f"unit {u['unit']} (mean maximum {u['mean_max']:.3g})",
                     tiles(Tile(png_bytes(crops[u["unit"], p["rank"]]), f"{p['path']}\n{p['activation']:.3g}")
                           for p in u["patches"])) for u in units]
    write_page(files["html"], page(f"patches: {summary['layer']}", section("all units", figure("patches.png")),
                                   *parts, notes=notes))
    return {k: str(v) for k, v in files.items()}
