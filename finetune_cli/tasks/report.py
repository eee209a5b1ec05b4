"""`finetune report RUN`: the run on one self-contained page, rebuilt from its files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from finetune_cli.analysis import saliency
from finetune_cli.config import EXPLAIN, ExplainConfig
from finetune_cli.data.inputs import collect, decode
from finetune_cli.errors import ModelFileError, SettingsError
from finetune_cli.pages.figures import overlay_png
from finetune_cli.pages.html import Tile
from finetune_cli.runs.report_page import write_report
from finetune_cli.runs.run import Run, last_run, read_predictions


def report(run: str | os.PathLike, *, explain: str | None = None) -> Path:
    """(Re)build `RUN/report.html` from the files of a finished run folder alone; returns the page's path.

    Args:
        run: a run folder (the --out of `train`), or `last` (the last finished run under ./runs: `run.last_run`).
        explain: also draw `occlusion` or `gradcam` maps over the misclassified validation images
            (`mistake_tiles`; loads the model); None: the files alone.

    Raises:
        ModelFileError: not a finished run folder (no readable metrics.json).
        OutputError: the page cannot be written.
    """
    folder = last_run() if str(run) == "last" else Path(run).expanduser().absolute()
    if not folder.is_dir():
        raise ModelFileError(f"{folder} is not a run folder: `finetune report` takes the --out folder of a "
                             "finished `finetune train`")
    if explain is None:
        return write_report(folder)
    tiles = mistake_tiles(folder, explain)
    return write_report(folder, [(f"What the model looked at in its mistakes ({explain})", tiles)] if tiles else ())


def mistake_tiles(run_dir, method: str = "gradcam", limit: int = 24, config: ExplainConfig = EXPLAIN) -> list:
    """Heat maps (for the predicted class) of a run's misclassified validation images, as report tiles.

    Reads RUN/predictions_val.csv (written by `train`); the `limit` most
    confident mistakes whose files still exist, most confident first.

    Returns:
        [pages.Tile] (empty when there are no mistakes, no predictions file, or the images are gone).

    Raises:
        ModelFileError, SettingsError (method).
    """
    if method not in saliency.METHODS:
        raise SettingsError(f"--explain must be one of {', '.join(saliency.METHODS)}. Received: {method!r}")
    run = Run.load(run_dir)
    frame = read_predictions(run.path / "predictions_val.csv")
    if frame is None:
        return []
    wrong = frame[(frame["true"] != frame["predicted"]) & frame["path"].map(lambda p: Path(p).is_file())]
    wrong = wrong.sort_values("probability", ascending=False).head(limit)
    if wrong.empty:
        return []

    images = decode(collect(list(wrong["path"])), run.classes, run.image_size)
    rows = wrong.set_index("path").loc[images.paths]
    targets = np.array([run.classes.index(name) for name in rows["predicted"]])
    maps = saliency.heat_maps(run.model, images.pixels, targets, method, config)
    return [Tile(overlay_png(pixels, heat, config), f"{Path(path).name}\ntrue {row.true}, predicted "
                 f"{row.predicted} ({row.probability:.0%})", flagged=True)
            for pixels, heat, path, row in zip(images.pixels, maps, images.paths, rows.itertuples())]
