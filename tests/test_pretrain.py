"""Autoencoder pretraining: encoder files, tied weights, greedy training, train --unlabeled."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import PRETRAIN
from finetune_cli.data.pipeline import image_batches
from finetune_cli.data.scan import scan_folder
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import BackboneError, FolderError, OutputError, SettingsError
from finetune_cli.models.autoencoder import mlp_autoencoder
from finetune_cli.models.backbones import build, resolve
from finetune_cli.train.pretrain import fit_phase, greedy_phases
from tests.conftest import Recorder

#: A tiny, fast configuration: 16-px images, two conv blocks, an 8-unit code.
TINY = dict(image_size=16, conv_filters=(4, 8), mlp_hidden=(24,), code_size=8, epochs=2, batch_size=8)


def tiny(**changes):
    """The pretraining settings of these tests: tiny networks, two epochs."""
    return dataclasses.replace(PRETRAIN, **{**TINY, **changes})


@pytest.fixture
def unlabeled(tmp_path):
    """30 images spread over nested folders, with a broken file and litter."""
    root = make_shapes_folder(tmp_path / "raw", per_class=10, size=24, seed=3)
    (root / "circle" / "broken.jpg").write_bytes(b"not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_pretrain_cli_writes_a_loadable_backbone(unlabeled, tmp_path):
    out = tmp_path / "enc" / "encoder.keras"
    result = CliRunner().invoke(cli, ["pretrain", "--unlabeled", str(unlabeled), "--out", str(out),
                                      "--image-size", "16", "--code-size", "8", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    for suffix in ("reconstructions.png", "curves.png", "history.csv", "pretrain.json"):
        assert (out.parent / f"encoder.{suffix}").stat().st_size > 0
    summary = json.loads((out.parent / "encoder.pretrain.json").read_text())
    assert summary["n_images"] == 30 and summary["n_skipped"] == 1
    assert summary["n_train"] + summary["n_holdout"] == 30
    backbone = build(resolve(str(out)))
    assert backbone.ref.image_size == 16
    features = backbone.model(np.full((2, 16, 16, 3), 200.0, np.float32)).numpy()
    assert features.shape == (2, 1, 1, 8) and np.isfinite(features).all()


def test_round_trip_pretrain_then_train_through_the_encoder_file(unlabeled, shapes, tmp_path):
    out = tmp_path / "encoder.keras"
    summary = api.pretrain(unlabeled, out, settings=tiny())
    assert summary["best_val_loss"] < summary["identity_val_loss"] * 10  # a real number, not NaN
    # 27 training images in batches of 8 is 4 batches a pass; an epoch is at least 20 batches: 5 passes
    images = [float(line.split(",")[-1]) for line in (tmp_path / "encoder.history.csv").read_text().splitlines()[1:]]
    assert summary["n_train"] == 27 and images == [5 * 27.0] * summary["epochs_run"]
    run = tmp_path / "run"
    metrics = api.train(shapes, str(out), out=run, similarity="similar")
    assert metrics["strategy"] == "linear"
    frame, _ = api.predict([shapes], run)
    assert len(frame) == 24 and set(frame["predicted"]) <= {"circle", "square", "triangle"}


def test_weights_none_keeps_the_architecture_and_changes_the_weights(unlabeled, tmp_path):
    out = tmp_path / "encoder.keras"
    api.pretrain(unlabeled, out, settings=tiny())
    learned, fresh = build(resolve(str(out))).model, build(resolve(str(out), "none")).model
    assert [type(l).__name__ for l in learned.layers] == [type(l).__name__ for l in fresh.layers]
    assert [w.shape for w in learned.get_weights()] == [w.shape for w in fresh.get_weights()]
    kernels = [(a, b) for a, b in zip(learned.get_weights(), fresh.get_weights()) if a.ndim > 1]
    assert kernels and all(not np.allclose(a, b) for a, b in kernels)


def test_tied_decoder_shares_the_encoder_kernel():
    ae = mlp_autoencoder(8, (12,), 4)
    dense, tied = ae.layers[0]
    assert np.array_equal(np.asarray(tied.kernel), np.asarray(dense.kernel).T)
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    before = ae.model(x).numpy()
    dense.kernel.assign(np.asarray(dense.kernel) * 2.0)
    assert np.array_equal(np.asarray(tied.kernel), np.asarray(dense.kernel).T)
    assert not np.allclose(before, ae.model(x).numpy())
    # The decoder owns biases only: 2 dense layers x (kernel, bias) + 2 tied biases.
    assert len(ae.model.trainable_variables) == 6
    assert {id(v) for v in ae.decoder_variables} == {id(t.bias) for _, t in ae.layers}


def test_greedy_mlp_trains_layer_by_layer_then_whole(unlabeled, tmp_path):
    out = tmp_path / "sda.keras"
    summary = api.pretrain(unlabeled, out, settings=tiny(arch="mlp"), greedy=True)
    history = (tmp_path / "sda.history.csv").read_text().splitlines()
    phases = list(dict.fromkeys(line.split(",")[0] for line in history[1:]))
    assert phases == ["layer 1 (dense1)", "layer 2 (code)", "end to end"]
    assert summary["greedy"] and summary["encoder_output"] == [1, 1, 8]


def test_a_greedy_phase_moves_only_its_own_layer(unlabeled):
    config = dataclasses.replace(PRETRAIN, **TINY)
    ae = mlp_autoencoder(16, (24,), 8)
    paths = scan_folder(unlabeled, labelled=False).paths()
    data = image_batches(paths, 16, 8)
    code_before = [np.asarray(v).copy() for v in ae.layers[1][0].weights]
    first_before = np.asarray(ae.layers[0][0].kernel).copy()
    fit_phase(ae, greedy_phases(ae, config)[0], data, data, config, 0, lambda: None)
    assert not np.allclose(first_before, np.asarray(ae.layers[0][0].kernel))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(code_before, ae.layers[1][0].weights))


def test_interrupt_keeps_the_last_good_encoder(unlabeled, tmp_path):
    out = tmp_path / "encoder.keras"

    with pytest.raises(KeyboardInterrupt):
        api.pretrain(unlabeled, out, reporter=Recorder(stop_at_epoch=2), settings=tiny(epochs=5))
    assert build(resolve(str(out))).model.output_shape == (None, 1, 1, 8)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_init_from_adapts_a_backbones_early_stages(unlabeled, tiny_base, tmp_path):
    out = tmp_path / "adapted.keras"
    summary = api.pretrain(unlabeled, out, init_from=str(tiny_base), settings=tiny())
    assert summary["arch"] == "adapted" and summary["init_stage"] >= 1
    original = build(resolve(str(tiny_base), "imagenet", 16)).model
    adapted = build(resolve(str(out))).model
    name = adapted.layers[-1].name
    assert name in {l.name for l in original.layers}
    assert not np.allclose(original.get_layer(name).get_weights()[0], adapted.get_layer(name).get_weights()[0])


def test_train_unlabeled_pretrains_then_trains_in_one_command(unlabeled, shapes, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(shapes), "--unlabeled", str(unlabeled), "--out", str(run),
                                      "--image-size", "16", "--code-size", "8", "--pretrain-epochs", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    assert metrics["pretrained"]["arch"] == "conv" and plan["pretrained"]["n_images"] == 30
    assert plan["base"] == "encoder.keras" and plan["similarity"]["verdict"] == "similar"
    assert (run / "encoder.reconstructions.png").exists() and (run / "model.keras").exists()


def test_bad_pretraining_input_is_a_clear_error(unlabeled, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(unlabeled.rglob("*.jpg"))[:3]:
        shutil.copy(path, few / path.name)
    with pytest.raises(FolderError, match="at least 10"):
        api.pretrain(few, tmp_path / "a.keras", settings=tiny())
    taken = tmp_path / "taken.keras"
    taken.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        api.pretrain(unlabeled, taken, settings=tiny())
    assert taken.read_bytes() == b"precious"
    with pytest.raises(OutputError, match=".keras"):
        api.pretrain(unlabeled, tmp_path / "enc.h5", settings=tiny())
    with pytest.raises(SettingsError, match="between 0 and 1"):
        api.pretrain(unlabeled, tmp_path / "b.keras", settings=tiny(noise=1.5))
    with pytest.raises(BackboneError, match="--base is required"):
        api.train(unlabeled, None, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_resume_after_interrupted_pretraining_points_to_the_encoder(unlabeled, shapes, tmp_path):
    run = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        api.train(shapes, None, out=run, unlabeled=unlabeled, reporter=Recorder(stop_at_epoch=2),
                  pretrain_settings=tiny(epochs=5))
    assert not (run / "plan.json").exists()
    with pytest.raises(OutputError, match="encoder.keras, works as --base"):
        api.train(shapes, None, out=run, unlabeled=unlabeled, resume=True)
    assert build(resolve(str(run / "encoder.keras"))).model.output_shape == (None, 1, 1, 8)
