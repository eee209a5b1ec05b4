"""Fine-tuning runs a pilot first, with the linear head as the bar: fine-tuning that cannot win stops early."""

from __future__ import annotations

import dataclasses

import pandas as pd

from finetune_cli import api
from finetune_cli.config import TRAIN
from finetune_cli.synthetic import make_shapes_folder
from tests.test_train import recipe_file

NO_CALIBRATION = dataclasses.replace(TRAIN, calibrate=False)


def frozen_recipe(tmp_path):
    """A partial plan whose rate cannot move the weights: fine-tuning built to lose (it stays the linear head)."""
    return recipe_file(tmp_path, learning_rate=1e-12, epochs=6, patience=6, dropout=0.0, l2=0.0)


def test_a_pilot_that_cannot_beat_the_linear_head_is_abandoned(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=10, size=32, seed=2)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=frozen_recipe(tmp_path),
                        similarity="similar", settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=2))
    assert len(pd.read_csv(out / "history.csv")) == 2  # the pilot's 2 epochs, not the recipe's 6
    pilot = metrics["pilot"]
    assert pilot["abandoned"] and metrics["kept"] == "linear-head"
    assert pilot["best"]["val_accuracy"] <= pilot["linear_head"]["val_accuracy"]
    assert any("abandoned after its 2-epoch pilot" in note for note in metrics["notes"])
    # the saved model is the linear head: its validation accuracy is the bar's
    assert abs(metrics["val_accuracy"] - pilot["linear_head"]["val_accuracy"]) < 1e-9


def test_without_a_pilot_the_same_plan_pays_its_whole_schedule(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=10, size=32, seed=2)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=frozen_recipe(tmp_path),
                        similarity="similar", settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=0))
    assert len(pd.read_csv(out / "history.csv")) == 6 and "pilot" not in metrics
