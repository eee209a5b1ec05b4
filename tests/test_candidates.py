"""Small data unlike the pretraining data: the linear plan compares feature sources by cross-validation.

- each source's Keras model computes exactly the features its rows were fitted
  on (stage concatenation, raw pixels), so the saved model is the chosen math;
- a real `trouble` run (forced `--similarity different` on a tiny folder)
  compares every probed stage, their concatenation and raw pixels, keeps the
  best cross-validated one, and records the table in metrics.json and
  plan.json; the saved model's predictions match its validation accuracy.
"""

from __future__ import annotations

import json

import numpy as np

from finetune_cli import api
from finetune_cli.config import SCAN
from finetune_cli.data.scan import scan_folder
from finetune_cli.features import FeatureCache
from finetune_cli.models.backbones import build, resolve
from finetune_cli.runs.run import Run
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.context import Context
from finetune_cli.train.linear import fit_linear
from finetune_cli.train.sources import JointSource, PixelSource, StageSource
from tests.conftest import Recorder


def context(shapes, base, tmp_path):
    scan = scan_folder(shapes, labelled=True)
    backbone = build(resolve(str(base), "imagenet", 32))
    return Context(None, scan, scan, scan, backbone, FeatureCache.at(tmp_path / "c", write=True), SCAN, Recorder(), 0, 8)


def images(scan, size=32):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)), "float32") for p in scan.paths()])


def test_each_source_model_computes_its_own_features(shapes, tiny_base, tmp_path):
    ctx = context(shapes, tiny_base, tmp_path)
    x = images(ctx.scan)
    for source in (StageSource((1, None)), StageSource((2,)), PixelSource(8),
                   JointSource(StageSource((1, None)), PixelSource(8))):
        rows = source.rows(ctx, ctx.scan)
        head = fit_linear(rows.features, ctx.labels(rows.records), len(ctx.classes))
        model = source.model(ctx, head.kernel, head.bias)
        np.testing.assert_allclose(model.predict(x, verbose=0), head.probabilities(rows.features), atol=2e-5,
                                   err_msg=source.name)
    assert PixelSource(8).rows(ctx, ctx.scan).features.shape == (len(ctx.scan.images), 3 * 8 * 8)


def test_trouble_plan_compares_stages_concatenation_and_pixels(shapes, tiny_base, tmp_path):
    out = tmp_path / "run"
    recorder = Recorder()
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="different", reporter=recorder)
    table = metrics["candidates"]
    names = [row["features"] for row in table]
    plan = json.loads((out / "plan.json").read_text())
    best = plan["similarity"]["best_stage"]  # the probe runs even under a forced verdict: this cell needs it
    assert names == [f"stage {best}" if best < 3 else "final stage", "stage 1 + stage 2 + final stage",
                     "raw pixels 16x16", "stage 1 + stage 2 + final stage + raw pixels 16x16"]
    chosen = [row for row in table if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["cv_accuracy"] == max(row["cv_accuracy"] for row in table)
    assert metrics["features"] == chosen[0]["features"]
    assert plan["candidates"] == table
    assert any(n.startswith("features compared by cross-validated accuracy") for n in recorder.notes)
    run = Run.load(out)
    val = scan_folder(shapes, labelled=True)
    probs = run.model.predict(images(val), verbose=0)
    assert probs.shape == (len(val.images), 3)
    keras = import_keras()
    assert isinstance(run.model.get_layer("classifier"), keras.layers.Dense)


def test_candidates_follow_the_probe_evidence():
    """With the probe's per-stage evidence only its best stage is refitted; a forced verdict compares all."""
    from finetune_cli.strategy.decide import decide
    from finetune_cli.strategy.recipes import load
    from finetune_cli.strategy.similarity import Similarity, forced
    from finetune_cli.train.linear import candidate_sources

    plan = decide("small", "different", 5, load("trouble")[0])
    measured = Similarity("different", {"3": 0.9, "4": 0.8, "5": 0.6}, 3, None, 40, "an earlier stage probes better")
    names = [s.name for s in candidate_sources(plan, measured, 5)]
    assert names == ["stage 3", "stage 3 + stage 4 + final stage", "raw pixels 16x16",
                     "stage 3 + stage 4 + final stage + raw pixels 16x16"]
    names = [s.name for s in candidate_sources(plan, forced("different"), 5)]
    assert names[:3] == ["stage 3", "stage 4", "final stage"] and len(names) == 6
    linear_plan = decide("small", "similar", 5, load("linear")[0])
    assert [s.name for s in candidate_sources(linear_plan, measured, 5)] == ["final stage"]
