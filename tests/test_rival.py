"""Fine-tuning on data unlike the pretraining data must also beat the trouble cell's linear head."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from PIL import Image

from finetune_cli import api
from finetune_cli.config import TRAIN
from tests.test_prefix import recipe


def corners(root, per_class: int = 16, size: int = 32, seed: int = 0):
    """Two classes told apart only by where a bright square sits (top left or bottom right, away from the
    borders): raw pixels separate them, the tiny backbone's average-pooled features cannot."""
    rng = np.random.default_rng(seed)
    for name, at in (("top-left", 6), ("bottom-right", 18)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(60, 3, (size, size, 3))
            pixels[at:at + 8, at:at + 8] = 220
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_unlike_data_keeps_the_raw_pixel_head_when_fine_tuning_cannot_beat_it(tmp_path, tiny_base):
    train, test = corners(tmp_path / "train"), corners(tmp_path / "test", per_class=8, seed=1)
    out = tmp_path / "run"
    r = recipe(tmp_path, strategy="full", unfreeze_stages=0, epochs=3)
    metrics = api.train(train, str(tiny_base), out=out, image_size=32, similarity="different", recipe=r,
                        test_dir=test, settings=dataclasses.replace(TRAIN, pilot_epochs=2))
    assert metrics["features"].startswith("raw pixels") and metrics["kept"] == "linear-head"
    assert metrics["pilot"]["abandoned"] and metrics["refit"] == "all labels"  # then refitted on every label
    assert metrics["validation"]["method"] == "out-of-fold" and metrics["n_val"] == 32
    assert [c["features"] for c in metrics["candidates"] if c["chosen"]] == [metrics["features"]]
    assert metrics["test_accuracy"] == 1.0  # the saved model is the raw-pixel head, scored on other images
    assert json.loads((out / "metrics.json").read_text())["features"] == metrics["features"]


def test_without_the_rival_the_final_features_head_is_all_fine_tuning_is_held_to(tmp_path, tiny_base):
    train, test = corners(tmp_path / "train"), corners(tmp_path / "test", per_class=8, seed=1)
    r = recipe(tmp_path, strategy="full", unfreeze_stages=0, epochs=3)
    metrics = api.train(train, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="different",
                        recipe=r, test_dir=test, settings=dataclasses.replace(TRAIN, feature_rival=False))
    assert "candidates" not in metrics and metrics["test_accuracy"] < 1.0


def test_the_rival_is_also_fitted_where_the_probe_found_an_earlier_stage_as_good_as_the_final_one():
    from finetune_cli.strategy.similarity import forced, judge
    from finetune_cli.train.finetune import earlier_stage_holds

    tie = judge({3: 0.78, 4: 0.78, 5: 0.76}, None, 200)  # brain MRI: within the 3-point margin, so `similar`
    assert tie.verdict == "similar" and tie.best_stage == 4 and earlier_stage_holds(tie)
    final_best = judge({3: 0.70, 4: 0.78, 5: 0.78}, None, 200)  # a tie goes to the later stage: the final one
    assert final_best.verdict == "similar" and not earlier_stage_holds(final_best)
    assert earlier_stage_holds(judge({3: 0.90, 4: 0.80, 5: 0.70}, None, 200))  # `different`: fitted anyway
    assert not earlier_stage_holds(forced("similar"))  # a verdict given, nothing measured


def test_the_kept_rival_is_refitted_on_every_label_without_comparing_the_candidates_again(tmp_path, tiny_base):
    """The candidates are compared once, before the pilot; after it is abandoned, only the chosen one is fitted
    again, on every label (C by cross-validation)."""
    from tests.test_pilot import _Steps

    train = corners(tmp_path / "train")
    steps = _Steps()
    r = recipe(tmp_path, strategy="full", unfreeze_stages=0, epochs=3)
    metrics = api.train(train, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="different", recipe=r,
                        settings=dataclasses.replace(TRAIN, pilot_epochs=2), reporter=steps,
                        cache_dir=tmp_path / "cache")
    names = [name for name, _ in steps.steps]
    fits = [i for i, name in enumerate(names) if name.startswith("fitting the linear head on")]
    pilot = next(i for i, name in enumerate(names) if name.startswith("phase 2"))
    before, after = [names[i] for i in fits if i < pilot], [names[i] for i in fits if i > pilot]
    assert metrics["kept"] == "linear-head" and metrics["refit"] == "all labels"
    assert len(before) == len(metrics["candidates"]) > 1
    assert after == [f"fitting the linear head on {metrics['features']} features (cross-validated C)"]
