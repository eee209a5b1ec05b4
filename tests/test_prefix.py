"""The frozen-prefix activation cache: same training as end to end, memory cap, float16, views."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from finetune_cli import api
from finetune_cli.config import TRAIN
from finetune_cli.runtime.keras import import_keras
from tests.conftest import Recorder, save_tiny_backbone


def recipe(tmp_path, **fields):
    body = {"strategy": "partial", "unfreeze_stages": 2, "epochs": 1, "batch_size": 8, "patience": 5,
            "augmentation": "none", "feature_views": 0, "dropout": 0.0, "l2": 0.0, "optimizer": "sgd",
            "momentum": 0.0, "learning_rate": 0.05, **fields}
    path = tmp_path / "r.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in body.items()))
    return str(path)


def trained_weights(shapes, base, out, recipe_path, **settings):
    recorder = Recorder()
    settings = {"keep_better": False, "refit_fine_tuned": False, **settings}  # the fine-tuned weights themselves
    api.train(shapes, str(base), out=out, image_size=32, similarity="similar", recipe=recipe_path,
              settings=dataclasses.replace(TRAIN, **settings), reporter=recorder)
    model = import_keras().saving.load_model(out / "model.keras")
    return model.get_weights(), recorder


@pytest.mark.parametrize("stages", [3, 4])
def test_one_epoch_on_cached_activations_equals_end_to_end(shapes, tmp_path, stages):
    """With 4 stages the cut falls inside the network, so the top's own stage numbers differ from the plan's."""
    base = save_tiny_backbone(tmp_path / "base.keras", stages=stages)
    r = recipe(tmp_path)
    before = import_keras().saving.load_model(base).get_weights()
    cached, notes = trained_weights(shapes, base, tmp_path / "cached", r, activation_dtype="float32")
    plain, _ = trained_weights(shapes, base, tmp_path / "plain", r, cache_prefix=False)
    assert any("cached activations" in n for n in notes.notes)
    assert len(cached) == len(plain)
    for a, b in zip(cached, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # training moved the two trained stages but none of the frozen ones
    frozen = 2 * (stages - 2)  # kernel and bias of each frozen conv
    moved = [not np.allclose(a, b) for a, b in zip(cached, before)]
    assert not any(moved[:frozen]) and all(moved[frozen : 2 * stages])


def test_over_the_memory_budget_activations_stream_from_disk_with_the_same_result(shapes, tiny_base, tmp_path):
    r = recipe(tmp_path)
    held, _ = trained_weights(shapes, tiny_base, tmp_path / "held", r, activation_dtype="float32")
    streamed, recorder = trained_weights(shapes, tiny_base, tmp_path / "streamed", r, activation_dtype="float32",
                                         activation_budget_mb=0)
    assert any("read from disk" in n for n in recorder.notes)
    for a, b in zip(held, streamed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_float16_activations_and_cached_views_train(shapes, tiny_base, tmp_path):
    r = recipe(tmp_path, feature_views=2, epochs=2)
    half, recorder = trained_weights(shapes, tiny_base, tmp_path / "half", r)
    full, _ = trained_weights(shapes, tiny_base, tmp_path / "full", recipe(tmp_path, epochs=2),
                              activation_dtype="float32")
    assert all(np.isfinite(w).all() for w in half)
    assert [p for p in recorder.phases if "view 2 of 2" in p]
    # views change what the top sees: the weights differ from the run without views
    assert any(not np.allclose(a, b) for a, b in zip(half, full))


def test_shift_maps_translates_each_map_within_the_cells_with_edges_repeated():
    from finetune_cli.train.prefix import shift_maps

    maps = np.random.default_rng(0).normal(size=(64, 6, 5, 3)).astype(np.float32)
    shifted = shift_maps(maps, 1, np.random.default_rng(1))
    assert shifted.shape == maps.shape
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    offsets = []
    for k in range(len(maps)):
        found = [(dy, dx) for dy in range(3) for dx in range(3)
                 if np.array_equal(shifted[k], padded[k, dy : dy + 6, dx : dx + 5])]
        assert found, f"map {k} is not a translation of its input by at most one cell"
        offsets.append(found[0])
    assert len(set(offsets)) == 9  # 64 draws reach every offset, including none
    np.testing.assert_array_equal(shifted, shift_maps(maps, 1, np.random.default_rng(1)))


def test_activation_shift_changes_what_the_top_trains_on(shapes, tiny_base, tmp_path):
    r = recipe(tmp_path, epochs=2)
    plain, _ = trained_weights(shapes, tiny_base, tmp_path / "plain", r, activation_dtype="float32")
    shifted, _ = trained_weights(shapes, tiny_base, tmp_path / "shift", r, activation_dtype="float32",
                                 activation_shift=1)
    again, _ = trained_weights(shapes, tiny_base, tmp_path / "again", r, activation_dtype="float32",
                               activation_shift=1)
    assert all(np.isfinite(w).all() for w in shifted)
    assert any(not np.allclose(a, b) for a, b in zip(plain, shifted))
    for a, b in zip(shifted, again):  # the shifts come from the run's seed
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
