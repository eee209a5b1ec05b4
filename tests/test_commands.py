"""The commands as users type them: default output paths, --model last, the rich reporter."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner
from rich.console import Console

from finetune_cli.cli import cli
from finetune_cli.render import RichReporter
from finetune_cli.strategy.decide import decide
from finetune_cli.strategy.recipes import load
from finetune_cli.strategy.similarity import forced


def unwrapped(text: str) -> str:
    """Terminal output without the line breaks rich adds at 80 columns."""
    return text.replace("\n", "")


def test_train_without_out_makes_a_new_numbered_run_and_predict_finds_the_last(shapes, tiny_base, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "runs" / "shapes-1" / "model.keras").is_file()
    assert unwrapped(first.output).count("runs/shapes-1") >= 2  # printed at the start and in the summary
    (tmp_path / "runs" / "shapes-2").mkdir()  # taken by someone else: never reused
    second = runner.invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert (tmp_path / "runs" / "shapes-3" / "model.keras").is_file()
    assert json.loads((tmp_path / "runs" / "shapes-3" / "metrics.json").read_text())["run_folder"].endswith("shapes-3")
    predicted = runner.invoke(cli, ["predict", str(shapes / "circle"), "--model", "last", "--out", "p.csv"])
    assert predicted.exit_code == 0, predicted.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 8


def test_model_last_without_runs_is_a_clear_error(tmp_path, monkeypatch, shapes):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--model", "last"])
    assert result.exit_code == 2 and "no finished run" in result.output


def test_extract_features_without_out_writes_a_numbered_table(shapes, tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["extract-features", str(shapes), "--base", str(tiny_base), "--image-size", "32"]
    for n in (1, 2):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert len(pd.read_parquet(tmp_path / "runs" / f"shapes-features-{n}.parquet")) == 24


def test_rich_reporter_renders_phases_notes_epochs_and_the_plan():
    buffer = io.StringIO()
    reporter = RichReporter(Console(file=buffer, width=200))
    reporter.on_phase("scanning")
    reporter.on_note("retrying at lr/10")
    reporter.on_epoch({"epoch": 2, "loss": 0.5, "accuracy": 0.75, "val_loss": 0.25, "val_accuracy": 0.9}, 8)
    reporter.on_epoch({"epoch": 1, "loss": 0.01, "val_loss": 0.02, "images": 100, "seconds": 2.0}, 5)
    reporter.on_plan(decide("large", "similar", 5, load("partial")[0]), forced("similar"))
    text = buffer.getvalue()
    assert "- scanning" in text and "note: retrying at lr/10" in text
    assert "epoch 2/8: loss 0.5000 acc 75.0%  val_loss 0.2500 val_acc 90.0%" in text
    assert "epoch 1/5: reconstruction loss 0.01000" in text and "50 images/s" in text
    assert "plan: partial (recipe 'partial')" in text and "stages trained: [5]" in text


def test_pretrain_without_out_writes_a_numbered_encoder(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--unlabeled", str(shapes), "--image-size", "16", "--code-size", "8", "--epochs", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "shapes-encoder-1.keras").is_file()
    assert unwrapped(result.output).count("runs/shapes-encoder-1.keras") >= 2  # at the start and the end


def test_output_folder_of_the_gallery_commands(tmp_path, monkeypatch):
    """explain, attack, audit, patches, filters: one rule for --out (files.output_folder)."""
    from finetune_cli import files
    from finetune_cli.errors import OutputError

    def output_folder(out, stem):
        return files.output_folder(out, stem, command=stem.rsplit("-", 1)[-1]).path

    monkeypatch.chdir(tmp_path)
    assert output_folder(None, "x-explain") == (tmp_path / "runs" / "x-explain-1").absolute()
    assert output_folder(None, "x-explain").name == "x-explain-2"  # each default call: a new folder
    assert output_folder(tmp_path / "mine", "ignored") == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        output_folder(tmp_path / "file", "s")
    with pytest.raises(OutputError, match="does not exist"):
        output_folder(tmp_path / "typo" / "out", "s")
    assert not (tmp_path / "typo").exists()
