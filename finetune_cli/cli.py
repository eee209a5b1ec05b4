"""The `finetune` command: parse options, make one library call, render the result.

Every `FinetuneError` becomes `Error: <message>` on stderr and exit code 2.
Option defaults and choices come from `config`, the recipe files and the
backbone registry; nothing here holds a default of its own. Importing this
module imports neither TensorFlow nor scikit-learn nor pandas.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import statistics
import sys

import click
from rich.console import Console

from finetune_cli import __version__, api
from finetune_cli import render as report
from finetune_cli.config import (ATTACK, AUDIT, DEFAULT_BASE, DISTILL, ENSEMBLE, EXPORT, FEATURES, FILTERS,
                                 IMAGE_SIZE_RANGE, LR_FIND, PATCHES, PRETRAIN, RUNS_DIR, SUGGEST, TRAIN, TUNE)
from finetune_cli.analysis.acquisition import METHODS
from finetune_cli.errors import FinetuneError
from finetune_cli.files import jsonable
from finetune_cli.options import (base_options, batch_size_option, cache_dir_option, cache_options, coverage_option,
                                  empty_sets_option, engine_options, json_option, model_option, out_option,
                                  overwrite_option, pretrain_options, replace_output_option, run_and_rest, run_argument,
                                  seed_option, size_option, table_options, tta_option, weights_option)
from finetune_cli.strategy import recipes

EXAMPLES = f"""
\b
Examples:
  finetune inspect ./images                 what is in the folder, what is broken
  finetune train ./images                   decide, train, write {RUNS_DIR}/images-1/ (base: {DEFAULT_BASE})
  finetune train ./images --base model.keras --out runs/first
  finetune predict last photo.jpg more/ --out preds.csv
  finetune evaluate runs/first ./test-images
  finetune extract-features ./images --base model.keras --out feats.parquet
  finetune pretrain --unlabeled ./raw       an encoder for --base, in {RUNS_DIR}/raw-encoder-1.keras
  finetune train ./images --unlabeled ./raw
  finetune lr-find ./images --strategy full a learning-rate sweep: lr.csv, lr.png, suggestions
  finetune train ./images --lr auto         fine-tune at the sweep's suggested rate
  finetune tune ./images --budget 40        search the linear head's settings: runs/images-tune-1/best.toml
  finetune report last --explain gradcam    the run on one page, with maps over its mistakes
  finetune export last --format tflite      a checked deployment file (export.json)
  finetune explain last ./test-images       heat maps of what decides each prediction
  finetune attack last ./test-images        accuracy against adversarial pixel budgets
  finetune audit ./images                   possible label errors, duplicates, leakage
  finetune suggest ./images --unlabeled ./raw   which images to label next
  finetune curve ./images                   would more labels help, and how much
  finetune predict last ./photos --engine ray --out preds/
  finetune bases | layers --base B | cache info
"""


#: What Ctrl-C leaves behind, by command (its function's name); `{out}` is --out, else OUT, explained.
INTERRUPTED = {
    "train": "a fine-tuning run keeps its last checkpoint in {out}: `finetune train ... --out {out} --resume` "
             "continues it (a run stopped before its first checkpoint, a linear one for instance, was removed: "
             "start it again)",
    "pretrain": "the last good encoder (saved each time the held-out loss improved, if any epoch did) is kept "
                "as {out} and works as --base; pretrain has no --resume: run it again to start over",
    "tune": "the trials finished so far are kept in trials.csv in {out}: the same `finetune tune` with --out "
            "{out} continues the search (with no trial finished, the folder was removed)",
    "export": "nothing was exported (the staging folder and a new output folder were removed); the run's "
              "files are untouched",
    "distill": "the distill run was discarded (nothing of it is kept in {out}); teacher outputs already "
               "computed stay in the feature cache, so a rerun is faster",
    "extract_features": "no table was written; the features computed so far are in the feature cache (unless "
                        "--no-cache), so a rerun starts where this one stopped",
}
INTERRUPTED_DEFAULT = "files already saved are intact: nothing was half-written; run the command again"


def interrupted_message(command: str, out=None) -> str:
    """The one line Ctrl-C prints after `command` (a function name of this module): what is kept, what to do."""
    text = INTERRUPTED.get(command, INTERRUPTED_DEFAULT)
    if out or "{out}" not in text:
        return "Interrupted: " + text.format(out=out)
    shown = "the encoder file" if command == "pretrain" else "the folder"
    return "Interrupted: " + text.format(out="OUT") + f" (OUT: {shown} named at the start)"


def handle_errors(command):
    """Turn library errors and Ctrl-C into one line and an exit code (2; 130 for Ctrl-C)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(interrupted_message(command.__name__, kwargs.get("out")), err=True)
            sys.exit(130)

    return wrapper


def err_console() -> Console:
    """Where progress bars go, so that stdout stays clean for --json and pipes."""
    return Console(stderr=True)


def echo_sharded(manifest: dict, skipped, out) -> None:
    """What an --engine ray run wrote (stdout), and each skipped file (stderr)."""
    from finetune_cli.files import shown

    for item in skipped:
        click.echo(f"skipped {shown(item.path)}: {shown(item.reason)}", err=True)
    engine = manifest["engine"]
    click.echo(f"wrote {out}: {manifest['rows']} rows in {len(manifest['shards'])} Parquet shard(s) + manifest.json "
               f"({engine['workers']} workers on {engine['nodes']} node(s)"
               + (f", {len(skipped)} files skipped" if skipped else "") + ")")


def chosen_run(run: str) -> str:
    """The run folder RUN names, absolute (`last`: the last finished run under runs/, `run.resolve_run`).

    When the current folder also holds a folder named `last`, a note on stderr says which is used.
    """
    from finetune_cli.runs.run import resolve_run

    return str(resolve_run(run, note=lambda text: click.echo(text, err=True)))


def echo_run(run: str, role: str = "run") -> None:
    """Which run the command read: one line on stderr (after its result, so stdout stays clean)."""
    click.echo(f"{role}: {run}", err=True)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def cli() -> None:
    """Transfer learning for a folder of labelled images.

    Put each class's images in a subfolder named after the class; finetune
    inspects the folder, decides how to reuse a pretrained network, trains,
    and explains what it did.
    """


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@json_option
@click.option("--base", default=None, help="Also measure similarity to this backbone's pretraining data and show "
                                           "the plan `train` would choose.")
