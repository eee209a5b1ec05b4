"""Multi-label tables: several labels per image, one sigmoid per label, a threshold per label, and every
command that cannot read such a table or run refusing it in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune_cli import api
from finetune_cli.analysis.multilabel import best_thresholds, cross_fitted, label_sets, multilabel_scores
from finetune_cli.cli import cli
from finetune_cli.config import TABLE, TRAIN, TableConfig
from finetune_cli.data import tables
from finetune_cli.data.scan import scan_folder
from finetune_cli.errors import FolderError
from finetune_cli.runs.run import Run

from .conftest import save_tiny_backbone

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def blobs_table(folder, n: int = 60, seed: int = 0, name: str = "labels.csv", side: int = 14, noise: int = 20):
    """`n` 32 px images, each with one to three coloured squares on grey noise; the table labels each with
    the colours it holds ("blue;red"). Squares of `side` 14 sit in fixed quadrants, smaller ones anywhere
    (a harder set). Returns the table's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(seed), []
    for i in range(n):
        image = (np.full((32, 32, 3), 128) + rng.integers(-noise, noise, (32, 32, 3))).clip(0, 255).astype(np.uint8)
        present = [c for c in COLOURS if rng.random() < 0.5] or [list(COLOURS)[i % 3]]
        if len(present) == 3 and i % 2:
            present = present[:2]  # no label on every image
        for j, colour in enumerate(present):
            y, x = ((j // 2) * 16, (j % 2) * 16) if side == 14 else rng.integers(0, 32 - side, 2)
            image[y:y + side, x:x + side] = COLOURS[colour]
        Image.fromarray(image).save(folder / f"img{i}.png")
        rows.append({"path": f"img{i}.png", "label": ";".join(reversed(present)) + (";" if i % 5 == 0 else "")})
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(table, held-out table, run folder, metrics) of one multi-label run on the tiny backbone."""
    root = tmp_path_factory.mktemp("multilabel")
    table, held_out = blobs_table(root / "train"), blobs_table(root / "test", n=30, seed=5)
    base = save_tiny_backbone(root / "tiny.keras")
    metrics = api.train(table, str(base), out=root / "run", image_size=32, cache_dir=root / "cache",
                        test_dir=held_out)
    return table, held_out, root / "run", metrics


def test_a_cell_with_the_separator_gives_an_image_several_labels(tmp_path):
    table = blobs_table(tmp_path / "data", n=24)
    scan = scan_folder(table, multi_label=True)
    frame = pd.read_csv(table)
    assert scan.multi_label and scan.classes == ("blue", "green", "red")
    first = next(r for r in scan.images if r.path == "img0.png")  # written "red;blue;" (reversed, trailing ;)
    assert first.label == tables.normalised(frame.loc[0, "label"], ";") == ";".join(sorted(
        frame.loc[0, "label"].strip(";").split(";")))
    matrix = scan.label_matrix()
    assert matrix.shape == (24, 3) and set(np.unique(matrix)) <= {0.0, 1.0}
    for row, record in zip(matrix, scan.images):
        assert {scan.classes[j] for j in np.flatnonzero(row)} == set(record.label.split(";"))
    assert tables.normalised(" outdoor ; cat;;cat ", ";") == "cat;outdoor"


def test_single_label_commands_refuse_a_multi_label_table_in_one_line(tmp_path):
    table = blobs_table(tmp_path / "data", n=24)
    with pytest.raises(FolderError, match="is multi-label .*--label-separator ''"):
        scan_folder(table)
    result = invoke("audit", table)
    assert result.exit_code == 2 and "is multi-label" in result.output and "Traceback" not in result.output
    # with no separator, each cell is one label (a class named "blue;red"), as before
    with tables.using(TableConfig(TABLE.path_column, TABLE.label_column, False, TABLE.suffixes, "")):
        plain = scan_folder(table, for_training=False)
    assert not plain.multi_label and any(";" in name for name in plain.classes)


def test_a_label_on_every_image_or_too_rare_is_refused(tmp_path):
    folder = tmp_path / "data"
    blobs_table(folder, n=12)
    rows = pd.read_csv(folder / "labels.csv")
    rows.assign(label=rows["label"].str.rstrip(";") + ";photo").to_csv(folder / "every.csv", index=False)
    with pytest.raises(FolderError, match="label 'photo' is on every usable image"):
        scan_folder(folder / "every.csv", multi_label=True)
    rows.assign(label=["red;rare"] + ["red;blue"] * (len(rows) - 1)).to_csv(folder / "rare.csv", index=False)
    with pytest.raises(FolderError, match="'rare' \\(1\\)"):
        scan_folder(folder / "rare.csv", multi_label=True)


def test_thresholds_maximise_f1_and_cross_fitting_does_not_choose_its_own():
    truth = np.array([[1], [1], [0], [1], [0], [0]], float)
    probs = np.array([[0.9], [0.6], [0.55], [0.4], [0.3], [0.1]])
    # top 4 called positive: 3 hits, F1 6/7; top 2: F1 4/5; top 1: 2/4 -> the cut between 0.4 and 0.3
    assert best_thresholds(truth, probs)[0] == pytest.approx(0.35)
    assert best_thresholds(np.zeros((3, 1)), np.full((3, 1), 0.7))[0] == 0.5  # no positive: 0.5
    folds = [(np.array([0, 1, 2]), np.array([3, 4, 5])), (np.array([3, 4, 5]), np.array([0, 1, 2]))]
    guess = cross_fitted(truth, probs, folds)
    # fold 2's images (3-5) thresholded by fold 1's best cut (between 0.6 and 0.55): 0.4 is called negative
    assert guess[:, 0].tolist() == [True, True, True, False, False, False]


def test_scores_match_their_definitions():
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], float)
    probs = np.array([[0.8, 0.2], [0.7, 0.4], [0.2, 0.9], [0.6, 0.1]])
    scores = multilabel_scores(truth, probs, np.array([0.5, 0.5]), ["a", "b"])
    # a: predicted {0, 1, 3}, 2 hits: precision 2/3, recall 1; b: predicted {2}: precision 1, recall 1/2
    assert scores["per_label"]["a"]["precision"] == pytest.approx(2 / 3)
    assert scores["per_label"]["b"]["recall"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 3 hits, 1 false alarm, 1 miss
    assert scores["subset_accuracy"] == pytest.approx(0.5)  # images 0 and 2 have their exact set
    assert scores["per_label"]["a"]["average_precision"] == pytest.approx(1.0)
    assert label_sets(probs, np.array([0.5, 0.5]), ["a", "b"], ";") == ["a", "a", "b", "a"]


def test_train_fits_one_sigmoid_per_label_and_writes_the_run(trained):
    table, _, run_dir, metrics = trained
    assert metrics["task"] == "multi-label" and metrics["strategy"] == "linear"
    assert metrics["classes"] == ["blue", "green", "red"]
    assert metrics["val_mean_average_precision"] > 0.9 and metrics["val_macro_f1"] > 0.8
    assert metrics["validation"]["method"] == "out-of-fold" and metrics["validation"]["n_images"] == 60
    assert set(metrics["thresholds"]) == set(metrics["classes"])
    assert all(0 < t < 1 for t in metrics["thresholds"].values())
    assert sum(row["chosen"] for row in metrics["candidates"]) == 1
    assert metrics["test"]["n_images"] == 30 and metrics["test"]["mean_average_precision"] > 0.9
    frame = pd.read_csv(run_dir / "predictions_val.csv", keep_default_na=False)
    assert list(frame.columns) == ["path", "true", "predicted", "prob_blue", "prob_green", "prob_red"]
    scan = scan_folder(table, multi_label=True)
    assert dict(zip(frame["path"], frame["true"])) == {str(p): r.label for p, r in zip(scan.paths(), scan.images)}
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["task"] == "multi-label" and plan["candidates"] == metrics["candidates"]
    run = Run.load(run_dir, multi_label=True)
    assert run.multi_label and run.thresholds == tuple(metrics["thresholds"][c] for c in run.classes)
    assert run.model.layers[-1].get_config()["activation"] == "sigmoid"


def test_predict_writes_label_sets_by_each_labels_threshold(trained):
    table, held_out, run_dir, metrics = trained
    images = [str(held_out.parent / f"img{i}.png") for i in range(6)]
    frame, skipped = api.predict(images, str(run_dir))
    assert not skipped and list(frame.columns) == ["path", "labels", "n_labels", "p_blue", "p_green", "p_red", "tta"]
    for _, row in frame.iterrows():
        chosen = [c for c in metrics["classes"] if row[f"p_{c}"] >= metrics["thresholds"][c]]
        assert row["labels"] == ";".join(chosen) and row["n_labels"] == len(chosen)
    assert not np.allclose(frame[["p_blue", "p_green", "p_red"]].sum(axis=1), 1.0)  # independent, not a softmax
    truth = scan_folder(held_out, multi_label=True)
    right = {str(p): r.label for p, r in zip(truth.paths(), truth.images)}
    assert np.mean([right[p] == s for p, s in zip(frame["path"], frame["labels"])]) >= 0.5


def test_evaluate_scores_label_sets_and_flags_training_images(trained):
    table, held_out, run_dir, metrics = trained
    result = api.evaluate(held_out, str(run_dir))
    assert result["task"] == "multi-label" and result["n_images"] == 30 and "n_training_images" not in result
    assert result["mean_average_precision"] == pytest.approx(metrics["test"]["mean_average_precision"], abs=1e-4)
    own = api.evaluate(table, str(run_dir))
    assert own["n_training_images"] == 60
    out = invoke("evaluate", run_dir, held_out)
    assert out.exit_code == 0 and "mAP" in out.output and "threshold" in out.output


def test_what_multi_label_runs_cannot_do_is_refused_in_one_line(trained, tmp_path):
    table, held_out, run_dir, _ = trained
    for args, expected in [(("report", run_dir), "is a multi-label run"),
                           (("diagnose", run_dir), "is a multi-label run"),
                           (("explain", run_dir, held_out.parent / "img0.png"), "is a multi-label run"),
                           (("export", run_dir, "--format", "keras", "--out", tmp_path / "e"), "is a multi-label run"),
                           (("predict", held_out.parent / "img0.png", "--model", run_dir, "--coverage", "0.9"),
                            "this run is multi-label"),
                           (("evaluate", run_dir, held_out, "--html", tmp_path / "p.html"), "this run is multi-label"),
                           (("train", table, "--base", tmp_path / "none.keras", "--strategy", "full", "--out",
                             tmp_path / "r"), None)]:
        result = invoke(*args)
        assert result.exit_code != 0 and "Traceback" not in result.output, args
        if expected:
            assert expected in result.output, args
        assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1, args
    assert not (tmp_path / "e").exists() and not (tmp_path / "p.html").exists()


WARM = """name = "warm"
strategy = "full"
description = "every stage at the head's rate"
unfreeze_stages = 0
top_stages = 1
learning_rate = 3e-3
top_lr_factor = 1.0
intermediate_lr_factor = 1.0
optimizer = "adam"
epochs = 12
batch_size = 16
augmentation = "light"
patience = 4
"""


def one_stage_backbone(path):
    """A real one-stage conv backbone (B, S, S, 3) -> (B, S/2, S/2, 8): its final stage is the only one, so
    the fine-tuned model starts from the heads it must beat."""
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="s1_conv")(
        keras.layers.Rescaling(1 / 255.0)(inputs))
    keras.Model(inputs, x, name="one").save(path)
    return path


def test_fine_tuning_that_loses_to_the_heads_puts_the_backbone_back(tmp_path):
    table = blobs_table(tmp_path / "hard", n=120, seed=1, side=4, noise=70)
    held_out = blobs_table(tmp_path / "test", n=30, seed=2, side=4, noise=70)
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    runs = {s: api.train(table, str(base), out=tmp_path / s, image_size=32, cache_dir=tmp_path / "cache",
                         strategy=s, test_dir=held_out) for s in ("linear", "full")}
    record = runs["full"]["fine_tuning"]
    assert "fine_tuning" not in runs["linear"] and record["kept"] == "linear-heads"
    assert record["n_val"] == 24 and record["n_train"] == 96 and record["fine_tuned_val_map"] <= record["linear_val_map"]
    plan = json.loads((tmp_path / "full" / "plan.json").read_text())["plan"]
    assert runs["full"]["strategy"] == "linear" and "the linear heads were kept" in plan["reason"]
    assert any(note.startswith("full fine-tuning kept the linear heads") for note in runs["full"]["notes"])
    # the kept model shares the backbone fine-tuning changed: its weights were put back, so it predicts as
    # the linear run's model does, and its scores are the out-of-fold ones of every image
    images = [str(p) for p in scan_folder(held_out, multi_label=True).paths()]
    probs = [api.predict(images, str(tmp_path / s))[0][["p_blue", "p_green", "p_red"]].to_numpy() for s in runs]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)
    assert runs["full"]["test"] == runs["linear"]["test"] and runs["full"]["validation"]["method"] == "out-of-fold"
    # with the keep rule off (and so the pilot), the fine-tuned model is kept whatever its score
    unchecked = api.train(table, str(base), out=tmp_path / "unchecked", image_size=32, cache_dir=tmp_path / "cache",
                          strategy="full", settings=dataclasses.replace(TRAIN, keep_better=False))
    assert unchecked["fine_tuning"]["kept"] == "fine-tuned" and unchecked["strategy"] == "full"
    assert unchecked["fine_tuning"]["epochs_run"] > 2 and any("the keep rule is off" in n for n in unchecked["notes"])


def test_fine_tuning_that_beats_the_heads_is_kept_and_scored_on_its_hold_out(tmp_path):
    table = blobs_table(tmp_path / "hard", n=200, seed=4, side=4, noise=70)
    base, recipe = one_stage_backbone(tmp_path / "one.keras"), tmp_path / "warm.toml"
    recipe.write_text(WARM)
    result = invoke("train", table, "--base", base, "--image-size", 32, "--recipe", recipe, "--out", tmp_path / "run",
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "binary cross-entropy" in result.output and "val_mAP" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["fine_tuning"]
    assert record["kept"] == "fine-tuned" and record["fine_tuned_val_map"] > record["linear_val_map"]
    assert metrics["strategy"] == "full" and metrics["n_train"] == record["n_train"] == 160 and metrics["n_val"] == 40
    assert metrics["val_mean_average_precision"] == pytest.approx(record["fine_tuned_val_map"], abs=1e-4)
    # the scores and thresholds are the hold-out's, and no hold-out image trained the model
    frame = pd.read_csv(tmp_path / "run" / "predictions_val.csv", keep_default_na=False)
    trained_on = set((tmp_path / "run" / "trained_on.txt").read_text().split())
    scan = scan_folder(table, multi_label=True)
    digest = {str(p): r.digest for p, r in zip(scan.paths(), scan.images)}
    assert len(frame) == 40 and len(trained_on) == 160 and not {digest[p] for p in frame["path"]} & trained_on
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {"loss", "val_loss", "val_map"} <= set(history.columns)
    assert history["val_map"].max() == pytest.approx(record["fine_tuned_val_map"], abs=1e-4)
    again = api.evaluate(table, str(tmp_path / "run"))
    assert again["n_training_images"] == 160  # evaluate flags the 160 by content, not the 40 hold-out images


def test_a_single_label_run_refuses_a_multi_label_table(tmp_path, tiny_base, shapes):
    api.train(shapes, str(tiny_base), out=tmp_path / "single", image_size=32, similarity="similar")
    table = blobs_table(tmp_path / "data", n=24)
    result = invoke("evaluate", tmp_path / "single", table)
    assert result.exit_code == 2 and "is multi-label" in result.output


def test_inspect_counts_per_label_and_features_keep_each_images_set(tmp_path, tiny_base):
    table = blobs_table(tmp_path / "data", n=24)
    scan = scan_folder(table, multi_label=True)
    result = invoke("inspect", table, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    counts = {row["name"]: row["count"] for row in info["classes"]}
    assert info["multi_label"] and counts == dict(zip(scan.classes, scan.label_matrix().sum(0).astype(int).tolist()))
    assert sum(counts.values()) > len(scan.images)  # images with two or three labels count under each
    out = tmp_path / "features.csv"
    result = invoke("extract-features", table, "--base", tiny_base, "--image-size", 32, "--out", out)
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out, keep_default_na=False)
    assert dict(zip(written["path"], written["label"])) == {r.path: r.label for r in scan.images}


def test_a_val_dir_table_validates_the_heads_and_chooses_the_thresholds(trained, tmp_path):
    table, held_out, _, _ = trained
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    metrics = api.train(table, str(base), out=tmp_path / "run", image_size=32, val_dir=held_out)
    assert metrics["validation"]["method"] == "held-out" and metrics["validation"]["n_images"] == 30
    assert metrics["n_val"] == 30 and metrics["val_mean_average_precision"] > 0.9
    assert any("--val-dir images' probabilities" in note for note in metrics["notes"])
    frame = pd.read_csv(tmp_path / "run" / "predictions_val.csv", keep_default_na=False)
    assert sorted(frame["path"]) == sorted(str(p) for p in scan_folder(held_out, multi_label=True).paths())
    # the thresholds were chosen on these images: their F1 at those thresholds is the F1 reported
    probs = frame[[f"prob_{c}" for c in metrics["classes"]]].to_numpy()
    truth = np.array([[c in s.split(";") for c in metrics["classes"]] for s in frame["true"]], float)
    again = multilabel_scores(truth, probs, np.array([metrics["thresholds"][c] for c in metrics["classes"]]),
                              metrics["classes"])
    assert again["macro_f1"] == pytest.approx(metrics["val_macro_f1"], abs=0.02)
