"""The files of a search (`finetune tune`), each written atomically:

    tune.json     what the search is on (data, base, seed, folds; for fine-tuning the recipe): a rerun must
                  match it to continue
    trials.csv    one row per trial, rewritten after every trial, so an interrupted search keeps what it did:
                  linear: parameters, images scored on, mean and std of the CV accuracy, seconds;
                  fine-tuning (`FINETUNE_TABLE`): rung, epochs, parameters, best epoch, validation
                  cross-entropy and accuracy, vectors computed (0: all from the cache), seconds
    best.toml     the best trial as a recipe `finetune train --recipe` takes
    search.png    the score against each parameter, the best trial marked
    summary.json  the best trial, the honest estimate, warnings, the leaderboard (last)
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from finetune_cli.errors import OutputError
from finetune_cli.files import held_names
from finetune_cli.pages.figures import pyplot
from finetune_cli.progress import QUIET, Reporter
from finetune_cli.runs.folder import RunFolder
from finetune_cli.strategy import recipes as recipe_files
from finetune_cli.tasks.tune.space import FINETUNE_PARAMETERS, PARAMETERS, FinetuneSpace, Space, finetune_key, key


@dataclasses.dataclass(frozen=True)
class TrialTable:
    """The layout of trials.csv: its columns, how each is read, and what makes two rows the same trial.

    Attributes:
        columns: in file order, `trial` first.
        types: column -> int or float (others are text).
        identity: row -> a hashable naming the trial (a resumed search skips rows it has).
    """

    columns: tuple[str, ...]
    types: dict
    identity: object


COLUMNS = ("trial", *PARAMETERS, "n_images", "mean_accuracy", "std_accuracy", "mean_macro_f1", "std_macro_f1",
           "n_splits", "seconds")
TYPES = {"trial": int, "C": float, "views": int, "n_images": int, "mean_accuracy": float, "std_accuracy": float,
         "mean_macro_f1": float, "std_macro_f1": float, "n_splits": int, "seconds": float}
LINEAR_TABLE = TrialTable(COLUMNS, TYPES, lambda row: (key(row), row["n_images"]))
#: A fine-tuning trial: `rate_factor` 1, or 0.1 / 0.01 when the NaN guard lowered every rate; `status` ok or
#: diverged (val_loss inf); `computed` the feature vectors and activation maps a backbone pass made for it.
FINETUNE_COLUMNS = ("trial", "rung", "epochs", *FINETUNE_PARAMETERS, "best_epoch", "val_loss", "val_accuracy",
                    "val_macro_f1", "train_loss", "n_train", "n_val", "rate_factor", "status", "computed", "seconds")
FINETUNE_TABLE = TrialTable(FINETUNE_COLUMNS, {
    "trial": int, "rung": int, "epochs": int, "learning_rate": float, "top_lr_factor": float, "dropout": float,
    "l2": float, "unfreeze_stages": int, "best_epoch": int, "val_loss": float, "val_accuracy": float,
    "val_macro_f1": float, "train_loss": float, "n_train": int, "n_val": int, "rate_factor": float, "computed": int, "seconds": float},
    lambda row: (finetune_key(row), row["epochs"]))
#: tune.json entries a continued search must share with the one in the folder (`kind` and `recipe`: fine-tuning).
MUST_MATCH = ("classes", "searched_images", "held_out_images", "backbone", "image_size", "seed", "folds", "kind",
              "recipe")


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
        return cls(path, resume=path.is_dir() and bool(held_names(path)))

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
        kind = lambda d: d.get("kind", "linear")  # noqa: E731 (a linear search's tune.json may predate `kind`)
        changed = [k for k in MUST_MATCH if (kind(saved) != kind(definition) if k == "kind"
                                             else saved.get(k) != definition.get(k))]
        if changed:
            raise OutputError(f"{self.path} holds another search (different {', '.join(changed)}): continue it "
                              "with the same folder, --base, --image-size, --seed and --cv, or choose a new --out")


class TrialLog:
    """The rows of trials.csv, read from an earlier search and written after every new trial.

    A row that does not read back (cut off, a field missing or extra, a number that is not one) is
    dropped with a note naming how many: that trial runs again; the other rows are kept.

    Attributes:
        rows: dicts with the table's columns, in the order they were run.
        n_old: rows that came from the earlier search.
        dropped: the line numbers (from 2, after the header) of the earlier rows left out as malformed.
    """

    def __init__(self, folder: TuneFolder, table: TrialTable = LINEAR_TABLE, reporter: Reporter = QUIET):
        self.folder, self.table = folder, table
        self.rows, self.dropped = self._read(folder.file("trials.csv"))
        self.n_old = len(self.rows)
        self._index = {table.identity(r): r for r in self.rows}
        if self.dropped:
            reporter.on_note(f"{folder.file('trials.csv')}: dropped {len(self.dropped)} malformed row(s) (line(s) "
                             f"{', '.join(map(str, self.dropped[:10]))}{', ...' if len(self.dropped) > 10 else ''}: "
                             f"cut off or edited); kept {len(self.rows)}; those trials run again")

    def _read(self, path: Path) -> tuple[list[dict], list[int]]:
        """(rows that read back, line numbers of those that did not), from trials.csv as text, each field
        then parsed by Python (correctly rounded: a rewrite reproduces every number).

        Raises:
            OutputError: unreadable, or its header is not the table's columns.
        """
        if not path.exists():
            return [], []
        columns = self.table.columns
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                lines = list(csv.reader(handle))
        except (OSError, ValueError, csv.Error) as exc:
            raise OutputError(f"{path} is not a readable trial table ({exc}): move it away to start the search "
                              "afresh") from None
        header = tuple(lines[0]) if lines else ()
        if header != columns:
            raise OutputError(f"{path} is not a readable trial table (columns {list(header)}, not "
                              f"{', '.join(columns)}): move it away to start the search afresh")
        rows, dropped = [], []
        for number, fields in enumerate(lines[1:], start=2):
            if not fields:  # a blank line
                continue
            row = self._row(fields)
            if row is None:
                dropped.append(number)
            else:
                rows.append(row)
        return rows, dropped

    def _row(self, fields: list[str]) -> dict | None:
        """One line's fields as a row of typed values, or None when it does not read back as one."""
        if len(fields) != len(self.table.columns):
            return None
        try:
            return {k: self.table.types.get(k, str)(v) for k, v in zip(self.table.columns, fields)}
        except ValueError:
            return None

    def get(self, trial: dict) -> dict | None:
        """The row of the trial `trial` names (its parameters, and n_images or epochs), or None."""
        return self._index.get(self.table.identity(trial))

    def add(self, row: dict) -> dict:
        """Append a trial (numbered here) and rewrite trials.csv; returns the row."""
        row = {"trial": len(self.rows) + 1, **row}
        self.rows.append(row)
        self._index[self.table.identity(row)] = row
        self.write()
        return row

    def write(self) -> None:
        import pandas as pd

        self.folder.write_frame("trials.csv", pd.DataFrame(self.rows, columns=list(self.table.columns)))