@weights_option
@size_option
@table_options
@handle_errors
def inspect(folder: str, as_json: bool, base: str | None, weights: str, image_size: int | None) -> None:
    """Report classes, image sizes and formats, skipped files, duplicates (and, with --base, the plan)."""
    with report.progress_bar(err_console(), "scanning", "files") as progress:
        profile = api.inspect(folder, progress=progress)
    evidence = plan = None
    if base:
        with report.progress_bar(err_console(), "probing features") as progress:
            reporter = report.RichReporter(Console(file=io.StringIO()), progress)  # the bar alone
            _, evidence, plan = api.plan(folder, base, weights=weights, image_size=image_size, reporter=reporter)
        suspects = None  # the audit reads every image's features: only for folders up to a size
        if profile.n_images <= AUDIT.inspect_max_images:
            suspects = api.audit(folder, base, weights=weights, image_size=image_size, write=False)["counts"]
    if as_json:
        info = profile.to_dict()
        if plan:
            info.update(similarity=evidence.to_dict(), plan=plan.to_dict(), audit=suspects)
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        report.profile_tables(profile, Console())
        if plan:
            report.plan_panel(Console(), plan, evidence)
            if suspects is None:
                click.echo(f"{profile.n_images} images: `finetune audit {folder} --base {base}` looks for label "
                           "errors, near-duplicates and outliers")
            elif any(suspects.values()):
                found = ", ".join(f"{n} {AUDIT_WORDS[k]}" for k, n in suspects.items() if n)
                click.echo(f"{found}: run `finetune audit {folder} --base {base}`")


@cli.command()
@json_option
@handle_errors
def bases(as_json: bool) -> None:
    """List the backbones --base accepts by name."""
    rows = api.bases()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    report.rows_table(Console(), rows, ["name", "input_size", "params_m", "feature_dim", "preprocess", "weights"],
                      title="Backbones (or pass --base PATH/TO/model.keras)")


@cli.command()
@base_options(DEFAULT_BASE)
@json_option
@handle_errors
def layers(base: str, weights: str, image_size: int | None, as_json: bool) -> None:
    """List a backbone's stage outputs: what --layer accepts (index or name)."""
    rows = api.layers(base, weights="none" if weights == "imagenet" else weights, image_size=image_size)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    report.rows_table(Console(), rows, ["stage", "name", "shape"], title=f"Stages of {base}")


@cli.command("extract-features")
@click.argument("folder", type=str)
@base_options(DEFAULT_BASE)
@out_option(f"Output table: .parquet, .csv or .npz. [default: a new {RUNS_DIR}/FOLDER-features-N.parquet] "
                   "With --engine ray: a folder (or URI) for the shards.", kind="any")
@overwrite_option
@click.option("--layer", default=None, help="Stage index (1 = earliest, -1 = last) or layer name. Default: final features.")
@click.option("--pooling", type=click.Choice(["avg", "max"]), default=FEATURES.pooling, show_default=True)
@batch_size_option
@cache_options
@engine_options
@table_options
@handle_errors
def extract_features(folder, base, weights, image_size, out, overwrite, layer, pooling, batch_size, cache_dir, no_cache,
                     engine, address, workers):
    """Write one row of features per usable image: path, label, f0, f1, ..."""
    from pathlib import Path

    from finetune_cli.files import claim_numbered, drop_if_empty

    if engine == "ray":
        with report.progress_bar(err_console(), "extracting (ray)") as progress:
            manifest, skipped = api.extract_features(
                folder, base, out=out, overwrite=overwrite, weights=weights, layer=layer, pooling=pooling,
                image_size=image_size, batch_size=batch_size, engine=engine, address=address, workers=workers,
                progress=progress)
        echo_sharded(manifest, skipped, out)
        return
    claimed = out is None  # the default name is claimed now (an empty file): never shared with another run
    out = claim_numbered(f"{Path(folder).resolve().name}-features", ".parquet", file=True) if claimed else out
    console = err_console()
    with drop_if_empty(out if claimed else None), \
            report.progress_bar(console, "scanning", "files") as scan_progress, \
            report.progress_bar(console, "extracting") as progress:
        table, scan = api.extract_features(
            folder, base, out=out, overwrite=overwrite or claimed, weights=weights, layer=layer, pooling=pooling,
            image_size=image_size, batch_size=batch_size, cache_dir=cache_dir, use_cache=not no_cache,
            progress=progress, scan_progress=scan_progress,
        )
    report.extraction_summary(table, scan, out)


@cli.group()
def cache() -> None:
    """Inspect or clear the on-disk feature cache."""


@cache.command("info")
@cache_dir_option
@json_option
@handle_errors
def cache_info(cache_dir, as_json):
    """Where the cache is, and how much it holds."""
    info = api.cache_info(cache_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB")
    for space in info["namespaces"]:
        click.echo(f"  {space['backbone']}: {space['entries']} entries  ({space['key']})")


@cache.command("clear")
@cache_dir_option
@handle_errors
def cache_clear(cache_dir):
    """Delete every cached feature (only in a folder marked as a feature cache; nothing else is touched)."""
    click.echo(f"removed {api.cache_clear(cache_dir)} cached feature entries")


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@out_option(f"Run folder to create (model, plan, metrics, plots). [default: a new {RUNS_DIR}/FOLDER-N]")
@click.option("--strategy", type=click.Choice(["auto", *recipes.STRATEGIES]), default="auto", show_default=True,
              help="Override the decision table.")
@click.option("--similarity", type=click.Choice(["auto", "similar", "different"]), default="auto", show_default=True,
              help="Skip the measurement and state the similarity to ImageNet.")
@click.option("--recipe", default=None, help=f"A shipped recipe ({', '.join(recipes.shipped())}) or a .toml file.")
@click.option("--val-dir", type=click.Path(), default=None,
              help="Validation folder (same classes); default: a stratified 20 %% split.")
@click.option("--test-dir", type=click.Path(), default=None,
              help="Also evaluate the trained model on this labelled folder (as `finetune evaluate`, in one start-up).")
@click.option("--drop-overlap", is_flag=True,
              help="Leave out --val-dir/--test-dir images that are copies of training images (refused by default).")
@seed_option()
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--lr", default=None, metavar="auto|FLOAT",
              help="Fine-tuning: the head's learning rate, or auto (the `lr-find` sweep first, its valley "
                   "suggestion); the other stages keep their ratio to it. [default: the recipe's]")
