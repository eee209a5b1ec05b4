"""The `finetune` command: parse options, make one library call, render the result.

Every `FinetuneError` becomes `Error: <message>` on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console

from finetune_cli import __version__, api, report
from finetune_cli.errors import FinetuneError

EXAMPLES = """
\b
Examples:
  finetune inspect ./images                 what is in the folder, what is broken
  finetune inspect ./images --json          the same as one JSON object
"""


def handle_errors(command):
    """Turn library errors and Ctrl-C into one line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted: anything already saved is intact.", err=True)
            sys.exit(130)

    return wrapper


def err_console() -> Console:
    """Where progress bars go, so that stdout stays clean for --json and pipes."""
    return Console(stderr=True)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def cli() -> None:
    """Transfer learning for a folder of labelled images.

    Put each class's images in a subfolder named after the class; finetune
    inspects the folder, decides how to reuse a pretrained network, trains,
    and explains what it did.
    """


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def inspect(folder: str, as_json: bool) -> None:
    """Report classes, image sizes and formats, skipped files, duplicates."""
    with report.progress_bar(err_console(), "scanning", "files") as progress:
        profile = api.inspect(folder, progress=progress)
    if as_json:
        click.echo(json.dumps(profile.to_dict(), indent=2, ensure_ascii=False))
    else:
        report.profile_tables(profile, Console())


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="finetune")
