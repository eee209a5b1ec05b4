"""The Click options several commands share, each defined once.

    base_options     --base, --weights, --image-size      every command that builds a backbone
    cache_options    --cache-dir, --no-cache               every command that reads cached features
    engine_options   --engine, --address, --workers        predict, extract-features
    run_argument     RUN (a run folder, or `last`)         every command that reads a finished run
    out_option       --out (a folder, a file, or a URI)    every command that writes
    table_options    --path-column, --label-column, --allow-outside,  every command that reads labelled images
                     --label-separator
    seed_option, batch_size_option, json_option, overwrite_option, tta_option, pretrain_options

Defaults come from `config`; nothing here holds a default of its own.
"""

from __future__ import annotations

import functools

import click

from finetune_cli.config import FEATURES, IMAGE_SIZE_RANGE, PREDICT, PRETRAIN, RUNS_DIR, SCALE, TABLE, TableConfig
from finetune_cli.data import tables
from finetune_cli.models import registry

#: What RUN may be, in every command's help.
RUN_HELP = f"a run folder from `finetune train`, or `last` (the last finished run under {RUNS_DIR}/; a folder " \
           "named last: give ./last)"


def options(*decorators):
    """Apply option decorators in reading order."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
replace_output_option = click.option("--overwrite", is_flag=True, help="Replace the earlier output of this command "
                                                                       "in --out (refused if --out holds other files).")
cache_options = options(
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="Feature cache folder (default: $FINETUNE_CACHE_DIR or ~/.cache/finetune/features)."),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the feature cache."),
)
cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
weights_option = click.option("--weights", default="imagenet", show_default=True,
                              help="imagenet (pretrained; for a file base, its own weights), none (fresh init), "
                                   "or a weights file.")
size_option = click.option("--image-size", type=click.IntRange(*IMAGE_SIZE_RANGE), default=None,
                           help="Input side in pixels (images are squashed to a square). Default: the base's "
                                "native size; a model file with a fixed input needs that size.")
model_option = click.option("--model", "model_dir", default=None, type=str, metavar="RUN",
                            help=f"The run, as an option (kept for older scripts): {RUN_HELP}.")
tta_option = click.option("--tta", default=PREDICT.tta, show_default=True, metavar="K", type=str,
                          help=f"Test-time augmentation: average the probabilities of K deterministic views per "
                               f"image (the image, then flips and crops), 1 to {PREDICT.max_tta}; 1 is off.")
coverage_option = click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                               metavar="P", help="Also the prediction set of each image: the fewest classes holding "
                                                 "the true one with probability P (split conformal, on the run's "
                                                 "validation images).")
empty_sets_option = click.option("--empty-sets", is_flag=True,
                                 help="With --coverage: a set may be empty where no class is plausible enough "
                                      "(exact coverage); without it each set holds at least the top class, so "
                                      "coverage never falls below the top-1 accuracy.")
batch_size_option = click.option("--batch-size", type=click.IntRange(1, 1024), default=FEATURES.batch_size,
                                 show_default=True)
engine_options = options(
    click.option("--engine", type=click.Choice(["local", "ray"]), default=SCALE.engine, show_default=True,
                 help="ray: model actors on a Ray cluster write Parquet shards + manifest.json into the --out "
                      "folder (or URI); inputs may also be list files (.txt) and URIs (s3://, gs://, file://)."),
    click.option("--address", default=None,
                 help="With --engine ray: an existing cluster (host:port, ray://host:10001, or auto); "
                      "default: start Ray on this machine for the run."),
    click.option("--workers", type=click.IntRange(0, 10_000), default=SCALE.workers, show_default=True,
                 help="With --engine ray: model actors, each loading the model once (0: one per CPU)."),
)


def _reading_tables(command):
    """Run `command` with the label-table options it was given in force (`data.tables.using`)."""
    @functools.wraps(command)
    def run(*args, path_column, label_column, allow_outside, label_separator, **kwargs):
        if "/" in label_separator or "\\" in label_separator:
            raise click.BadParameter("a slash cannot separate labels (labels are saved as names)",
                                     param_hint="--label-separator")
        with tables.using(TableConfig(path_column, label_column, allow_outside, TABLE.suffixes, label_separator)):
            return command(*args, **kwargs)
    return run


table_options = options(
    click.option("--path-column", default=TABLE.path_column, show_default=True,
                 help=f"A label table ({', '.join(TABLE.suffixes)}) given for a folder: its column of image paths "
                      "(relative to the table's folder)."),
    click.option("--label-column", default=TABLE.label_column, show_default=True,
                 help="A label table's column of class names."),
    click.option("--label-separator", default=TABLE.separator, show_default=True,
                 help="In a label table, what separates an image's several labels (`cat;outdoor`): such a table "
                      "is multi-label (train, evaluate, predict). '' reads each cell as one label."),
    click.option("--allow-outside", is_flag=True,
                 help="A label table may list images outside its own folder (refused by default)."),
    _reading_tables,
)


def run_argument(required: bool = True):
    """RUN, the first argument of every command that reads a finished run."""
    return click.argument("run", type=str, required=required)


#: --out's kinds: a folder to create, a file to create, or text (a path or a URI, for --engine ray).
OUT_TYPES = {"folder": click.Path(file_okay=False), "file": click.Path(dir_okay=False), "any": str}


def out_option(help: str, kind: str = "folder"):
    """--out of a command that writes: `help` says what goes there and the default (a new numbered folder)."""
    return click.option("--out", type=OUT_TYPES[kind], default=None, help=help)


def seed_option(help: str | None = None):
    """--seed: one integer seeding every random choice of the command (the split, folds, sampling)."""
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def base_options(default: str | None):
    """--base, --weights, --image-size: shared by every command that builds a backbone."""
    names = ", ".join(registry.names())
    base = click.option("--base", default=default, show_default=bool(default),
                        help=f"A registry name ({names}) or a .keras model file taking raw RGB in [0, 255].")
    return options(base, weights_option, size_option)


def pretrain_options(epochs_flag: str = "--epochs"):
    """Autoencoder settings shared by `pretrain` and `train --unlabeled` (defaults: config.PretrainConfig)."""
    return options(
        click.option("--arch", type=click.Choice(["conv", "mlp"]), default=None,
                     help=f"conv: convolutional autoencoder; mlp: dense, tied weights. [default: {PRETRAIN.arch}]"),
        click.option("--noise", type=float, default=None,
                     help=f"Corruption: Gaussian std on the [0, 1] pixel scale, or the masked fraction. "
                          f"[default: {PRETRAIN.noise}]"),
        click.option("--noise-type", type=click.Choice(["gaussian", "mask"]), default=None,
                     help=f"[default: {PRETRAIN.noise_type}]"),
        click.option("--code-size", type=click.IntRange(1, 4096), default=None,
                     help=f"Units of the code: the encoder's output features. [default: {PRETRAIN.code_size}]"),
        click.option(epochs_flag, "pretrain_epochs", type=click.IntRange(1, 10_000), default=None,
                     help=f"Most pretraining epochs; early stopping on held-out images ends sooner. "
                          f"[default: {PRETRAIN.epochs}]"),
        click.option("--greedy", is_flag=True, help="mlp: train layer by layer first (stacked denoising autoencoder)."),
    )


def run_and_rest(args: tuple[str, ...], model: str | None, rest: str, at_most: int | None = None
                 ) -> tuple[str, list[str]]:
    """(RUN, the other arguments) of `predict RUN INPUTS...` / `evaluate RUN FOLDER`, or of the older form
    with `--model RUN` and no RUN argument.

    Raises:
        click.UsageError: no run, none of the other arguments, or more than `at_most` of them.
    """
    if model is not None:
        run, rest_args = model, list(args)
    elif args:
        run, rest_args = args[0], list(args[1:])
    else:
        raise click.UsageError(f"give the run first: RUN {rest} ({RUN_HELP})")
    if not rest_args:
        raise click.UsageError(f"give {rest} after RUN")
    if at_most is not None and len(rest_args) > at_most:
        raise click.UsageError(f"expected RUN {rest}, got {len(args)} arguments"
                               + (" besides --model (give the run once)" if model is not None else ""))
    return run, rest_args