@batch_size_option
@click.option("--no-calibrate", is_flag=True,
              help="Keep the trained probabilities: no temperature scaling on the validation images.")
@click.option("--no-pilot", is_flag=True,
              help=f"Fine-tuning: run the whole schedule even when its first {TRAIN.pilot_epochs} epochs do not "
                   "beat the linear head (by default it stops there and keeps the head).")
@click.option("--ensemble", default=str(TRAIN.ensemble), show_default=True, metavar="N",
              help=f"Average N members (1-{ENSEMBLE.max_members}; 1: off) in one model.keras: linear plans vary "
                   "seed, views and stage (almost free); fine-tuning see --ensemble-mode. Kept only if its "
                   "validation cross-entropy is no worse than the best member's.")
@click.option("--ensemble-mode", default=TRAIN.ensemble_mode, show_default=True, metavar="seeds|snapshots",
              help="Fine-tuning ensembles: seeds (N full fine-tunes: N times the cost) or snapshots (one run, "
                   f"cosine restarts every {ENSEMBLE.snapshot_cycle} epochs, a member per cycle).")
@click.option("--average", default=TRAIN.average, show_default=True, metavar="none|swa|ema",
              help=f"Fine-tuning: average the weights (swa: the last {ENSEMBLE.swa_epochs} epochs; ema: per epoch, "
                   f"decay {ENSEMBLE.ema_decay}); kept only if validation cross-entropy is not worse.")
@click.option("--devices", default="1", show_default=True, metavar="N|all",
              help="Fine-tune on N devices (all: every GPU) with MirroredStrategy, each step's batch split across "
                   "them; the result matches one device up to rounding. FINETUNE_CPU_DEVICES=N splits a CPU (tests).")
@cache_options
@click.option("--unlabeled", type=click.Path(file_okay=False), default=None,
              help="Pretrain a denoising autoencoder on these unlabeled images first (from --base's early stages "
                   "when given), then train from its encoder.")
@pretrain_options(epochs_flag="--pretrain-epochs")
@json_option
@table_options
@handle_errors
def train(folder, base, weights, image_size, out, strategy, similarity, recipe, val_dir, test_dir, drop_overlap, seed,
          resume, batch_size, cache_dir, no_cache, unlabeled, arch, noise, noise_type, code_size, pretrain_epochs,
          greedy, lr, no_calibrate, no_pilot, ensemble, ensemble_mode, average, devices, as_json):
    """Decide how to reuse the base, train, and write a run folder."""
    given = dict(arch=arch, noise=noise, noise_type=noise_type, code_size=code_size, epochs=pretrain_epochs)
    if unlabeled is None and (any(v is not None for v in given.values()) or greedy):
        raise click.UsageError("--arch, --noise, --noise-type, --code-size, --pretrain-epochs and --greedy set the "
                               "pretraining of --unlabeled; give --unlabeled DIR or drop them")
    source = click.get_current_context().get_parameter_source("base")
    if unlabeled is not None and source == click.core.ParameterSource.DEFAULT:
        base = None  # pretrain from scratch unless a base was named
    console = err_console()
    with report.progress_bar(console, "features") as progress:
        metrics = api.train(
            folder, base, out=out, weights=weights, image_size=image_size, strategy=strategy,
            similarity=similarity, recipe=recipe, val_dir=val_dir, test_dir=test_dir, seed=seed, resume=resume,
            batch_size=batch_size, cache_dir=cache_dir, use_cache=not no_cache,
            unlabeled=unlabeled, pretrain_settings=api.pretrain_config(**given) if unlabeled else None,
            greedy=greedy, reporter=report.RichReporter(console, progress), lr=lr,
            settings=dataclasses.replace(TRAIN, calibrate=not no_calibrate, drop_overlap=drop_overlap,
                                         pilot_epochs=0 if no_pilot else TRAIN.pilot_epochs),
            ensemble=ensemble, ensemble_mode=ensemble_mode, average=average, devices=devices,
        )
    if as_json:  # metrics.json's object; progress and notes went to stderr
        click.echo(json.dumps(metrics, indent=2, ensure_ascii=False, default=jsonable))
        return
    report.metrics_summary(Console(), metrics, metrics.get("run_folder", out))
    from pathlib import Path

    page = Path(metrics.get("run_folder") or out or ".") / "report.html"
    if page.is_file():
        click.echo(f"report: {page}")


@cli.command("lr-find", help=f"Sweep the head's learning rate from {LR_FIND.start_lr:g} to {LR_FIND.end_lr:g} "
             f"(exponential, {LR_FIND.steps} steps at most, stopping when the smoothed loss passes "
             f"{LR_FIND.diverge_factor:g}x its best) on the model `train` would fine-tune; print the suggestions "
             "(valley, steepest, minimum/10) and write lr.csv and lr.png. The weights are not kept.")
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@click.option("--strategy", type=click.Choice([s for s in recipes.STRATEGIES if s != "linear"]), default="partial",
              show_default=True, help="The fine-tuning plan to sweep (what `train --strategy` would train).")
@click.option("--recipe", default=None, help="A fine-tuning recipe (shipped name or .toml file); overrides --strategy.")
@out_option(f"Folder to create for lr.csv, lr.png, lr.json. [default: a new {RUNS_DIR}/FOLDER-lr-N]")
@seed_option()
@cache_options
@json_option
@table_options
@handle_errors
def lr_find(folder, base, weights, image_size, strategy, recipe, out, seed, cache_dir, no_cache, as_json):
    console = err_console()
    with report.progress_bar(console, "working", "steps") as progress:
        finding = api.lr_find(folder, base, out=out, weights=weights, image_size=image_size, strategy=strategy,
                              recipe=recipe, seed=seed, cache_dir=cache_dir, use_cache=not no_cache,
                              reporter=report.RichReporter(console, progress))
    if as_json:
        click.echo(json.dumps(finding.to_dict(), indent=2))
        return
    report.lr_summary(Console(), finding)


