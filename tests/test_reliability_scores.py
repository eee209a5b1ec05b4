"""Scores that cannot be silently false: content-aware splits, overlapping folders, the tool's own output.

Each test reproduces one failure of the reliability round (issue items 1-4) with real files and a real
tiny Keras backbone, and fails on the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TrainConfig
from finetune_cli.data.profile import profile_scan
from finetune_cli.data.scan import scan_folder
from finetune_cli.data.splits import content_groups, grouped_folds, grouped_split
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import FolderError, OutputError
from finetune_cli.tasks.tune.space import cv_folds
from tests.conftest import Recorder


def _digest(path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _copy_every_photo(root) -> None:
    """x.jpg -> x_copy.jpg beside it, for every photo: each content now sits in the folder twice."""
    for path in sorted(root.rglob("*.jpg")):
        shutil.copyfile(path, path.with_name(path.stem + "_copy.jpg"))


def _ants_bees(path, per_class: int):
    """A two-class folder of real JPEGs named ants/ and bees/ (circles and crosses inside)."""
    data = make_shapes_folder(path, classes=("circle", "cross"), per_class=per_class, size=32, seed=3)
    (data / "circle").rename(data / "ants")
    (data / "cross").rename(data / "bees")
    return data


def test_item1_copies_never_straddle_the_split(tmp_path, tiny_base):
    data = make_shapes_folder(tmp_path / "small", classes=("circle", "cross"), per_class=15, size=32, seed=3)
    _copy_every_photo(data)
    reporter = Recorder()
    out = tmp_path / "run"
    api.train(data, str(tiny_base), out=out, image_size=32, similarity="similar", reporter=reporter)
    val = pd.read_csv(out / "predictions_val.csv", keep_default_na=False)["path"].tolist()
    val_digests = {_digest(data / p) for p in val}
    train_digests = {_digest(p) for p in data.rglob("*.jpg") if str(p) not in val}
    assert val and not val_digests & train_digests  # no validation image has a twin in training
    assert any("30 duplicate file(s)" in n and "one side of the split" in n for n in reporter.notes)


def test_item1_grouped_split_and_folds_keep_groups_whole():
    rng = np.random.default_rng(0)
    digests = [f"d{int(i)}" for i in rng.integers(0, 40, 200)]  # 200 files, at most 40 distinct contents
    labels = np.array([int(d[1:]) % 3 for d in digests])
    groups = content_groups(digests)
    split = grouped_split(labels, groups, 0.2, seed=1)
    assert not set(groups[split.train]) & set(groups[split.val])
    assert split.n_duplicates == 200 - len(set(digests))
    for train, test in grouped_folds(labels, groups, 3, seed=0, repeats=2):
        assert not set(groups[train]) & set(groups[test])
    folds = cv_folds(labels, 5, 10, 3, 0, groups)
    assert all(not set(groups[a]) & set(groups[b]) for a, b in folds.splits)


def test_item1_without_duplicates_the_split_is_unchanged():
    from sklearn.model_selection import train_test_split

    labels = np.repeat([0, 1, 2], [30, 12, 9])
    groups = np.arange(len(labels))
    split = grouped_split(labels, groups, 0.2, seed=4)
    _, expected = train_test_split(np.arange(len(labels)), test_size=10, stratify=labels, random_state=4)
    assert split.val.tolist() == sorted(expected) and split.n_duplicates == 0


def test_item1_copies_do_not_make_a_folder_large(tmp_path):
    data = make_shapes_folder(tmp_path / "copies", classes=("circle", "cross"), per_class=2, size=16, seed=2)
    for path in sorted(data.rglob("*.jpg")):
        for i in range(60):
            shutil.copyfile(path, path.with_name(f"{path.stem}_{i}.jpg"))
    profile = profile_scan(scan_folder(data))
    assert profile.class_counts == {"circle": 122, "cross": 122}  # above the 100-per-class border...
    assert profile.size_category == "small"  # ...but two distinct photos per class are a small set


def test_item2_val_dir_that_is_the_training_folder_is_refused(tmp_path, tiny_base):
    data = make_shapes_folder(tmp_path / "small", classes=("circle", "cross"), per_class=8, size=32, seed=3)
    for option in ("val_dir", "test_dir"):
        with pytest.raises(FolderError, match="is the training folder: 16 of its 16 images"):
            api.train(data, str(tiny_base), out=tmp_path / f"run-{option}", image_size=32, **{option: data})
        assert not (tmp_path / f"run-{option}" / "model.keras").exists()
    result = CliRunner().invoke(cli, ["train", str(data), "--base", str(tiny_base), "--image-size", "32",
                                      "--test-dir", str(data), "--out", str(tmp_path / "cli-run")])
    assert result.exit_code == 2 and "--test-dir" in result.output and "Traceback" not in result.output


def test_item2_partial_overlap_is_refused_or_dropped_with_a_count(tmp_path, tiny_base):
    data = make_shapes_folder(tmp_path / "small", classes=("circle", "cross"), per_class=8, size=32, seed=3)
    test = make_shapes_folder(tmp_path / "test", classes=("circle", "cross"), per_class=4, size=32, seed=11)
    shutil.copyfile(data / "circle" / "circle_000.jpg", test / "circle" / "renamed.jpg")
    shutil.copyfile(data / "cross" / "cross_001.jpg", test / "cross" / "also renamed.jpg")
    with pytest.raises(FolderError, match="overlaps the training images: 2 of its 10 images"):
        api.train(data, str(tiny_base), out=tmp_path / "refused", image_size=32, test_dir=test)
    reporter = Recorder()
    settings = TrainConfig(drop_overlap=True)
    metrics = api.train(data, str(tiny_base), out=tmp_path / "dropped", image_size=32, test_dir=test,
                        settings=settings, reporter=reporter)
    assert metrics["test"]["n_images"] == 8
    assert any("left out 2 of 10" in n for n in reporter.notes)


def test_item3_runs_inside_the_data_folder_never_become_a_class(tmp_path, tiny_base, monkeypatch):
    data = _ants_bees(tmp_path / "photos", 8)
    monkeypatch.chdir(data)
    runner = CliRunner()
    args = ["train", ".", "--base", str(tiny_base), "--image-size", "32", "--similarity", "similar"]
    for _ in range(2):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    runs = sorted(p for p in (data / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2
    assert json.loads((runs[-1] / "labels.json").read_text()) == ["ants", "bees"]
    assert any(w.startswith("skipped 'runs") for w in scan_folder(data).warnings)


def test_item3_an_old_run_folder_inside_a_class_is_skipped(tmp_path, tiny_base):
    data = _ants_bees(tmp_path / "photos", 4)
    api.train(data, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar")
    (tmp_path / "run" / ".finetune-output").unlink(missing_ok=True)  # as a run of an older version left it
    shutil.copytree(tmp_path / "run", data / "ants" / "old-run")
    scan = scan_folder(data)
    assert len(scan.images) == 8 and any("ants/old-run" in w for w in scan.warnings)


def test_item3_out_inside_the_data_folder_is_refused(tmp_path, tiny_base):
    data = _ants_bees(tmp_path / "photos", 4)
    with pytest.raises(OutputError, match="inside the data folder"):
        api.train(data, str(tiny_base), out=data / "myrun", image_size=32)
    assert not (data / "myrun").exists()
    result = CliRunner().invoke(cli, ["tune", str(data), "--base", str(tiny_base), "--image-size", "32",
                                      "--out", str(data / "search")])
    assert result.exit_code == 2 and "inside the data folder" in result.output


def test_item4_a_small_class_is_validated_and_a_missing_one_is_not_calibrated(tmp_path, tiny_base):
    data = _ants_bees(tmp_path / "ab", 15)
    for path in sorted((data / "bees").iterdir())[2:]:
        path.unlink()
    out = tmp_path / "run"
    api.train(data, str(tiny_base), out=out, image_size=32, similarity="similar")
    val = pd.read_csv(out / "predictions_val.csv", keep_default_na=False)
    assert set(val["true"]) == {"ants", "bees"}  # 15 ants and 2 bees: one bee validates

    # two copies of one bee: a class with one distinct image cannot be validated, and calibration says so
    first, second = sorted((data / "bees").iterdir())
    second.unlink()
    shutil.copyfile(first, data / "bees" / "copy.jpg")
    reporter = Recorder()
    metrics = api.train(data, str(tiny_base), out=tmp_path / "run2", image_size=32, similarity="similar",
                        reporter=reporter)
    assert any("class 'bees' has only one distinct image" in n for n in reporter.notes)
    assert metrics["calibration"]["applied"] is False
    assert "no image of 'bees'" in metrics["calibration"]["reason"]


def test_evaluate_says_when_its_images_trained_the_model(tmp_path, tiny_base):
    """A linear run trains on every image; `evaluate` on its own folder must not pass that off as held out."""
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=8, size=32, seed=1)
    out = tmp_path / "run"
    api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar")
    own = api.evaluate(shapes, out)
    assert own["n_training_images"] == 24 and "held_out_accuracy" not in own
    mixed = tmp_path / "mixed"
    shutil.copytree(shapes, mixed)
    fresh = make_shapes_folder(tmp_path / "fresh", per_class=4, size=32, seed=11)
    for path in fresh.rglob("*.jpg"):
        shutil.copy(path, mixed / path.parent.name / f"new_{path.name}")
    partly = api.evaluate(mixed, out)
    assert partly["n_training_images"] == 24 and partly["n_held_out"] == 12
    assert partly["held_out_accuracy"] == api.evaluate(fresh, out)["accuracy"]
    assert api.evaluate(fresh, out)["n_training_images"] == 0
    shown = CliRunner().invoke(cli, ["evaluate", str(mixed), "--model", str(out)])
    assert shown.exit_code == 0 and "24 of these 36 images trained this model" in " ".join(shown.output.split())
    page = tmp_path / "eval.html"
    api.evaluate(shapes, out, html=page)
    assert "24 of these images trained this model" in page.read_text("utf-8")
    (out / "trained_on.txt").unlink()  # a run from an older version: nothing to check against, nothing claimed
    assert "n_training_images" not in api.evaluate(shapes, out)
