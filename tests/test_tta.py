"""Test-time augmentation (`predict --tta K`, `evaluate --tta K`): the mean of the pipeline's own views."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.data.inputs import collect
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import SettingsError
from finetune_cli.models.inference import probabilities
from finetune_cli.runs.run import Run
from tests.conftest import save_tiny_backbone


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shapes folder, run folder): one linear run for the module, without the feature cache."""
    root = tmp_path_factory.mktemp("tta")
    shapes = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
    base = save_tiny_backbone(root / "tiny.keras")
    api.train(shapes, str(base), out=root / "run", image_size=32, similarity="similar", use_cache=False)
    return shapes, root / "run"


def views_by_hand(run: Run, scan, k: int) -> np.ndarray:
    """(k, n, classes): the model's probabilities of views 0..k-1, each through `batched_images(view=v)`."""
    from finetune_cli.data.pipeline import batched_images

    return np.stack([np.concatenate([run.model(x, training=False).numpy() for x, _ in
                                     batched_images(scan.paths(), run.image_size, 32, view=v)]) for v in range(k)])


def test_one_view_is_the_plain_prediction_exactly(trained):
    shapes, out = trained
    run, scan = Run.load(out), collect([shapes / "circle", shapes / "square"])
    probs, ok = probabilities(run.model, scan, run.image_size, tta=1)
    plain, plain_ok = probabilities(run.model, scan, run.image_size)
    np.testing.assert_array_equal(probs, plain)
    assert ok.all() and plain_ok.all()
    np.testing.assert_allclose(probs, views_by_hand(run, scan, 1)[0], atol=1e-6)
    frame, _ = api.predict([shapes / "circle"], out, tta=1)
    pd.testing.assert_frame_equal(frame, api.predict([shapes / "circle"], out)[0])
    assert (frame["tta"] == 1).all()


def test_k_views_average_exactly_the_pipeline_views(trained):
    shapes, out = trained
    run, scan = Run.load(out), collect([shapes / "circle", shapes / "triangle"])
    views = views_by_hand(run, scan, 4)
    probs, ok = probabilities(run.model, scan, run.image_size, tta=4)
    assert ok.all()
    np.testing.assert_allclose(probs, views.mean(0), atol=1e-6)
    assert np.abs(views[1:] - views[0]).max() > 1e-4  # the views do differ: the mean is not view 0 again
    frame, _ = api.predict([shapes / "circle", shapes / "triangle"], out, tta=4)
    classes = [c for c in frame.columns if c.startswith("p_")]
    np.testing.assert_allclose(frame[classes].to_numpy(), views.mean(0), atol=1e-6)
    assert (frame["tta"] == 4).all() and frame.columns[-1] == "tta"


@pytest.mark.parametrize("bad", [0, 17, "two", "1.5", -3])
def test_a_bad_tta_is_a_one_line_error(trained, bad):
    shapes, out = trained
    with pytest.raises(SettingsError, match="--tta takes 1 to 16"):
        api.predict([shapes / "circle"], out, tta=bad)
    result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--model", str(out), "--tta", str(bad)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--tta takes 1 to 16" in result.output


def test_evaluate_json_records_tta(trained, tmp_path):
    shapes, out = trained
    runner = CliRunner()
    result = json.loads(runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out), "--json", "--tta", "3"]).output)
    run, scan = Run.load(out), collect([shapes])
    mean = views_by_hand(run, scan, 3).mean(0)
    truth = np.array([run.classes.index(p.parent.name) for p in scan.paths()])
    assert result["tta"] == 3 and result["n_images"] == 24
    assert result["accuracy"] == pytest.approx(float((mean.argmax(1) == truth).mean()))
    assert json.loads(runner.invoke(cli, ["evaluate", str(shapes), "--model", str(out), "--json"]).output)["tta"] == 1
    csv = tmp_path / "p.csv"
    predicted = runner.invoke(cli, ["predict", str(shapes / "circle"), "--model", str(out), "--tta", "2",
                                    "--out", str(csv)])
    assert predicted.exit_code == 0, predicted.output
    assert pd.read_csv(csv)["tta"].tolist() == [2] * 8