@cli.command()
@click.option("--unlabeled", required=True, type=click.Path(file_okay=False), help="Folder of unlabeled images (flat or nested).")
@out_option(f"Encoder file to create (.keras). [default: a new {RUNS_DIR}/FOLDER-encoder-N.keras]", kind="file")
@pretrain_options()
@click.option("--image-size", type=click.IntRange(*IMAGE_SIZE_RANGE), default=None,
              help=f"Input side in pixels. [default: {PRETRAIN.image_size}]")
@click.option("--init-from", default=None, help="Start the encoder from the early stages of this backbone (name or .keras file).")
@weights_option
@seed_option()
@json_option
@handle_errors
def pretrain(unlabeled, out, arch, noise, noise_type, code_size, pretrain_epochs, greedy, image_size, init_from, weights, seed,
             as_json):
    """Learn features from unlabeled images with a denoising autoencoder; save the encoder as a backbone."""
    console = err_console()
    settings = api.pretrain_config(arch=arch, noise=noise, noise_type=noise_type, code_size=code_size,
                                   epochs=pretrain_epochs, image_size=image_size)
    summary = api.pretrain(unlabeled, out, settings=settings, init_from=init_from, init_weights=weights,
                           greedy=greedy, seed=seed, reporter=report.RichReporter(console))
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False, default=jsonable))
        return
    report.pretrain_summary(Console(), summary, summary["encoder"])


@cli.command()
@click.argument("args", nargs=-1, required=True, type=click.Path(), metavar="RUN INPUTS...")
@model_option
@out_option("Write a CSV here instead of printing. With --engine ray: a folder (or URI) for the shards.", kind="any")
@overwrite_option
@click.option("--top-k", type=click.IntRange(1, 100), default=1, show_default=True)
@tta_option
@coverage_option
@click.option("--abstain", is_flag=True, help="With --coverage: an `abstain` column, true where the set has more "
                                              "than one class, or none (no single answer at that coverage).")
@empty_sets_option
@engine_options
@handle_errors
def predict(args, model_dir, out, overwrite, top_k, tta, coverage, abstain, empty_sets, engine, address, workers):
    """Predict the class of image files and folders (INPUTS) with RUN: a run folder, or `last`."""
    from finetune_cli.files import shown

    model_dir, inputs = run_and_rest(args, model_dir, "INPUTS...")
    model_dir = chosen_run(model_dir)
    if engine == "ray":
        with report.progress_bar(err_console(), "predicting (ray)") as progress:
            manifest, skipped = api.predict(list(inputs), model_dir, top_k=top_k, out=out, overwrite=overwrite,
                                            tta=tta, engine=engine, address=address, workers=workers,
                                            progress=progress)
        echo_sharded(manifest, skipped, out)
        echo_run(model_dir)
        return
    frame, skipped = api.predict(list(inputs), model_dir, top_k=top_k, out=out, overwrite=overwrite, tta=tta,
                                 engine=engine, address=address, coverage=coverage, abstain=abstain,
                                 empty_sets=empty_sets)
    for item in skipped:
        click.echo(f"skipped {shown(item.path)}: {shown(item.reason)}", err=True)
    if "coverage" in frame.attrs:
        click.echo(report.coverage_promise(frame.attrs["coverage"]), err=True)
    if out:
        click.echo(f"wrote {len(frame)} predictions to {out}")
    else:
        click.echo(frame.to_csv(index=False), nl=False)
    echo_run(model_dir)


@cli.command()
@click.argument("args", nargs=-1, required=True, type=click.Path(path_type=str), metavar="RUN FOLDER")
@model_option
@json_option
@tta_option
@click.option("--html", "html", type=click.Path(dir_okay=False), default=None, metavar="PAGE",
              help="Also write a self-contained HTML page: confusion matrix, per-class scores, misclassified images.")
@click.option("--overwrite", is_flag=True, help="Replace the --html page if it exists.")
@coverage_option
@empty_sets_option
@table_options
@handle_errors
def evaluate(args, model_dir, as_json, tta, html, overwrite, coverage, empty_sets):
    """Accuracy, calibration (ECE, NLL), per-class precision/recall/F1 and confusion matrix of RUN (a run
    folder, or `last`) on a labelled FOLDER."""
    model_dir, (folder,) = run_and_rest(args, model_dir, "FOLDER", at_most=1)
    model_dir = chosen_run(model_dir)
    result = api.evaluate(folder, model_dir, tta=tta, html=html, overwrite=overwrite, coverage=coverage,
                          empty_sets=empty_sets)
    if as_json:  # the run it read is in the object, stdout stays one JSON object
        click.echo(json.dumps({**result, "run": model_dir}, indent=2, ensure_ascii=False))
        return
    console = Console()
    if result.get("task") == "multi-label":
        return multi_label_evaluation(console, result, model_dir)
    views = f" (mean of {result['tta']} views per image)" if result["tta"] > 1 else ""
    low, high = result["accuracy_interval95"]
    console.print(f"accuracy [bold]{result['accuracy']:.1%}[/bold] (95 % interval {low:.1%}-{high:.1%}) on "
                  f"{result['n_images']} images{views}; macro-F1 {result['macro_f1']:.3f}, balanced accuracy "
                  f"{result['balanced_accuracy']:.1%}; ECE {result['ece']:.1%} ({TRAIN.ece_bins} bins), "
                  f"NLL {result['nll']:.3f}", highlight=False)
    if coverage is not None:
        console.print(f"prediction sets at coverage {result['coverage_target']:g}: the true class was in "
                      f"{result['coverage']:.1%} of them, mean size {result['mean_set_size']:.2f} classes"
                      + (f" ({result['empty_share']:.1%} empty)" if result["empty_sets"] else "") + "; "
                      + report.coverage_promise(result), highlight=False)
    report.rows_table(console, result["per_class"], ["class", "precision", "recall", "f1", "support"])
    if result.get("n_training_images"):
        rest = (f"; on the other {result['n_held_out']}: accuracy {result['held_out_accuracy']:.1%}"
                if "n_held_out" in result else "")
        console.print(f"[yellow]warning:[/yellow] {result['n_training_images']} of these {result['n_images']} images "
                      f"trained this model (same content): the accuracy above is not a held-out score{rest}",
                      highlight=False)
    if html:
        console.print(f"page: {result['html']}", highlight=False)
    echo_run(model_dir)


