"""Rendering library results for people: rich tables and progress bars.

The library returns data; only the CLI calls into this module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from finetune_cli.progress import Reporter
from finetune_cli.train.lr_sweep import notes


def profile_tables(profile, console: Console, max_rows: int = 20) -> None:
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
    """Print a list of dicts as a table with the given columns; the first (a name) never wraps."""
    table = Table(title=title or None)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0)
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


class RichReporter(Reporter):
    """The `Reporter` of the CLI: phases, the plan, notes and epochs on `console`.

    Args:
        progress: callback(done, total) drawing the current step's bar (see
            `progress_bar`), or None.
    """

    def __init__(self, console: Console, progress=None):
        self.console, self.progress = console, progress

    def on_progress(self, done: int, total: int) -> None:
        if self.progress:
            self.progress(done, total)

    def on_phase(self, name: str) -> None:
        self.console.print(f"[dim]-[/dim] {name}", highlight=False)

    def on_note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/yellow] {text}", highlight=False)

    def on_plan(self, plan, similarity) -> None:
        plan_panel(self.console, plan, similarity)

    def on_epoch(self, logs: dict, epochs: int) -> None:
        """One line per epoch: a classifier's loss and accuracy, a distilled student's distillation loss and
        agreement with the teachers (`agreement` in its logs), or an autoencoder's reconstruction loss."""
        head = f"  epoch {logs['epoch']}/{epochs}: "
        if "accuracy" in logs:
            line = (f"loss {logs['loss']:.4f} acc {logs['accuracy']:.1%}  val_loss {logs['val_loss']:.4f} "
                    f"val_acc {logs['val_accuracy']:.1%}")
        elif "val_map" in logs:  # multi-label fine-tuning
            line = f"binary cross-entropy {logs['loss']:.4f}  val_loss {logs['val_loss']:.4f} val_mAP {logs['val_map']:.3f}"
        elif "agreement" in logs:
            line = (f"distillation loss {logs['loss']:.4f} agreement with the teachers {logs['agreement']:.1%}  "
                    f"val_loss {logs['val_loss']:.4f} val_acc {logs['val_accuracy']:.1%}")
        else:
            line = (f"reconstruction loss {logs['loss']:.5f}  held-out {logs['val_loss']:.5f}  "
                    f"({logs['images'] / max(logs['seconds'], 1e-9):,.0f} images/s)")
        self.console.print(head + line, highlight=False)


def plan_panel(console: Console, plan, similarity) -> None:
    """The decision and its evidence, in words."""
    evidence = ", ".join(f"stage {k}: {v:.0%}" for k, v in similarity.stage_accuracy.items())
    lines = [
        f"[bold]data[/bold]: {plan.size_category}; [bold]similarity[/bold]: {similarity.verdict} ({similarity.reason})",
    ]
    if evidence:
        lines.append(f"  linear-probe accuracy by stage on {similarity.n_sample} images: {evidence}")
    if similarity.head_confidence is not None:
        lines.append(f"  ImageNet head mean top-1 probability: {similarity.head_confidence:.0%}")
    lines.append(f"[bold]plan[/bold]: {plan.strategy} (recipe '{plan.recipe}'): {plan.reason}")
    if plan.train_stages:
        rates = plan.learning_rates
        lines.append(f"  stages trained: {list(plan.train_stages)}; learning rates head {rates['head']:.2g}, "
                     f"top {rates['top']:.2g}, intermediate {rates['intermediate']:.2g}; cached views per image "
                     f"{plan.feature_views} (when lower stages stay frozen), else on-line augmentation {plan.augmentation}")
    else:
        lines.append(f"  features: {plan.feature_stage} stage; augmented views per image: {plan.feature_views}")
    lines += [f"[bold]suggestion[/bold]: {s}" for s in plan.suggestions]
    for line in lines:
        console.print(line, highlight=False)


def interval(span) -> str:
    """" (95 % interval 81.2-93.4 %)" of a [low, high] pair of shares; "" without one."""
    return f" (95 % interval {span[0]:.1%}-{span[1]:.1%})" if span else ""


