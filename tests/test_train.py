"""Training end to end with a tiny real backbone: run folder, predict/evaluate, NaN retry, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.errors import FolderError, OutputError, TrainingError
from finetune_cli.runtime.keras import import_keras
from tests.conftest import Recorder

RUN_FILES = {"model.keras", "labels.json", "plan.json", "recipe.toml", "history.csv", "metrics.json",
             "curves.png", "confusion.png", "skipped.csv", "trained_on.txt"}


def recipe_file(tmp_path, **fields):
    body = {"strategy": "partial", "unfreeze_stages": 2, "epochs": 3, "batch_size": 8, "patience": 5,
            "augmentation": "light", **fields}
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in body.items())
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def test_linear_run_folder_and_round_trip(shapes, tiny_base, tmp_path):
    (shapes / "square" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32)
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert metrics["strategy"] == "linear" and metrics["size_category"] == "small"
    assert metrics["similarity"] in ("similar", "different") and 0 <= metrics["val_accuracy"] <= 1
    assert json.loads((out / "labels.json").read_text()) == ["circle", "square", "triangle"]
    assert pd.read_csv(out / "skipped.csv")["path"].tolist() == ["square/broken.jpg"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["similarity"]["stage_accuracy"] and plan["plan"]["reason"]

    # the saved model takes raw pixels and agrees with evaluate
    frame, skipped = api.predict([shapes / "circle", shapes / "square" / "square_001.jpg"], out, top_k=2)
    assert len(frame) == 9 and {"path", "predicted", "probability", "top2", "p_circle"} <= set(frame.columns)
    np.testing.assert_allclose(frame[["p_circle", "p_square", "p_triangle"]].sum(axis=1), 1, atol=1e-4)
    result = api.evaluate(shapes, out)
    assert result["n_images"] == 24 and 0 <= result["accuracy"] <= 1
    assert {row["class"] for row in result["per_class"]} == {"circle", "square", "triangle"}
    assert np.sum(result["confusion"]) == 24


def test_linear_head_beats_chance_on_learnable_data(tmp_path, tiny_base):
    from finetune_cli.data.synthetic import make_shapes_folder

    data = make_shapes_folder(tmp_path / "d", classes=("circle", "cross"), per_class=20, size=32, seed=5)
    test = make_shapes_folder(tmp_path / "t", classes=("circle", "cross"), per_class=6, size=32, seed=9)
    metrics = api.train(data, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar", test_dir=test)
    assert metrics["train_accuracy"] >= 0.7  # chance is 0.5; the features are random but informative
    # --test-dir evaluates the in-memory model exactly as `evaluate` does the saved one
    separate = api.evaluate(test, tmp_path / "run")
    assert metrics["test"]["n_images"] == separate["n_images"] == 12
    assert metrics["test"]["confusion"] == separate["confusion"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] == separate["accuracy"]


def test_test_dir_with_unknown_class_is_refused_before_training(shapes, tiny_base, tmp_path):
    from finetune_cli.data.synthetic import make_shapes_folder

    test = make_shapes_folder(tmp_path / "t", classes=("circle", "ring"), per_class=3, size=32, seed=9)
    with pytest.raises(FolderError, match="ring"):
        api.train(shapes, str(tiny_base), out=tmp_path / "run", test_dir=test)
    assert not (tmp_path / "run" / "plan.json").exists()


def test_existing_run_folder_is_never_mixed(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.keras").write_text("precious")
    with pytest.raises(OutputError, match="already holds a run"):
        api.train(shapes, str(tiny_base), out=out, image_size=32)
    assert (out / "model.keras").read_text() == "precious"


def test_val_dir_with_other_classes_is_refused(shapes, tiny_base, tmp_path):
    from finetune_cli.data.synthetic import make_shapes_folder

    val = make_shapes_folder(tmp_path / "val", classes=("circle", "ring"), per_class=3, size=32)
    with pytest.raises(FolderError, match="validation classes"):
        api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, val_dir=val)


def test_finetune_trains_only_planned_stages(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    before = import_keras().saving.load_model(tiny_base).get_layer("s1_conv").get_weights()[0]
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=recipe_file(tmp_path),
                        similarity="similar")
    assert metrics["strategy"] == "partial" and len(pd.read_csv(out / "history.csv")) >= 1
    model = import_keras().saving.load_model(out / "model.keras")
    np.testing.assert_array_equal(model.get_layer("s1_conv").get_weights()[0], before)  # stage 1 frozen
    assert (out / "checkpoint.keras").exists() and json.loads((out / "state.json").read_text())["epoch"] >= 1


def test_nan_loss_retries_at_lower_rate_then_gives_up(shapes, tiny_base, tmp_path):
    recorder = Recorder()
    with pytest.raises(TrainingError, match="learning rate"):
        api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                  recipe=recipe_file(tmp_path, optimizer="sgd", learning_rate=1e30, strategy="full", unfreeze_stages=0),
                  reporter=recorder)
    assert len([n for n in recorder.notes if "retrying at lr/10" in n]) == 2


def test_interrupt_then_resume(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, epochs=4)

    with pytest.raises(KeyboardInterrupt):
        api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=recipe, similarity="similar",
                  reporter=Recorder(stop_at_epoch=2))
    assert json.loads((out / "state.json").read_text())["epoch"] == 2
    import_keras().saving.load_model(out / "checkpoint.keras")  # the checkpoint is loadable
    with pytest.raises(OutputError, match="--resume"):
        api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=recipe)
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, resume=True)
    epochs = pd.read_csv(out / "history.csv")["epoch"].tolist()
    assert epochs[:3] == [1, 2, 3] and metrics["strategy"] == "partial"


def test_cli_train_predict_evaluate(shapes, tiny_base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    trained = runner.invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--image-size", "32", "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    assert "out-of-fold accuracy" in trained.output  # a linear plan: validated on every image
    preds = tmp_path / "p.csv"
    predicted = runner.invoke(cli, ["predict", str(shapes / "circle"), "--model", str(out), "--out", str(preds)])
    assert predicted.exit_code == 0 and len(pd.read_csv(preds)) == 8
    evaluated = runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out), "--json"])
    assert json.loads(evaluated.output)["n_images"] == 24
    (shapes / "hexagon").mkdir()
    (shapes / "hexagon" / "a.jpg").write_bytes((shapes / "circle" / "circle_000.jpg").read_bytes())
    (shapes / "hexagon" / "b.jpg").write_bytes((shapes / "circle" / "circle_001.jpg").read_bytes())
    unknown = runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out)])
    assert unknown.exit_code == 2 and "hexagon unknown to the model" in unknown.output
    missing = runner.invoke(cli, ["predict", str(shapes), "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.output