def multi_label_evaluation(console, result: dict, model_dir: str) -> None:
    """`evaluate`'s lines for a multi-label run: the scores, per label, and a warning on training images."""
    console.print(f"{report.multilabel_scores_line(result)} on {result['n_images']} images", highlight=False)
    report.multilabel_table(console, result["per_label"])
    if result.get("n_training_images"):
        console.print(f"[yellow]warning:[/yellow] {result['n_training_images']} of these {result['n_images']} images "
                      "trained this model (same content): the scores above are not held-out scores", highlight=False)
    echo_run(model_dir)


@cli.command("report")
@run_argument()
@click.option("--explain", type=click.Choice(["occlusion", "gradcam"]), default=None,
              help="Also draw heat maps over the misclassified validation images (loads the model).")
@handle_errors
def report_page(run: str, explain: str | None) -> None:
    """(Re)build RUN/report.html from a finished run folder. RUN: a run folder, or `last`."""
    run = chosen_run(run)
    click.echo(f"wrote {api.report(run, explain=explain)}")
    echo_run(run)


@cli.command()
@run_argument()
@json_option
@handle_errors
def diagnose(run: str, as_json: bool) -> None:
    """Read a run's training history: a verdict and the next step to take. RUN: a run folder, or `last`."""
    result = api.diagnose(chosen_run(run))
    if as_json:  # holds "run"
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    report.diagnosis(Console(), result)
    echo_run(result["run"])


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@out_option(f"Search folder: new, or an earlier search's to continue it (done trials are skipped). "
                   f"[default: a new {RUNS_DIR}/FOLDER-tune-N]")
@click.option("--method", default=TUNE.method, show_default=True,
              help="auto (grid for 1-2 varying parameters, random from 3; fine-tuning: halving), grid, random, or "
                   "halving (successive halving: over images; for a fine-tuning plan over epochs).")
@click.option("--budget", default=None, metavar="N",
              help=f"Trials at most (halving: candidates of the first rung). [default: {TUNE.budget}, or with "
                   f"--time alone {TUNE.max_trials}; fine-tuning: {TUNE.finetune_budget}]")
@click.option("--time", "time_limit", default=None, metavar="DURATION",
              help="Start no trial after this long, e.g. 90s, 5m, 1h (rerun with the same --out to continue).")
@click.option("--cv", type=int, default=TUNE.cv, show_default=True,
              help="Cross-validation folds of a linear search (stratified; repeated when a class has under "
                   f"{TUNE.repeat_below} searched images). Fine-tuning trials are scored on one split.")
@seed_option("Seeds the held-out split (that of `train --seed`), the folds and the sampling.")
@click.option("--recipe", default=None, help="The recipe whose plan is searched: linear or trouble (a linear head), "
                                             "partial, partial-2 or full (fine-tuning), or a .toml file. [default: "
                                             "linear for a small folder; for a large one the plan train decides]")
@batch_size_option
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: each batch of trials (a rung of halving) runs as Ray Tune trials on a cluster, one CPU "
                   "each; the same candidates, rungs and trials.csv as local.")
@click.option("--address", default=None, help="With --engine ray: an existing cluster (host:port, ray://host:10001, "
                                                "or auto); default: start Ray on this machine for the search.")
@click.option("--max-concurrent", type=click.IntRange(1, 10_000), default=None,
              help="With --engine ray: Ray Tune trials running at once. [default: as the cluster's CPUs allow]")
@cache_options
@json_option
@table_options
@handle_errors
def tune(folder, base, weights, image_size, out, method, budget, time_limit, cv, seed, recipe, batch_size, cache_dir,
         no_cache, as_json, engine, address, max_concurrent):
    """Search hyper-parameters: a linear head's C, stage, pooling and views on cached features, cross-validated,
    or a fine-tuning plan's rates, dropout, l2, unfrozen stages and epochs by successive halving; score the best
    once on held-out images; write trials.csv, best.toml (for train --recipe), search.png."""
    from finetune_cli.tasks.tune.space import parse_budget, parse_duration

    budget = parse_budget(budget) if budget is not None else None
    seconds = parse_duration(time_limit) if time_limit is not None else None
    console = err_console()
    with report.progress_bar(console, "tune", "steps") as progress:
        summary = api.tune(folder, base, out=out, method=method, budget=budget, time_limit=seconds, cv=cv, seed=seed,
                           recipe=recipe, weights=weights, image_size=image_size, batch_size=batch_size,
                           cache_dir=cache_dir, use_cache=not no_cache, reporter=report.RichReporter(console, progress),
                           engine=engine, address=address, max_concurrent=max_concurrent)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    report.tune_summary(Console(), summary)


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--teacher", "teachers", multiple=True, type=str,
              help="A run folder of `finetune train` (repeat it: the teachers' probabilities are averaged).")
@click.option("--student", required=True,
              help="A name from `finetune bases` (lenet, alexnet, vgg: small, random init) or a .keras file.")
@click.option("--student-weights", default="imagenet", show_default=True,
              help="imagenet, none (fresh init) or a weights file; the built-in lenet/alexnet/vgg always start fresh.")
@click.option("--unlabeled", type=click.Path(file_okay=False), default=None,
              help="Images only the teachers label (the transfer set): soft loss only.")
@click.option("--temperature", type=float, default=None, help=f"Softening T > 0. [default: {DISTILL.temperature:g}]")
@click.option("--alpha", type=float, default=None,
              help=f"Weight of the hard-label loss in [0, 1]; the soft loss gets 1 - alpha (times T^2). "
                   f"[default: {DISTILL.alpha:g}]")
@click.option("--image-size", type=click.IntRange(*IMAGE_SIZE_RANGE), default=None,
              help="The student's input side in pixels. [default: the first teacher's]")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None, help=f"Most epochs (early stopping ends sooner). [default: {DISTILL.epochs}]")
@click.option("--views", type=click.IntRange(1, 64), default=None,
              help=f"Deterministic flip/crop views per training image, each scored by the teachers. "
                   f"[default: {DISTILL.views}]")
@click.option("--val-dir", type=click.Path(), default=None,
              help="Labelled validation folder (early stopping). [default: a split of FOLDER, as train]")
@click.option("--test-dir", type=click.Path(), default=None,
              help="Labelled folder the comparison table scores on. [default: the validation split]")