def coverage_promise(facts: dict) -> str:
    """What prediction sets promise, from `analysis.conformal.calibrate`'s facts: the target, on average,
    and the 90 % spread of one calibration of its size."""
    low, high = facts["coverage_spread90"]
    return (f"calibrated on the run's {facts['n_calibration']} validation images: on average the sets hold the "
            f"true class {facts['coverage_target']:.0%} of the time; with {facts['n_calibration']} calibration "
            f"images one run's sets hold it {low:.1%}-{high:.1%} of the time (90 % of calibrations)")


def multilabel_scores_line(scores: dict, prefix: str = "") -> str:
    """One line of a multi-label score dict (`analysis.multilabel.multilabel_scores`, keys maybe prefixed)."""
    get = lambda key: scores[prefix + key]
    return (f"mAP [bold]{get('mean_average_precision'):.3f}[/bold], macro-F1 {get('macro_f1'):.3f}, micro-F1 "
            f"{get('micro_f1'):.3f}, exact label set {get('subset_accuracy'):.1%}")


def multilabel_table(console: Console, per_label: dict) -> None:
    """Per-label precision, recall, F1, support, average precision and threshold."""
    rows = [{"label": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}}
            for name, row in per_label.items()]
    rows_table(console, rows, ["label", "precision", "recall", "f1", "support", "average_precision", "threshold"])


