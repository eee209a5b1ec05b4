"""The augmentation check: fine-tuning end to end steps down from its augmentation while the augmented images
lose too much of the linear head's accuracy, and says so in metrics.json and plan.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from finetune_cli import api
from finetune_cli.config import TRAIN
from tests.test_flips import ramps
from tests.test_prefix import recipe


@pytest.mark.parametrize("max_loss,chosen", [(-1.0, "none"), (1.01, "strong")])
def test_the_plan_trains_with_the_strongest_augmentation_the_check_allows(tmp_path, tiny_base, max_loss, chosen):
    """A limit no loss can meet tries strong, then light, and trains without augmentation; a limit any loss
    meets keeps the recipe's strong augmentation after one try."""
    folder = ramps(tmp_path / "ramps", 0)
    out = tmp_path / "run"
    r = recipe(tmp_path, augmentation="strong", unfreeze_stages=0)  # every stage trains: on-line augmentation
    metrics = api.train(folder, str(tiny_base), out=out, image_size=32, similarity="different", recipe=r,
                        settings=dataclasses.replace(TRAIN, keep_better=False, strength_max_loss=max_loss))
    check = metrics["augmentation_check"]
    plan = json.loads((out / "plan.json").read_text())
    assert check["augmentation"] == chosen == plan["plan"]["augmentation"] and plan["augmentation_check"] == check
    assert list(check["augmented"]) == (["strong", "light"] if chosen == "none" else ["strong"])
    assert 0 <= check["accuracy"] <= 1 and check["n_images"] == metrics["n_val"]
    assert ("instead of strong" in check["note"]) is (chosen != "strong")
    assert check["accuracy"] == metrics["flip_check"]["accuracy"]  # the images as they are: phase 1's cached features


def test_a_plan_on_cached_activations_or_without_augmentation_is_not_checked(tmp_path, tiny_base):
    folder = ramps(tmp_path / "ramps", 0)
    for name, fields in (("cached", {"unfreeze_stages": 1, "augmentation": "strong"}),
                         ("none", {"unfreeze_stages": 0, "augmentation": "none"})):
        metrics = api.train(folder, str(tiny_base), out=tmp_path / name, image_size=32, similarity="different",
                            recipe=recipe(tmp_path, **fields), settings=dataclasses.replace(TRAIN, keep_better=False))
        assert "augmentation_check" not in metrics