@out_option(f"Run folder to create. [default: a new {RUNS_DIR}/FOLDER-distill-N]")
@seed_option()
@cache_options
@json_option
@table_options
@handle_errors
def distill(folder, teachers, student, student_weights, unlabeled, temperature, alpha, image_size, epochs, views,
            val_dir, test_dir, out, seed, cache_dir, no_cache, as_json):
    """Train a small student on teacher runs' soft targets (knowledge distillation); compare it with the
    teachers and with the same student trained on hard labels alone (distill.json)."""
    console = err_console()
    teachers = [chosen_run(t) for t in teachers]
    with report.progress_bar(console, "distill", "steps") as progress:
        metrics = api.distill(folder, teachers, student, out=out, student_weights=student_weights,
                              unlabeled=unlabeled, temperature=temperature, alpha=alpha, image_size=image_size,
                              epochs=epochs, views=views, val_dir=val_dir, test_dir=test_dir, seed=seed,
                              cache_dir=cache_dir, use_cache=not no_cache,
                              reporter=report.RichReporter(console, progress))
    if as_json:
        click.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        return
    summary = metrics["distill"]
    report.rows_table(Console(), summary["rows"], [c for c in summary["rows"][0] if c != "file"],
                      f"distillation (T={summary['temperature']:g}, alpha={summary['alpha']:g}; accuracy on the "
                      f"{summary['scored_on']} images)")
    click.echo(f"run folder: {metrics['run_folder']}")
    for teacher in teachers:
        echo_run(teacher, "teacher run")


@cli.command()
@run_argument()
@click.option("--format", "fmt", required=True, type=click.Choice(["keras", "savedmodel", "tflite", "onnx"]),
              help="keras (a checked copy), savedmodel (TensorFlow), tflite (LiteRT), onnx (onnxruntime).")
@click.option("--quantize", default="none", show_default=True, type=click.Choice(["none", "fp16", "dynamic", "int8"]),
              help="tflite: fp16, dynamic (int8 weights) or int8 (full integer, calibrated on --data); "
                   "onnx: int8; keras and savedmodel: none.")
@out_option("Folder for the file, labels.json and export.json (other files in it are kept). "
                   "[default: a new RUN/exports/FORMAT-QUANTIZE-N]")
@click.option("--data", type=click.Path(), default=None,
              help="The folder the run was trained on: its validation split (as `train --seed`) verifies the "
                   "export, its training images calibrate int8.")
@click.option("--check-dir", type=click.Path(), default=None,
              help="A labelled folder to verify on instead of the validation split.")
@click.option("--calibration", type=click.IntRange(1, 100_000), default=EXPORT.calibration, show_default=True,
              metavar="N", help="Training images int8 quantisation calibrates on, at most.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=EXPORT.min_agreement, show_default=True,
              help="Refuse the export (exit 2, nothing written) when the file picks the Keras model's class on "
                   "a smaller share of the held-out images.")
@click.option("--force", is_flag=True, help="Keep the export even below --min-agreement.")
@click.option("--overwrite", is_flag=True, help="Replace this format's file, labels.json and export.json in --out.")
@seed_option("The --seed the run was trained with.")
@json_option
@table_options
@handle_errors
def export(run, fmt, quantize, out, data, check_dir, calibration, min_agreement, force, overwrite, seed, as_json):
    """Export a run for deployment (keras, savedmodel, tflite, onnx) and verify the file with its own runtime
    against the Keras model: accuracy, top-1 agreement, probability difference, size, CPU ms per image."""
    run = chosen_run(run)
    result = api.export(run, format=fmt, quantize=quantize, out=out, data=data, check_dir=check_dir,
                        calibration=calibration, min_agreement=min_agreement, force=force, overwrite=overwrite,
                        seed=seed)
    if as_json:  # holds "run"
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    r = result
    click.echo(f"{r['format']} ({r['quantize']}), {r['bytes']:,} bytes; checked on {r['n_images']} images "
               f"({r['checked_on']}): accuracy {r['accuracy']:.1%} (Keras {r['accuracy_keras']:.1%}"
               f"{'' if r.get('held_out', True) else ', training images'}), top-1 "
               f"agreement {r['agreement']:.1%}, largest probability difference {r['max_prob_diff']:.2g}; "
               f"{r['ms_per_image']:.2f} ms per image at batch 1 (Keras {r['ms_per_image_keras']:.2f})")
    forced = " (forced: below --min-agreement)" if result["agreement"] < result["min_agreement"] else ""
    click.echo(f"wrote {result['out']}/{result['file']}, labels.json, export.json{forced}")
    echo_run(run)


@cli.command()
@run_argument()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--method", type=click.Choice(["occlusion", "gradcam"]), default="occlusion", show_default=True,
              help="occlusion: a grey patch slid over the image (any model); gradcam: gradients at the last "
                   "spatial layer, nested backbones included.")
@click.option("--class", "class_name", default=None, help="Map this class. [default: each image's predicted class]")
@click.option("--sanity", is_flag=True, help="Also map with the head's weights randomised and flag maps that barely "
                                             "change (Spearman rank correlation; Adebayo et al. 2018).")
@out_option(f"Folder for maps/, index.html, explain.json. [default: a new {RUNS_DIR}/RUN-explain-N]")
@replace_output_option
@json_option
@handle_errors
def explain(run, images, method, class_name, sanity, out, overwrite, as_json):
    """Heat maps of what RUN looks at in IMAGES (files, or a folder; a folder of class subfolders puts the
    misclassified first in the gallery)."""
    from finetune_cli.files import shown

    run = chosen_run(run)
    result = api.explain(run, list(images), method=method, class_name=class_name, sanity=sanity, out=out,
                         overwrite=overwrite)
    if as_json:  # skipped files are in the object
        click.echo(json.dumps({**result, "run": run}, indent=2, ensure_ascii=False))
        return
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {shown(item['reason'])}", err=True)
    if sanity:
        click.echo(f"sanity: {result['flagged']} of {len(result['images'])} maps barely change when the head is "
                   "randomised (flagged: they do not explain the model)")
    click.echo(f"wrote {len(result['images'])} {method} maps: {result['page']}")
    echo_run(run)


@cli.command()
@run_argument()
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--eps", default=",".join(f"{e:g}" for e in ATTACK.eps), show_default=True,
              help="Perturbation budgets in pixels (of 255), comma-separated; 0 (clean) is always included.")
@click.option("--method", "methods", default=",".join(ATTACK.methods), show_default=True,
              help="Attacks, comma-separated: fgsm (one step), pgd (projected gradient descent).")
