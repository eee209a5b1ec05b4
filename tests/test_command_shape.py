"""Every command that reads a run takes it the same way (RUN first; `--model RUN` kept where it existed),
and every command that produces a result can print it as one JSON object."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from tests.test_explain import square_images, train_square_run, write_images


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """(run folder, labelled test folder): a small square-colour model, one epoch (the shape is tested, not
    the accuracy)."""
    root = tmp_path_factory.mktemp("shape")
    train_square_run(root / "run", epochs=1)
    images, labels, _ = square_images(6, seed=3)
    write_images(root / "test", images, labels)
    return root / "run", root / "test"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_predict_takes_run_first_or_as_model(square, tmp_path):
    run, test = square
    first = invoke("predict", run, test, "--out", tmp_path / "a.csv")
    older = invoke("predict", test, "--model", run, "--out", tmp_path / "b.csv")
    assert first.exit_code == 0 and older.exit_code == 0, first.output + older.output
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert len(a) == 6 and a.equals(b)
    alone = invoke("predict", run)
    assert alone.exit_code == 2 and "give INPUTS... after RUN" in alone.output


def test_evaluate_takes_run_first_or_as_model(square):
    run, test = square
    first = invoke("evaluate", run, test, "--json")
    older = invoke("evaluate", test, "--model", run, "--json")
    assert first.exit_code == 0 and older.exit_code == 0, first.output + older.output
    a, b = json.loads(first.stdout), json.loads(older.stdout)
    assert a["n_images"] == 6 and a["accuracy"] == b["accuracy"] and a["run"] == b["run"] == str(run.resolve())
    twice = invoke("evaluate", test, test, "--model", run)
    assert twice.exit_code == 2 and "give the run once" in twice.output
    missing = invoke("evaluate", run)
    assert missing.exit_code == 2 and "give FOLDER after RUN" in missing.output


def test_explain_and_attack_print_one_json_object(square, tmp_path):
    run, test = square
    explained = invoke("explain", run, test, "--out", tmp_path / "e", "--json")
    assert explained.exit_code == 0, explained.output
    result = json.loads(explained.stdout)
    assert len(result["images"]) == 6 and result["run"] == str(run.resolve()) and result["method"] == "occlusion"
    attacked = invoke("attack", run, test, "--eps", "0,2", "--method", "fgsm", "--out", tmp_path / "a", "--json")
    assert attacked.exit_code == 0, attacked.output
    result = json.loads(attacked.stdout)
    assert result["n_images"] == 6 and list(result["accuracy"]) == ["fgsm"] and len(result["accuracy"]["fgsm"]) == 2


def test_filters_takes_run_first_or_as_model(shapes, tiny_base, tmp_path):
    run = tmp_path / "run"
    api.train(shapes, str(tiny_base), out=run, image_size=32, strategy="linear")
    first = invoke("filters", run, "--layer", "1", "--units", "1", "--out", tmp_path / "a", "--json")
    older = invoke("filters", "--model", run, "--layer", "1", "--units", "1", "--out", tmp_path / "c", "--json")
    assert first.exit_code == 0 and older.exit_code == 0, first.output + older.output
    a, b = json.loads(first.stdout), json.loads(older.stdout)
    assert a["run"] == str(run.resolve()) and a["units"] == b["units"]
    both = invoke("filters", run, "--model", run, "--layer", "1", "--out", tmp_path / "b")
    assert both.exit_code == 2 and "give the run once" in both.output
    assert not (tmp_path / "b").exists()


def test_json_goes_to_stdout_alone(square, tmp_path):
    """stderr holds the `run:` line and notes; stdout parses as JSON with nothing around it."""
    run, test = square
    result = CliRunner().invoke(cli, ["evaluate", str(run), str(test), "--json"])
    json.load(io.StringIO(result.stdout))
    assert "run:" not in result.stdout


def test_train_json_prints_the_metrics_it_wrote(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--strategy", "linear", "--out", out,
                    "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "metrics.json").read_text())
    assert printed["run_folder"] == str(out)