def multilabel_summary(console: Console, metrics: dict, out) -> None:
    """The end of a multi-label training run: its out-of-fold (or held-out) scores, per label, notes."""
    method = metrics["validation"]["method"]
    model = "fine-tuned" if metrics.get("fine_tuning", {}).get("kept") == "fine-tuned" else "linear heads"
    console.print(f"[bold green]done[/bold green]: multi-label, {len(metrics['classes'])} labels, {model} on "
                  f"{metrics['n_train']} images; {method} {multilabel_scores_line(metrics, 'val_')} on "
                  f"{metrics['validation']['n_images']} in {metrics['timings_s']['total']:.1f} s", highlight=False)
    if "test" in metrics:
        console.print(f"test {multilabel_scores_line(metrics['test'])} on {metrics['test']['n_images']} images",
                      highlight=False)
    multilabel_table(console, metrics["validation"]["per_label"])
    for note in metrics["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"run folder: {out} (model.keras, plan.json, metrics.json, predictions_val.csv)", highlight=False)


def metrics_summary(console: Console, metrics: dict, out) -> None:
    """The end of a training run: accuracy, where things are, notes."""
    if metrics.get("task") == "multi-label":
        return multilabel_summary(console, metrics, out)
    console.print(
        f"[bold green]done[/bold green]: {metrics['strategy']}"
        f"{' (kept the linear head: fine-tuning did not beat it)' if metrics.get('kept') == 'linear-head' else ''}"
        f" on {metrics['n_train']} images, "
        f"{'out-of-fold' if metrics.get('validation', {}).get('method') == 'out-of-fold' else 'validation'} "
        f"accuracy [bold]{metrics['val_accuracy']:.1%}[/bold]{interval(metrics.get('val_accuracy_interval95'))} "
        f"on {metrics['n_val']} in {metrics['timings_s']['total']:.1f} s", highlight=False)
    if "test" in metrics:
        console.print(f"test accuracy [bold]{metrics['test_accuracy']:.1%}[/bold]"
                      f"{interval(metrics['test'].get('accuracy_interval95'))} on {metrics['test']['n_images']} images",
                      highlight=False)
    calibration = metrics.get("calibration")
    if calibration and calibration["applied"]:
        console.print(f"calibrated: temperature {calibration['temperature']:.3g} on {calibration['n_val']} validation "
                      f"images, ECE {calibration['ece_before']:.1%} -> {calibration['ece_after']:.1%}, NLL "
                      f"{calibration['nll_before']:.3f} -> {calibration['nll_after']:.3f}", highlight=False)
    for note in metrics["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    plots = "curves.png, confusion.png" + (", reliability.png" if calibration else "")
    console.print(f"run folder: {out} (model.keras, plan.json, metrics.json, {plots})", highlight=False)


def lr_summary(console: Console, finding) -> None:
    """The end of `lr-find`: the sweep, the suggestions (valley is what `train --lr auto` uses), where it is."""
    summary, *warnings = notes(finding)
    console.print(f"[bold green]done[/bold green]: {summary.removeprefix('lr-find: ')} ({finding.strategy} plan, "
                  f"recipe '{finding.recipe}')",
                  highlight=False)
    s = finding.suggestions
    table = Table()
    for column in ("suggestion", "head lr", ""):
        table.add_column(column)
    table.add_row("valley", f"{s.valley:.2e}", "`train --lr auto` uses this")
    table.add_row("steepest", f"{s.steepest:.2e}", "fastest fall of the smoothed loss")
    table.add_row("minimum/10", f"{s.minimum:.2e}", "a tenth of the rate with the lowest loss")
    console.print(table)
    for line in warnings:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)
    console.print(f"wrote {finding.folder}: lr.csv, lr.png, lr.json", highlight=False)


def diagnosis(console: Console, result: dict) -> None:
    """`finetune diagnose`: the verdict, the evidence and the next step (reasons hold [..] lists: no markup)."""
    colour = {"healthy": "green", "linear": "cyan"}.get(result["verdict"], "yellow")
    console.print(f"[bold {colour}]{result['verdict']}[/]  ", end="")
    console.print(result["run"], markup=False, highlight=False)
    console.print("why:  " + result["reason"], markup=False, highlight=False)
    console.print("next: " + result["next_step"], markup=False, highlight=False)


def extraction_summary(table, scan, out) -> None:
    """One line on stdout: what `extract-features` wrote, computed or cached, skipped; its notes on stderr."""
    import click

    for note in getattr(table, "notes", ()):
        click.echo(f"note: {note}", err=True)
    skipped = len(scan.skipped) + len(table.skipped)
    cached = len(table.records) - table.computed
    click.echo(
        f"wrote {out}: {len(table.records)} images x {table.features.shape[1]} features "
        f"from layer '{table.layer}' ({table.computed} computed, {cached} from cache"
        + (f", {skipped} files skipped: see `finetune inspect`" if skipped else "") + ")"
    )


def pretrain_summary(console: Console, summary: dict, out) -> None:
    """The end of a pretraining run: how much denoising improved, where the encoder is."""
    start = f" from {summary['init_from']} stage {summary['init_stage']}" if "init_from" in summary else ""
    console.print(
        f"[bold green]done[/bold green]: {summary['arch']} encoder{start}, {summary['epochs_run']} epochs on "
        f"{summary['n_train']} images ({summary['train_images_per_s']:,.0f} images/s); held-out loss "
        f"[bold]{summary['best_val_loss']:.5f}[/bold] vs {summary['identity_val_loss']:.5f} for the noisy "
        f"input itself, in {summary['seconds']:.1f} s", highlight=False)
    if summary["best_val_loss"] >= summary["identity_val_loss"]:
        console.print("[yellow]note:[/yellow] the reconstructions are still worse than the noisy inputs themselves: "
                      "the encoder has learned little; more unlabeled images or more --epochs would help", highlight=False)
    console.print(f"encoder: {out} (output {tuple(summary['encoder_output'])}); use it as --base {out}", highlight=False)


def tune_summary(console: Console, summary: dict) -> None:
    """The end of `tune`: the leaderboard, the best trial, the honest estimate (labelled), warnings, files."""
    if summary.get("kind") == "fine-tuning":
        finetune_leaderboard(console, summary)
    else:
        linear_leaderboard(console, summary)
    _tune_ending(console, summary)


def finetune_leaderboard(console: Console, summary: dict) -> None:
    """A fine-tuning search's trials (the last rung first) and its best configuration."""
    rungs = ", ".join(f"{r['candidates']} x {r['epochs']} ep" for r in summary["rungs"])
    table = Table(title=f"fine-tuning {summary['method']} search ({rungs}): best of {summary['trials']['total']} "
                        f"trials ({summary['trials']['new']} new); scored on {summary['n_trial_val']} validation "
                        f"images of the {summary['n_searched']} searched")
    for column in ("#", "trial", "epochs", "lr", "top x", "dropout", "l2", "unfreeze", "best ep", "val loss",
                   "val acc", "computed", "seconds"):
        table.add_column(column, justify="right")
    for rank, row in enumerate(summary["leaderboard"], 1):
        loss = "diverged" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        table.add_row(str(rank), str(row["trial"]), str(row["epochs"]), f"{row['learning_rate']:.3g}",
                      f"{row['top_lr_factor']:g}", f"{row['dropout']:g}", f"{row['l2']:g}",
                      str(row["unfreeze_stages"]), str(row["best_epoch"]), loss, f"{row['val_accuracy']:.1%}",
                      str(row["computed"]), f"{row['seconds']:.1f}",
                      style="bold" if row["trial"] == summary["best"]["trial"] else None)
    console.print(table)
    best = summary["best"]
    console.print(f"[bold green]best[/bold green]: head lr {best['learning_rate'] * best['rate_factor']:.3g}, top "
                  f"stages x{best['top_lr_factor']:g}, dropout {best['dropout']:g}, l2 {best['l2']:g}, top "
                  f"{best['unfreeze_stages']} stage(s), {best['best_epoch']} epoch(s): validation cross-entropy "
                  f"{best['val_loss']:.4f}, accuracy {best['val_accuracy']:.1%} (chosen on these scores, so "
                  "optimistic)", highlight=False)


def linear_leaderboard(console: Console, summary: dict) -> None:
    """A linear search's trials and its best configuration."""
    table = Table(title=f"{summary['method']} search: best of {summary['trials']['total']} trials "
                        f"({summary['trials']['new']} new); {summary['cv']} CV on {summary['n_searched']} images")
    metric = summary.get("objective", "accuracy")
    name = "macro-F1" if metric == "macro_f1" else "accuracy"
    for column in ("#", "trial", "C", "stage", "pooling", "views", f"cv {name}", "seconds"):
        table.add_column(column, justify="left" if column in ("stage", "pooling") else "right")
    for rank, row in enumerate(summary["leaderboard"], 1):
        table.add_row(str(rank), str(row["trial"]), f"{row['C']:.3g}", str(row["stage"]), row["pooling"],
                      str(row["views"]), f"{row[f'mean_{metric}']:.1%} ± {row[f'std_{metric}']:.1%}",
                      f"{row['seconds']:.2f}", style="bold" if row["trial"] == summary["best"]["trial"] else None)
    console.print(table)
    best = summary["best"]
    console.print(f"[bold green]best[/bold green]: C {best['C']:.3g}, stage {best['stage']}, {best['pooling']} pooling, "
                  f"{best['views']} augmented views: cross-validated {name} {best[f'mean_{metric}']:.1%} "
                  f"± {best[f'std_{metric}']:.1%} (chosen on these scores, so optimistic"
                  + ("; macro-F1 because the classes are imbalanced" if metric == "macro_f1" else "") + ")",
                  highlight=False)


def _tune_ending(console: Console, summary: dict) -> None:
    """The honest estimate (labelled), warnings, notes, and where the files are."""
    estimate = summary["estimate"]
    low, high = estimate["interval95"]
    console.print(f"[bold]honest estimate[/bold] ({estimate['kind']}): accuracy [bold]{estimate['accuracy']:.1%}[/bold] "
                  f"({estimate['n_correct']}/{estimate['n_images']}; 95 % interval {low:.0%}-{high:.0%}); "
                  f"{estimate['label']}", highlight=False)
    for line in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    for line in summary["notes"]:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)
    folder = summary["tune_folder"]
    console.print(f"tune folder: {folder} (trials.csv, best.toml, search.png, summary.json); train with it: "
                  f"{summary['train_command']}", highlight=False)