@click.option("--corruptions", is_flag=True, help="Also score Gaussian noise, blur, JPEG and brightness at three "
                                                  "severities.")
@out_option(f"Folder for robustness.json/.png and index.html. [default: a new {RUNS_DIR}/RUN-attack-N]")
@replace_output_option
@json_option
@table_options
@handle_errors
def attack(run, folder, eps, methods, corruptions, out, overwrite, as_json):
    """Accuracy of RUN on a labelled FOLDER under adversarial perturbations of growing eps (and corruptions)."""
    run = chosen_run(run)
    result = api.attack(run, folder, eps=eps, methods=methods, out=out, corruptions=corruptions, overwrite=overwrite)
    if as_json:  # warnings and skipped files are in the object
        click.echo(json.dumps({**result, "run": run}, indent=2, ensure_ascii=False))
        return
    console = Console()
    report.rows_table(console, result["rows"], ["method", "eps", "accuracy"],
                      f"accuracy against eps on {result['n_images']} images")
    for method, value in result["halving_eps"].items():
        console.print(f"{method.upper()}: accuracy halves at eps {value:g}" if value is not None
                      else f"{method.upper()}: accuracy never halves", highlight=False)
    if result["corruptions"]:
        report.rows_table(console, result["corruptions"], ["corruption", "severity", "level", "accuracy"],
                          "common corruptions")
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    click.echo(f"wrote {result['page']}, robustness.json, robustness.png")
    echo_run(run)


AUDIT_WORDS = {"label": "possible label errors (out-of-fold predictions disagree)",
               "leakage": "near-duplicate pairs across folders", "duplicate": "near-duplicate pairs", "outlier": "outliers"}


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@click.option("--val-dir", type=click.Path(), default=None,
              help="Validation folder: also searched for near-duplicate copies of FOLDER's images (leakage).")