def toml_value(value) -> str:
    """A str, int, float or bool as TOML (JSON's forms of these are TOML's too)."""
    return json.dumps(value, ensure_ascii=False)


def best_recipe_text(base: recipe_files.Recipe, best: dict, header: list[str]) -> str:
    """best.toml: `base`'s fields with the best feature stage, views, pooling and C; checked with `recipes.parse`."""
    return recipe_text(base, header, strategy="linear", feature_stage=str(best["stage"]),
                       feature_views=int(best["views"]), pooling=str(best["pooling"]), linear_c=float(best["C"]),
                       description=f"tuned by `finetune tune` from recipe '{base.name}': features of stage "
                                   f"{best['stage']}, {best['pooling']}-pooled, {best['views']} augmented view(s) "
                                   f"per image, C {best['C']:g}")


def finetune_recipe_text(base: recipe_files.Recipe, best: dict, header: list[str]) -> str:
    """best.toml of a fine-tuning search: `base`'s fields with the best trial's rates (as run: times its
    `rate_factor`), dropout, l2, unfrozen stages, and its best epoch as `epochs`."""
    rate = float(f"{best['learning_rate'] * best['rate_factor']:.3g}")
    return recipe_text(base, header, learning_rate=rate, top_lr_factor=float(best["top_lr_factor"]),
                       dropout=float(best["dropout"]), l2=float(best["l2"]),
                       unfreeze_stages=int(best["unfreeze_stages"]), epochs=max(1, int(best["best_epoch"])),
                       description=f"tuned by `finetune tune` from recipe '{base.name}': top "
                                   f"{best['unfreeze_stages']} stage(s) fine-tuned, head rate {rate:g} (top stages "
                                   f"x{best['top_lr_factor']:g}), dropout {best['dropout']:g}, l2 {best['l2']:g}, "
                                   f"{max(1, int(best['best_epoch']))} epoch(s)")


