"""The flip check: fine-tuning drops horizontal flips when a flip changes the class, and keeps them otherwise."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from finetune_cli import api
from finetune_cli.config import TRAIN
from finetune_cli.train.flips import view_ids
from tests.test_prefix import recipe


def ramps(root, axis: int, per_class: int = 20, size: int = 32, seed: int = 0):
    """Two classes of noisy two-tone images split along `axis` (1: left | right, 0: top / bottom): `rising`
    is dark then bright along it, `falling` bright then dark. A horizontal flip swaps the left | right
    classes, and keeps the top / bottom ones."""
    rng = np.random.default_rng(seed)
    ramp = np.where(np.arange(size) < size // 2, 30.0, 220.0)
    for name, line in (("rising", ramp), ("falling", ramp[::-1])):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            grid = np.repeat(line[None, :] if axis == 1 else line[:, None], size, axis=0 if axis == 1 else 1)
            noisy = np.clip(grid[..., None] + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("axis,kept", [(1, False), (0, True)])
def test_the_flip_check_turns_flips_off_only_where_a_flip_changes_the_class(tmp_path, tiny_base, axis, kept):
    folder = ramps(tmp_path / "ramps", axis)
    out = tmp_path / "run"
    r = recipe(tmp_path, augmentation="light", unfreeze_stages=0)  # every stage trains: on-line augmentation
    api.train(folder, str(tiny_base), out=out, image_size=32, similarity="different", recipe=r,
              settings=dataclasses.replace(TRAIN, keep_better=False))
    check = json.loads((out / "metrics.json").read_text())["flip_check"]
    plan = json.loads((out / "plan.json").read_text())
    assert check["flips"] is kept and plan["plan"]["flips"] is kept and plan["flip_check"] == check
    if kept:
        assert abs(check["loss"]) < check["max_loss"]
    else:  # the head learned the ramp's direction, and a flip reverses it
        assert check["accuracy"] >= 0.9 and check["accuracy_mirrored"] <= 0.1


def test_without_flips_the_cached_views_are_the_crop_only_ones():
    assert view_ids(3) == [0, 1, 2, 3]
    assert view_ids(3, flips=False) == [0, 2, 4, 6]
    assert view_ids(0, flips=False) == [0]
