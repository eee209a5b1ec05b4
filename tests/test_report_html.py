"""RUN/report.html, `finetune report` and `evaluate --html`, read by a real headless Chromium.

One real `finetune train` (a tiny random conv base on 3 x 8 generated 32 px
shapes, no feature cache) serves the module; tests that move or delete its
files put them back.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from tests.browser import assert_page_reads, requires_browser
from tests.conftest import save_tiny_backbone

FLAGGED = '<figure class="flag">'


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, run folder) of one finished tiny run."""
    root = tmp_path_factory.mktemp("report")
    data = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
    base = save_tiny_backbone(root / "tiny.keras")
    run = root / "run"
    result = CliRunner().invoke(cli, ["train", str(data), "--base", str(base), "--image-size", "32",
                                      "--out", str(run), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert f"report: {run / 'report.html'}" in result.output
    return data, run


def misclassified(run) -> pd.DataFrame:
    frame = pd.read_csv(run / "predictions_val.csv")
    return frame[frame["true"] != frame["predicted"]]


def test_train_records_every_validation_prediction(trained):
    data, run = trained
    frame = pd.read_csv(run / "predictions_val.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    classes = json.loads((run / "labels.json").read_text())
    assert list(frame.columns) == ["path", "true", "predicted", "probability", "p_true",
                                   *(f"prob_{name}" for name in classes)]
    probs = frame[[f"prob_{name}" for name in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and np.allclose(probs.max(1), frame["probability"], atol=1e-6)
    assert len(frame) == metrics["n_val"]
    assert (frame["true"] == frame["predicted"]).mean() == pytest.approx(metrics["val_accuracy"])
    assert all((data / row.true / row.path.rsplit("/", 1)[-1]).is_file() for row in frame.itertuples())
    assert ((frame["probability"] >= frame["p_true"] - 1e-6) & (frame["probability"] <= 1)).all()
    assert [c["count"] for c in metrics["profile"]["classes"]] == [8, 8, 8]


def test_report_is_self_contained_and_shows_every_mistake(trained):
    _, run = trained
    text = (run / "report.html").read_text("utf-8")
    assert "<script" not in text.lower() and not re.search(r"(src|href)=\"https?:", text)
    assert 'src="data:image/' in text and "<link" not in text.lower()
    wrong = misclassified(run)
    assert len(wrong) > 0, "the tiny run must misclassify something for the gallery to be tested"
    assert text.count(FLAGGED) == len(wrong)
    for heading in ("Dataset", "Plan and evidence", "Recipe (recipe.toml)", "Training curves",
                    "Confusion matrix (out-of-fold validation)", "Per-class scores (out-of-fold validation)",
                    "Calibration", "Diagnosis"):  # a linear run: validated out-of-fold on every image
        assert f"<h2>{heading}</h2>" in text, heading


@requires_browser
def test_report_reads_on_desktop_and_phone_widths(trained, tmp_path):
    _, run = trained
    wrong = misclassified(run)
    desktop = assert_page_reads(run / "report.html", least_images=3 + len(wrong), width=1200)
    assert desktop.scroll_width <= 1200
    assert all(row.path.rsplit("/", 1)[-1] in desktop.text for row in wrong.itertuples())
    phone = assert_page_reads(run / "report.html", least_images=3 + len(wrong), width=390,
                              screenshot=tmp_path / "phone.png")
    assert phone.scroll_width <= 390, "the report scrolls sideways on a phone-width screen"
    assert (tmp_path / "phone.png").stat().st_size > 0


@requires_browser
def test_report_command_rebuilds_a_deleted_page_and_says_when_images_are_gone(trained):
    data, run = trained
    before = (run / "report.html").read_text("utf-8")
    (run / "report.html").unlink()
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").read_text("utf-8").count(FLAGGED) == before.count(FLAGGED)
    moved = data.with_name("moved-away")
    data.rename(moved)
    try:
        assert CliRunner().invoke(cli, ["report", str(run)]).exit_code == 0
        text = (run / "report.html").read_text("utf-8")
        seen = assert_page_reads(run / "report.html", least_images=3, width=390)
    finally:
        moved.rename(data)
    assert FLAGGED not in text and "could not be read any more" in seen.text
    assert all(row.path in seen.text for row in misclassified(run).itertuples())
    assert seen.scroll_width <= 390


@requires_browser
def test_report_explain_draws_a_map_over_each_mistake(trained):
    _, run = trained
    wrong = misclassified(run)
    assert len(wrong) > 0, "precondition: the tiny run makes mistakes"
    result = CliRunner().invoke(cli, ["report", str(run), "--explain", "occlusion"])
    assert result.exit_code == 0, result.output
    text = (run / "report.html").read_text("utf-8")
    section = text[text.index("What the model looked at in its mistakes (occlusion)"):]
    assert section.count(FLAGGED) == min(len(wrong), 24)
    assert_page_reads(run / "report.html", least_images=2 * len(wrong))
    bad = CliRunner().invoke(cli, ["report", str(run), "--explain", "saliency"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert CliRunner().invoke(cli, ["report", str(run)]).exit_code == 0  # the plain page again, for the others


def test_report_reads_only_the_run_folder_and_copes_with_an_older_run(trained, tmp_path):
    _, run = trained
    older = tmp_path / "older"
    shutil.copytree(run, older, ignore=shutil.ignore_patterns("model.keras", "predictions_val.csv", "report.html"))
    result = CliRunner().invoke(cli, ["report", str(older)])
    assert result.exit_code == 0, result.output
    text = (older / "report.html").read_text("utf-8")
    assert "predictions_val.csv is missing" in text and FLAGGED not in text
    assert text.count('src="data:image/png') >= 3  # curves, confusion, reliability from the folder's PNGs


@pytest.mark.parametrize("target", ["not-a-run", "missing", "page-is-a-folder"])
def test_report_of_something_else_is_a_one_line_error(trained, tmp_path, target):
    data, run = trained
    path = {"not-a-run": data, "missing": tmp_path / "nowhere", "page-is-a-folder": tmp_path / "copy"}[target]
    if target == "page-is-a-folder":
        shutil.copytree(run, path, ignore=shutil.ignore_patterns("model.keras", "report.html"))
        (path / "report.html").mkdir()
    result = CliRunner().invoke(cli, ["report", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.output


@requires_browser
def test_evaluate_html_shows_the_mistakes_of_any_labelled_folder(trained, tmp_path):
    data, run = trained
    page = tmp_path / "evaluation.html"
    args = ["evaluate", str(data), "--model", str(run), "--html", str(page), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    wrong = scores["n_images"] - sum(scores["confusion"][i][i] for i in range(len(scores["classes"])))
    text = page.read_text("utf-8")
    assert scores["html"] == str(page) and text.count(FLAGGED) == wrong
    assert "<script" not in text.lower() and "Per-class scores (evaluation)" in text
    seen = assert_page_reads(page, least_images=1 + wrong, width=390)
    assert seen.scroll_width <= 390 and f"accuracy {scores['accuracy']:.1%}" in seen.text
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0