def recipe_text(base: recipe_files.Recipe, header: list[str], **updates) -> str:
    """`base`'s non-default fields with `updates`, named `<base>-tuned`, as TOML under a `#` header; checked
    with `recipes.parse` (never write one `train` refuses)."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if getattr(base, f.name) != f.default}
    fields.update(name=f"{base.name}-tuned", **updates)
    order = [f.name for f in dataclasses.fields(base)]
    lines = [f"# {line}" for line in header]
    lines += [f"{name} = {toml_value(fields[name])}" for name in order if name in fields]
    text = "\n".join(lines) + "\n"
    recipe_files.parse(text, "best.toml")
    return text


def search_figure(rows: list[dict], best: dict, space: Space):
    """CV accuracy (mean, std bars) against each parameter; the best trial a red star."""
    panels = [("C", "log", None), ("stage", "category", list(space.stages)),
              ("pooling", "category", list(space.poolings)), ("views", "ticks", list(space.views))]
    return score_figure(rows, best, panels, ("mean_accuracy", "std_accuracy"), "cross-validated accuracy")


def finetune_figure(rows: list[dict], best: dict, space: FinetuneSpace):
    """Validation cross-entropy against each parameter, one colour per number of epochs (rung); the best a red star."""
    panels = [("learning_rate", "log", None), ("top_lr_factor", "log", None),
              ("dropout", "ticks", list(space.dropouts)), ("l2", "category", [f"{v:g}" for v in space.l2s]),
              ("unfreeze_stages", "ticks", list(space.unfreeze))]
    finite = [r for r in rows if r["val_loss"] < float("inf")]
    return score_figure(finite, best, panels, ("val_loss", None), "validation cross-entropy (lower is better)",
                        colour_by="epochs")


def score_figure(rows: list[dict], best: dict, panels: list[tuple], score: tuple, label: str,
                 colour_by: str | None = None):
    """One panel per (parameter, kind, values): kind `log` (log axis), `category` (values as text, in order)
    or `ticks` (numbers, ticks at values); y the score (`score` = (column, spread column or None))."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True)
    column, spread = score
    groups = sorted({r[colour_by] for r in rows}) if colour_by else [None]
    for axis, (name, kind, values) in zip(axes, panels):
        place = float
        if kind == "category":
            known = values + sorted({_text(r[name]) for r in rows} - set(values))
            place = lambda v, known=known: known.index(_text(v))  # noqa: E731
            axis.set_xticks(range(len(known)), known)
        elif kind == "ticks":
            axis.set_xticks(list(values))
        for i, group in enumerate(groups):
            chosen = [r for r in rows if colour_by is None or r[colour_by] == group]
            axis.errorbar([place(r[name]) for r in chosen], [r[column] for r in chosen],
                          yerr=[r[spread] for r in chosen] if spread else None, fmt="o", alpha=0.45,
                          color=f"C{i}", ecolor="tab:gray", markersize=4,
                          label=f"{group} {colour_by}" if colour_by else None)
        axis.plot([place(best[name])], [best[column]], "*", color="red", markersize=15, label="best")
        if kind == "log":
            axis.set_xscale("log")
        shown_value = f"{best[name]:.3g}" if kind == "log" else _text(best[name])
        axis.set(xlabel=name, title=f"best {name} = {shown_value}")
    axes[0].set_ylabel(label)
    axes[0].legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def _text(value) -> str:
    """A category's label: floats as %g (1e-04 and 0.0001 are one l2), the rest as str."""
    return f"{value:g}" if isinstance(value, float) else str(value)
