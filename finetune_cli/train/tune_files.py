"""The files of a search (`finetune tune`), each written atomically:

    tune.json     what the search is on (data, base, seed, folds): a rerun must match it to continue
    trials.csv    one row per trial: parameters, images scored on, mean and std of the CV accuracy, seconds;
                  rewritten after every trial, so an interrupted search keeps what it did
    best.toml     the best trial as a recipe `finetune train --recipe` takes
    search.png    CV accuracy against each parameter, the best trial marked
    summary.json  the best trial, the honest estimate, warnings, the leaderboard (last)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from finetune_cli.artifacts import RunFolder, _pyplot
from finetune_cli.errors import OutputError
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.train.search import PARAMETERS, Space, key

COLUMNS = ("trial", *PARAMETERS, "n_images", "mean_accuracy", "std_accuracy", "n_splits", "seconds")
TYPES = {"trial": int, "C": float, "views": int, "n_images": int, "mean_accuracy": float, "std_accuracy": float,
         "n_splits": int, "seconds": float}
#: tune.json entries a continued search must share with the one in the folder.
MUST_MATCH = ("classes", "searched_images", "held_out_images", "backbone", "image_size", "seed", "folds")


class TuneFolder(RunFolder):
    """A search folder: new, or one holding an earlier search (tune.json), which the search continues.

    A failed or interrupted search keeps trials.csv (a rerun continues it);
    without any trial, it removes what it wrote, as a failed run does.
    """

    @classmethod
    def open(cls, out, root) -> "TuneFolder":
        """`out`, or a new numbered `runs/<root name>-tune-<N>`.

        Raises:
            OutputError: `out` holds files that are not a search, or cannot be written.
        """
        if out is None:
            return cls.new(f"{Path(root).resolve().name}-tune")
        path = Path(out).expanduser().absolute()
        return cls(path, resume=path.is_dir() and any(path.iterdir()))

    def _check_resumable(self) -> None:
        if not self.file("tune.json").is_file():
            raise OutputError(f"{self.path} holds other files, not a search of `finetune tune` (no tune.json): "
                              "choose a new --out")

    @property
    def continued(self) -> bool:
        return self.file("tune.json").is_file()

    def discard(self, keep_resumable: bool = True) -> bool:
        if self.file("trials.csv").exists():
            return False
        return super().discard(keep_resumable)

    def record_definition(self, definition: dict) -> None:
        """Write tune.json, or check that the folder's search is on the same data, base, seed and folds.

        Raises:
            OutputError: naming what differs.
        """
        if not self.continued:
            self.write_json("tune.json", definition)
            return
        try:
            saved = self.read_json("tune.json")
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self.file('tune.json')} is unreadable ({exc}): choose a new --out") from None
        changed = [k for k in MUST_MATCH if saved.get(k) != definition.get(k)]
        if changed:
            raise OutputError(f"{self.path} holds a search with a different {', '.join(changed)}: continue it with "
                              "the same folder, --base, --image-size, --seed and --cv, or choose a new --out")


class TrialLog:
    """The rows of trials.csv, read from an earlier search and written after every new trial.

    Attributes:
        rows: dicts with `COLUMNS`, in the order they were run.
        n_old: rows that came from the earlier search.
    """

    def __init__(self, folder: TuneFolder):
        self.folder, self.rows = folder, self._read(folder.file("trials.csv"))
        self.n_old = len(self.rows)
        self._index = {(key(r), r["n_images"]): r for r in self.rows}

    @staticmethod
    def _read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        import pandas as pd

        try:  # as text, then Python's own (correctly rounded) parsing: a rewrite reproduces every number
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            if tuple(frame.columns) != COLUMNS:
                raise ValueError(f"columns {list(frame.columns)}, not {', '.join(COLUMNS)}")
            return [{k: TYPES.get(k, str)(v) for k, v in row.items()} for row in frame.to_dict("records")]
        except (OSError, ValueError) as exc:
            raise OutputError(f"{path} is not a readable trial table ({exc}): move it away to start the search "
                              "afresh") from None

    def get(self, params: dict, n_images: int) -> dict | None:
        """The row of a trial already run on `n_images` images, or None."""
        return self._index.get((key(params), n_images))

    def add(self, row: dict) -> dict:
        """Append a trial (numbered here) and rewrite trials.csv; returns the row."""
        row = {"trial": len(self.rows) + 1, **row}
        self.rows.append(row)
        self._index[(key(row), row["n_images"])] = row
        self.write()
        return row

    def write(self) -> None:
        import pandas as pd

        self.folder.write_frame("trials.csv", pd.DataFrame(self.rows, columns=list(COLUMNS)))


def toml_value(value) -> str:
    """A str, int, float or bool as TOML (JSON's forms of these are TOML's too)."""
    return json.dumps(value, ensure_ascii=False)


def best_recipe_text(base: recipe_files.Recipe, best: dict, header: list[str]) -> str:
    """best.toml: `base`'s fields with the best feature stage, views, pooling and C; checked with `recipes.parse`."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if getattr(base, f.name) != f.default}
    fields.update(name=f"{base.name}-tuned", strategy="linear", feature_stage=str(best["stage"]),
                  feature_views=int(best["views"]), pooling=str(best["pooling"]), linear_c=float(best["C"]),
                  description=f"tuned by `finetune tune` from recipe '{base.name}': features of stage "
                              f"{best['stage']}, {best['pooling']}-pooled, {best['views']} augmented view(s) "
                              f"per image, C {best['C']:g}")
    order = [f.name for f in dataclasses.fields(base)]
    lines = [f"# {line}" for line in header]
    lines += [f"{name} = {toml_value(fields[name])}" for name in order if name in fields]
    text = "\n".join(lines) + "\n"
    recipe_files.parse(text, "best.toml")  # what train will read: never write one it refuses
    return text


def search_figure(rows: list[dict], best: dict, space: Space):
    """CV accuracy (mean, std bars) against each parameter; the best trial a red star."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(PARAMETERS), figsize=(3.6 * len(PARAMETERS), 3.4), sharey=True)
    categories = {"stage": list(space.stages), "pooling": list(space.poolings)}
    for axis, name in zip(axes, PARAMETERS):
        if name in categories:
            known = categories[name] + sorted({str(r[name]) for r in rows} - set(categories[name]))
            place = lambda v, known=known: known.index(str(v))
            axis.set_xticks(range(len(known)), known)
        else:
            place = float
            if name == "views":
                axis.set_xticks(list(space.views))
        xs = [place(r[name]) for r in rows]
        axis.errorbar(xs, [r["mean_accuracy"] for r in rows], yerr=[r["std_accuracy"] for r in rows], fmt="o",
                      alpha=0.45, color="tab:blue", ecolor="tab:gray", markersize=4)
        axis.plot([place(best[name])], [best["mean_accuracy"]], "*", color="red", markersize=15, label="best")
        if name == "C":
            axis.set_xscale("log")
        axis.set(xlabel=name, title=f"best {name} = {best[name]:.3g}" if name == "C" else f"best {name} = {best[name]}")
    axes[0].set_ylabel("cross-validated accuracy")
    axes[0].legend(loc="lower left")
    figure.tight_layout()
    return figure
