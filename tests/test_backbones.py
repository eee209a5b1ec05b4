"""Backbones: every registry entry, preprocessing, file bases, stages, weights."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_cli.errors import BackboneError, WeightsUnavailableError
from finetune_cli.models import registry
from finetune_cli.models.backbones import build, resolve
from finetune_cli.models.stages import find_stages, select_layer
from finetune_cli.runtime.keras import import_keras
from tests.conftest import save_tiny_backbone


@pytest.mark.parametrize("name", registry.names())
def test_registry_entry_builds_with_documented_feature_dim(name):
    spec = registry.get(name)
    size = max(spec.min_size, 32)
    backbone = build(resolve(name, "none", size))
    model = backbone.model
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape[-1] == spec.feature_dim
    stages = find_stages(model)
    assert len(stages) >= 3 and stages[-1].shape[-1] == spec.feature_dim
    out = model(np.full((1, size, size, 3), 127.0, "float32"), training=False)
    assert np.isfinite(np.asarray(out)).all()


def test_caffe_preprocessing_matches_keras():
    keras = import_keras()
    model = build(resolve("vgg16", "none", 32)).model
    pre = keras.Model(model.input, model.get_layer("preprocess_rgb_to_bgr").output)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(pre(x)), expected, atol=1e-3)


def test_unknown_name_lists_valid_and_closest():
    with pytest.raises(BackboneError, match="Did you mean 'mobilenetv2'.*Valid names: efficientnet_lite0, vgg16, vgg19"):
        resolve("MobileNet_V2")


def test_missing_weights_file():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve("vgg16", "/no/such.weights.h5")


def test_offline_imagenet_download_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a closed port: the download fails
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailableError, match=r"mobilenet_v2_weights.*_96_no_top\.h5.*--weights PATH.*--base PATH"):
        build(resolve("mobilenetv2", "imagenet", 96))


def test_registry_weights_path_round_trip(tmp_path):
    keras = import_keras()
    keras.utils.set_random_seed(3)
    stock = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3))
    stock.save_weights(tmp_path / "w.weights.h5")
    model = build(resolve("mobilenetv3small", str(tmp_path / "w.weights.h5"), 32)).model
    theirs = [w for l in stock.layers for w in l.get_weights()]
    ours = [w for l in model.layers if not l.name.startswith("preprocess_") for w in l.get_weights()]
    assert len(theirs) == len(ours)
    assert all(np.array_equal(a, b) for a, b in zip(theirs, ours))


def test_file_base_round_trip_and_stages(tiny_base):
    ref = resolve(str(tiny_base), image_size=32)
    backbone = build(ref)
    assert backbone.model.output_shape == (None, 8, 8, 16)
    stages = find_stages(backbone.model)
    assert [(s.name, s.shape) for s in stages] == [
        ("s1_conv", (32, 32, 4)), ("s2_conv", (16, 16, 8)), ("s3_conv", (8, 8, 16))
    ]
    assert select_layer(backbone.model, 2) == "s2_conv"
    assert select_layer(backbone.model, "-1") == "s3_conv"
    with pytest.raises(BackboneError, match="stages 1 to 3"):
        select_layer(backbone.model, 4)
    with pytest.raises(BackboneError, match="no layer named 'nope'.*s1_conv, s2_conv, s3_conv"):
        select_layer(backbone.model, "nope")


def test_file_base_weights_none_reinitialises_same_architecture(tiny_base):
    pretrained = build(resolve(str(tiny_base), "imagenet", 32)).model
    fresh = build(resolve(str(tiny_base), "none", 32)).model
    assert [l.__class__ for l in pretrained.layers] == [l.__class__ for l in fresh.layers]
    a, b = pretrained.get_layer("s2_conv").get_weights()[0], fresh.get_layer("s2_conv").get_weights()[0]
    assert a.shape == b.shape and not np.allclose(a, b)
    assert resolve(str(tiny_base), "none").identity != resolve(str(tiny_base), "imagenet").identity


def test_file_with_lambda_is_refused_in_safe_mode(tmp_path):
    path = save_tiny_backbone(tmp_path / "unsafe.keras", size=32, lam=True)
    with pytest.raises(BackboneError, match="safe mode"):
        build(resolve(str(path)))


def test_fixed_size_file_gives_native_size(tmp_path):
    path = save_tiny_backbone(tmp_path / "fixed.keras", size=48)
    assert resolve(str(path)).image_size == 48


def test_softmax_head_is_split_off(tmp_path, tiny_base):
    keras = import_keras()
    trunk = keras.saving.load_model(tiny_base)
    x = keras.layers.GlobalAveragePooling2D()(trunk.output)
    out = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    keras.Model(trunk.input, out).save(tmp_path / "withtop.keras")
    backbone = build(resolve(str(tmp_path / "withtop.keras"), image_size=32))
    assert backbone.model.output_shape == (None, 16)
    assert backbone.classifier is not None and backbone.classifier.output_shape == (None, 5)
