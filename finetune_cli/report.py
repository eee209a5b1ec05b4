"""Rendering library results for people: rich tables and progress bars.

The library returns data; only the CLI calls into this module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from finetune_cli.data.profile import Profile


def profile_tables(profile: Profile, console: Console, max_rows: int = 20) -> None:
    """Print the `inspect` report: classes, images, skipped files, warnings."""
    info = profile.to_dict()
    console.print(
        f"[bold]{info['root']}[/bold]: {info['n_images']} usable images in "
        f"{info['n_classes']} classes; size category [bold]{info['size_category']}[/bold]"
    )
    classes = Table()
    for column in ("class", "images", "share"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for row in info["classes"]:
        classes.add_row(row["name"], str(row["count"]), f"{row['share']:.1%}")
    console.print(classes)

    images = Table(title="Images")
    images.add_column("property")
    images.add_column("values")
    size = info["image_size"]
    images.add_row("width min/median/max", "{min} / {median} / {max}".format(**size["width"]))
    images.add_row("height min/median/max", "{min} / {median} / {max}".format(**size["height"]))
    images.add_row("formats", _counts(info["formats"]))
    images.add_row("modes", _counts(info["modes"]))
    console.print(images)

    if info["skipped"]:
        skipped = Table(title=f"Skipped files ({len(info['skipped'])})")
        skipped.add_column("path", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for row in info["skipped"][:max_rows]:
            skipped.add_row(row["path"], row["reason"])
        if len(info["skipped"]) > max_rows:
            skipped.add_row("...", f"{len(info['skipped']) - max_rows} more (use --json)")
        console.print(skipped)
    for line in info["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {line}", markup=True, highlight=False)


def rows_table(console: Console, rows: list[dict], columns: list[str], title: str = "") -> None:
    """Print a list of dicts as a table with the given columns."""
    table = Table(title=title or None)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


@contextmanager
def progress_bar(console: Console, description: str, unit: str = "images") -> Iterator:
    """A rich progress bar with rate and ETA; yields a `callback(done, total)`.

    Drawn on stderr-like `console` only; nothing is drawn when it is not a terminal.
    """
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None, rate="")

        def callback(done: int, total: int) -> None:
            speed = bar.tasks[task].speed
            rate = f"{speed:,.0f} {unit}/s" if speed else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield callback