@click.option("--test-dir", type=click.Path(), default=None, help="Test folder, as --val-dir.")
@out_option(f"Folder for audit.csv and index.html. [default: a new {RUNS_DIR}/FOLDER-audit-N]")
@replace_output_option
@seed_option("Seeds the cross-validation folds.")
@batch_size_option
@cache_options
@json_option
@table_options
@handle_errors
def audit(folder, base, weights, image_size, val_dir, test_dir, out, overwrite, seed, batch_size, cache_dir, no_cache,
          as_json):
    """Find possible label errors (out-of-fold probabilities of a linear head on the features), near-duplicate pairs
    (leakage when across FOLDER / --val-dir / --test-dir) and outliers; write audit.csv and index.html.

    \b
    --json prints one object: folder, base, images {train, val, test},
    counts {label, leakage, duplicate, outlier}, findings [{kind, path,
    other_path, given_label, suggested_label, score}] (most suspect first per
    kind; score: label = suggested-class minus given-class out-of-fold
    probability, pairs = cosine similarity, outlier = robust z), skipped
    [{path, reason}], settings, files {csv, html}.
    """
    with report.progress_bar(err_console(), "features") as progress:
        result = api.audit(folder, base, val_dir=val_dir, test_dir=test_dir, out=out, overwrite=overwrite,
                           weights=weights, image_size=image_size, batch_size=batch_size, cache_dir=cache_dir,
                           use_cache=not no_cache, seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    report.rows_table(Console(), result["findings"][:20], ["kind", "path", "other_path", "given_label",
                                                           "suggested_label", "score"], title="suspects (first 20)")
    found = ", ".join(f"{n} {AUDIT_WORDS[k]}" for k, n in result["counts"].items())
    click.echo(f"{found}; wrote {result['files']['csv']} and {result['files']['html']}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@seed_option("Seeds the folds, the nested orders and the bootstrap.")
@batch_size_option
@cache_options
@json_option
@table_options
@handle_errors
def curve(folder, base, weights, image_size, seed, batch_size, cache_dir, no_cache, as_json):
    """Would more labels help? A linear head on FOLDER's cached features, refitted on nested fractions of its
    images, and the accuracy it forecasts at 1x, 2x and 4x the labels, with 95 % intervals, per class too.

    \b
    --json prints one object: folder, base, n_images, skipped, points,
    fit, forecast [{multiple, images_per_class, accuracy, low, high}],
    per_class, limiting_class, gain_if_doubled, verdict, message.
    """
    with report.progress_bar(err_console(), "features") as progress:
        result = api.curve(folder, base, weights=weights, image_size=image_size, batch_size=batch_size,
                           cache_dir=cache_dir, use_cache=not no_cache, seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    rows = [{"labels": f"{r['multiple']:g}x", "images per class": f"{r['images_per_class']:g}",
             "expected accuracy": f"{r['accuracy']:.1%}", "95 % interval": f"{r['low']:.1%}-{r['high']:.1%}"}
            for r in result["forecast"]]
    if rows:
        report.rows_table(Console(), rows, list(rows[0]), title=f"label forecast ({result['n_images']} images)")
    click.echo(result["message"])


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--unlabeled", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Images not yet labelled (flat, or in subfolders whose names are ignored): the pool to rank.")
@click.option("--n", "count", type=click.IntRange(1, 100_000), default=SUGGEST.n, show_default=True,
              help="Images to suggest.")
@click.option("--method", type=click.Choice(list(METHODS)), default=SUGGEST.method, show_default=True,
              help="cluster-margin: the most uncertain image of each of N groups of similar uncertain images; "
                   "badge: uncertain and diverse gradients; margin, random: the baselines.")
@model_option
@base_options(None)
@out_option(f"Folder for suggest.csv and index.html. [default: a new {RUNS_DIR}/UNLABELED-suggest-N]")
@replace_output_option
@click.option("--copy-to", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also copy the suggested images into this new (or empty) folder, to label.")
@seed_option("Seeds the folds, the clustering and the random draws.")
@batch_size_option
@cache_options
@json_option
@table_options
@handle_errors
def suggest(folder, unlabeled, count, method, model_dir, base, weights, image_size, out, overwrite, copy_to, seed,
            batch_size, cache_dir, no_cache, as_json):
    """Rank the --unlabeled images by how much labelling them should help: a linear head on FOLDER's cached
    features, then the chosen method; write suggest.csv and index.html.

    \b
    The base is --base, or with --model RUN the run's own (default: the
    default base). --json prints one object: folder, unlabeled, base, method,
    n_labelled, n_pool, n_left_out, suggestions [{rank, path, score,
    predicted, probability, margin, why}], skipped, files {csv, html},
    copied_to.
    """
    base = base if base is not None or model_dir is not None else DEFAULT_BASE
    with report.progress_bar(err_console(), "features") as progress:
        result = api.suggest(folder, base, unlabeled=unlabeled, n=count, method=method, model=model_dir, out=out,
                             overwrite=overwrite, copy_to=copy_to, weights=weights, image_size=image_size,
                             batch_size=batch_size, cache_dir=cache_dir, use_cache=not no_cache, seed=seed,
                             progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    report.rows_table(Console(), result["suggestions"][:20], ["rank", "path", "predicted", "margin", "why"],
                      title="label these next (first 20)")
    copied = f"; copied them into {result['copied_to']}" if result["copied_to"] else ""
    click.echo(f"{len(result['suggestions'])} of {result['n_pool']} unlabeled images suggested by {method}; wrote "
               f"{result['files']['csv']} and {result['files']['html']}{copied}")


def _unit_list(text: str | None) -> list[int] | None:
    """--unit-ids "3,7,12" -> [3, 7, 12]."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected unit indices like 3,7,12; got {text!r}", param_hint="--unit-ids") from None


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@base_options(DEFAULT_BASE)
@click.option("--layer", required=True, help="Stage index or layer name (see `finetune layers --base B`).")
@click.option("--units", type=click.IntRange(1, 4096), default=None,
              help=f"How many units: the most active (highest mean per-image maximum). [default: {PATCHES.units}]")
@click.option("--unit-ids", default=None, metavar="I,J,...", help="These units instead (0-based).")
@click.option("--top", type=click.IntRange(1, 100), default=PATCHES.top, show_default=True, help="Crops per unit.")
@out_option(f"Folder for patches.png, patches.csv, index.html. [default: a new {RUNS_DIR}/FOLDER-patches-N]")
@replace_output_option
@batch_size_option
@cache_options
@json_option
@table_options
@handle_errors
def patches(folder, base, weights, image_size, layer, units, unit_ids, top, out, overwrite, batch_size, cache_dir,
            no_cache, as_json):
    """For each unit of a layer, the image crops (its receptive field at the strongest position) that excite it
    most across FOLDER."""
    with report.progress_bar(err_console(), "activations") as progress:
        result = api.patches(folder, base, layer=layer, units=units, unit_ids=_unit_list(unit_ids), top=top, out=out,
                             overwrite=overwrite, weights=weights, image_size=image_size, batch_size=batch_size,
                             cache_dir=cache_dir, use_cache=not no_cache, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    size = result["receptive_field"]["size"]
    click.echo(f"{len(result['units'])} units of {result['layer']} (receptive field {size[0]}x{size[1]} px); wrote "
               f"{result['files']['grid']} and {result['files']['html']}")


@cli.command()
@run_argument(required=False)
@click.option("--base", default=None, help="A registry name or a .keras backbone file (instead of RUN).")
@model_option
@weights_option
@size_option
@click.option("--layer", required=True, help="Stage index or layer name (see `finetune layers --base B`).")
@click.option("--units", type=click.IntRange(1, 256), default=None,
              help=f"How many units: the first ones. [default: {FILTERS.units}]")
@click.option("--unit-ids", default=None, metavar="I,J,...", help="These units instead (0-based).")
@click.option("--dream", type=click.Path(dir_okay=False), default=None,
              help="Also amplify the layer's patterns in this photo over a few octaves (DeepDream): dream.png.")
@out_option(f"Folder for filters.png and index.html. [default: a new {RUNS_DIR}/BASE-filters-N]")
@replace_output_option
@seed_option()
@json_option
@handle_errors
def filters(run, base, model_dir, weights, image_size, layer, units, unit_ids, dream, out, overwrite, seed, as_json):
    """Pictures that maximise chosen units of a layer (gradient ascent with jitter, blur and decay), of RUN's
    model (a run folder, or `last`) or of a --base backbone."""
    if run is not None and model_dir is not None:
        raise click.UsageError("give the run once: RUN or --model RUN")
    model_dir = run if run is not None else model_dir
    model_dir = chosen_run(model_dir) if model_dir is not None else None
    result = api.filters(base, model_dir, layer=layer, units=units, unit_ids=_unit_list(unit_ids), out=out,
                         overwrite=overwrite, weights=weights, image_size=image_size, dream=dream, seed=seed)
    if as_json:
        click.echo(json.dumps({**result, **({"run": model_dir} if model_dir else {})}, indent=2, ensure_ascii=False))
        return
    ratios = [u["activation"] / u["noise_activation"] for u in result["units"] if u["noise_activation"] > 0]
    median = f"; median {statistics.median(ratios):.1f}x the activation on noise" if ratios else ""
    click.echo(f"{len(result['units'])} units of {result['layer']}{median}; wrote {', '.join(result['files'].values())}")
    if model_dir is not None:
        echo_run(model_dir)


@cli.command()
@click.argument("run_a", type=str)
@click.argument("run_b", type=str)
@click.argument("folder", type=click.Path(path_type=str))
@tta_option
@json_option
@table_options
@handle_errors
def compare(run_a, run_b, folder, tta, as_json):
    """Do RUN_A and RUN_B differ in accuracy on the labelled FOLDER beyond noise? McNemar's exact test and a
    paired bootstrap interval, on the images neither run trained on."""
    run_a, run_b = chosen_run(run_a), chosen_run(run_b)
    result = api.compare(run_a, run_b, folder, tta=tta)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    (a, b), (low, high) = result["accuracy"], result["difference_interval95"]
    click.echo(f"A {a:.1%}, B {b:.1%} on {result['n_images']} images; A - B {result['difference']:+.1%} (95 % "
               f"interval {low:+.1%} to {high:+.1%}); only A right on {result['only_a_right']}, only B on "
               f"{result['only_b_right']}; McNemar p = {result['p_value']:.3g}: {result['verdict']}")
    if result["n_left_out"]:
        click.echo(f"left out {result['n_left_out']} images that trained one of the runs", err=True)
    echo_run(run_a, "run A")
    echo_run(run_b, "run B")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="finetune")
