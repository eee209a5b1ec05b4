"""`finetune explain`: maps that find the evidence, Grad-CAM through a nested backbone, the sanity check, errors.

The constructed case: 40 px images of noise with one 8 px square whose
colour alone decides the class, at a random place. A small conv net learns
it in a few seconds; a map that explains it must peak inside the square.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune_cli.analysis import saliency
from finetune_cli.cli import cli
from finetune_cli.errors import ModelFileError, SettingsError
from tests.browser import assert_page_reads, requires_browser

SIDE, SQUARE = 40, 8
COLOURS = np.array([(230, 30, 30), (30, 200, 30), (40, 60, 230)], np.float32)
CLASSES = ["blue", "green", "red"][::-1]  # index 0 red, 1 green, 2 blue


def square_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (n, 40, 40, 3) float32 in [0, 255], labels (n,), square top-left corners (n, 2))."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 30, (n, SIDE, SIDE, 3)).clip(0, 255).round().astype(np.float32)
    labels = rng.integers(0, 3, n)
    corners = rng.integers(0, SIDE - SQUARE + 1, (n, 2))
    for image, label, (top, left) in zip(images, labels, corners):
        image[top:top + SQUARE, left:left + SQUARE] = COLOURS[label]
    return images, labels, corners


def nested_classifier():
    """A transfer-learning-shaped model: the backbone (convs + pooling inside) is a nested Model."""
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)
    inner = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inner)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = keras.Model(inner, x, name="backbone")
    outer = keras.Input((SIDE, SIDE, 3), name="image")
    outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(backbone(outer))
    return keras.Model(outer, outputs, name="nested")


def train_square_run(folder, epochs: int = 12):
    """Train `nested_classifier` on 600 square images; save it as a run folder (model.keras + labels.json)."""
    images, labels, _ = square_images(600, seed=0)
    model = nested_classifier()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.optimizer.learning_rate = 3e-3
    model.fit(images, labels, epochs=epochs, batch_size=32, verbose=0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(CLASSES))
    return model


def write_images(folder, images, labels, labelled: bool = True) -> list:
    """PNG files (lossless) of `images`, in class subfolders when `labelled`."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        target = folder / CLASSES[label] if labelled else folder
        target.mkdir(parents=True, exist_ok=True)
        paths.append(target / f"img{i:02d}.png")
        Image.fromarray(image.astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, model, test images, labels, corners): one model shared by the module (~5 s)."""
    folder = tmp_path_factory.mktemp("square-run")
    model = train_square_run(folder)
    images, labels, corners = square_images(20, seed=5)
    accuracy = (model(images).numpy().argmax(1) == labels).mean()
    assert accuracy >= 0.9, f"the square model did not learn ({accuracy:.0%}); the map tests need it to"
    return folder, model, images, labels, corners


def peaks_inside(maps: np.ndarray, corners: np.ndarray) -> float:
    """Share of maps whose highest pixel lies inside the image's square."""
    hits = []
    for heat, (top, left) in zip(maps, corners):
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(top <= row < top + SQUARE and left <= col < left + SQUARE)
    return float(np.mean(hits))


@pytest.mark.parametrize("method", ["occlusion", "gradcam"])
def test_map_peaks_inside_the_square(trained, method):
    _, model, images, labels, corners = trained
    maps = saliency.heat_maps(model, images, labels, method)
    assert maps.shape == (20, SIDE, SIDE)
    assert peaks_inside(maps, corners) >= 0.9


def test_gradcam_enters_the_nested_backbone(trained):
    _, model, images, labels, _ = trained
    path = saliency.spatial_path(model)
    assert [layer.name for layer in path] == ["backbone", "conv2"]
    activation, probs = saliency.tapped_model(model, path)(images[:4])
    assert tuple(activation.shape) == (4, SIDE // 2, SIDE // 2, 16)
    np.testing.assert_allclose(probs.numpy(), model(images[:4]).numpy(), atol=1e-5)
    # the naive way asks the inner layer for its output on the outer graph, and fails
    from finetune_cli.runtime.keras import import_keras

    with pytest.raises(ValueError):
        import_keras().Model(model.inputs, [model.get_layer("backbone").get_layer("conv2").output, model.output])


def test_gradcam_on_a_keras_application_and_in_a_sequential():
    """The case of tensorflow#44462 (a keras.applications backbone with pooling inside, called as a layer),
    and a nested backbone inside a Sequential."""
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(1)
    app = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, include_top=False, pooling="avg")
    inputs = keras.Input((32, 32, 3))
    user = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(app(inputs)))
    small = nested_classifier().get_layer("backbone")
    sequential = keras.Sequential([keras.Input((SIDE, SIDE, 3)), small, keras.layers.Dense(2, activation="softmax")])
    rng = np.random.default_rng(0)
    for model, last, side, channels in [(user, "out_relu", 32, 1280), (sequential, "conv2", SIDE, 16)]:
        images = rng.uniform(0, 255, (2, side, side, 3)).astype(np.float32)
        path = saliency.spatial_path(model)
        assert [layer.name for layer in path][-1] == last and len(path) == 2
        activation, probs = saliency.tapped_model(model, path)(images)
        assert activation.shape[-1] == channels
        np.testing.assert_allclose(probs.numpy(), saliency.call(model, images).numpy(), atol=1e-5)
        maps = saliency.heat_maps(model, images, np.array([0, 1]), "gradcam")
        assert maps.shape == (2, side, side) and np.isfinite(maps).all() and maps.min() >= 0


def test_map_of_another_class_differs(trained):
    _, model, images, labels, corners = trained
    own = saliency.heat_maps(model, images[:6], labels[:6], "gradcam")
    other = saliency.heat_maps(model, images[:6], (labels[:6] + 1) % 3, "gradcam")
    assert not np.allclose(own, other)


def test_randomised_head_changes_the_map_and_not_the_model(trained):
    _, model, images, labels, _ = trained
    before = [w.copy() for w in model.get_weights()]
    maps = saliency.heat_maps(model, images[:8], labels[:8], "gradcam")
    checks = saliency.sanity(model, images[:8], labels[:8], maps, "gradcam")
    itself = [saliency.spearman(m, m) for m in maps]
    rhos = [c.rho for c in checks]
    assert np.allclose(itself, 1.0)
    assert all(r < s for r, s in zip(rhos, itself))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert [layer.name for layer in saliency.head_layers(model)] == ["classifier"]


def test_sanity_flag_logic():
    a = np.arange(64.0).reshape(8, 8)
    noise = np.random.default_rng(0).normal(size=(8, 8))
    assert saliency.verdict(a, a + 0.1 * noise, 0.5).flagged  # the head changed, the map did not
    unchanged = saliency.verdict(a, a ** 2, 0.8)
    assert unchanged.rho == pytest.approx(1.0) and unchanged.flagged
    changed = saliency.verdict(a, noise, 0.5)
    assert abs(changed.rho) < 0.5 and not changed.flagged
    flat = np.zeros((8, 8))
    assert saliency.verdict(flat, a).flagged  # a flat map explains nothing
    vanished = saliency.verdict(a, flat)  # the randomised head's map vanished: it changed
    assert np.isnan(vanished.rho) and not vanished.flagged
    assert np.isnan(saliency.spearman(flat, a))
    assert saliency.spearman(a, a ** 3) == pytest.approx(1.0)
    assert saliency.spearman(a, -a) == pytest.approx(-1.0)


def test_occlusion_windows_cover_the_image():
    patch, offsets = saliency.occlusion_windows(40)
    assert patch == 5 and offsets[0] == 0 and offsets[-1] == 35
    patch, offsets = saliency.occlusion_windows(7)
    assert patch == 1 and offsets == list(range(7))


@requires_browser
def test_cli_explain_writes_maps_and_gallery(trained, tmp_path):
    folder, model, images, labels, _ = trained
    write_images(tmp_path / "test", images[:6], labels[:6])
    wrong = (labels[0] + 1) % 3  # one image filed under the wrong class: it must come first
    (tmp_path / "test" / CLASSES[labels[0]] / "img00.png").rename(tmp_path / "test" / CLASSES[wrong] / "img00.png")
    odd = tmp_path / "test" / CLASSES[labels[5]] / "img05.png"
    odd.rename(odd.with_name("img05 #?%.png"))  # characters that break a relative URL unless the name is cleaned
    out = tmp_path / "maps"
    result = CliRunner().invoke(cli, ["explain", str(folder), str(tmp_path / "test"), "--method", "gradcam",
                                      "--sanity", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sanity:" in result.output and str(out / "index.html") in result.output
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["images"]) == 6 and all((out / r["map"]).is_file() for r in summary["images"])
    assert all(r["rho"] is None or -1 <= r["rho"] <= 1 for r in summary["images"])
    seen = assert_page_reads(out / "index.html", least_images=6, screenshot=tmp_path / "explain.png")
    assert seen.text.index("misclassified") < seen.text.index("correct")
    assert seen.text.index("img00.png") < seen.text.index("img01.png")


def test_cli_skips_and_lists_an_undecodable_file(trained, tmp_path):
    folder, model, images, labels, _ = trained
    paths = write_images(tmp_path / "flat", images[:2], labels[:2], labelled=False)
    broken = tmp_path / "flat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = CliRunner().invoke(cli, ["explain", str(folder), str(paths[0]), str(broken), str(tmp_path / "flat"),
                                      "--out", str(tmp_path / "out"), "--class", CLASSES[0]])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "broken.jpg" in result.output
    summary = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert len(summary["images"]) == 3 and {r["target"] for r in summary["images"]} == {CLASSES[0]}
    assert all(r["label"] is None and r["flagged"] is None for r in summary["images"])


def test_explaining_in_chunks_gives_the_same_maps(trained, tmp_path):
    """Memory stays flat: images are decoded and explained a chunk at a time, with the same result."""
    import dataclasses

    from finetune_cli.config import EXPLAIN
    from finetune_cli.tasks.explain import explain

    folder, _, images, labels, _ = trained
    write_images(tmp_path / "test", images[:5], labels[:5])
    whole = explain(folder, [str(tmp_path / "test")], method="occlusion", out=tmp_path / "whole")
    chunked = explain(folder, [str(tmp_path / "test")], method="occlusion", out=tmp_path / "chunked",
                      config=dataclasses.replace(EXPLAIN, chunk=2))
    assert [r["map"] for r in chunked["images"]] == [r["map"] for r in whole["images"]]
    assert len({r["map"] for r in chunked["images"]}) == 5
    for row in whole["images"]:
        assert (tmp_path / "whole" / row["map"]).read_bytes() == (tmp_path / "chunked" / row["map"]).read_bytes()


def test_errors_are_one_line(trained, tmp_path):
    folder, model, images, labels, _ = trained
    paths = write_images(tmp_path / "flat", images[:1], labels[:1], labelled=False)
    runner = CliRunner()
    for args, words in [([str(folder), str(paths[0]), "--class", "purple"], "not one of the run's classes"),
                        ([str(tmp_path / "flat"), str(paths[0])], "not found"),
                        ([str(folder), str(tmp_path / "missing.png")], "not found")]:
        result = runner.invoke(cli, ["explain", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert result.output.strip().count("\n") == 0


def test_api_refuses_unknown_method_and_non_run(trained, tmp_path):
    from finetune_cli import api

    folder, *_ = trained
    with pytest.raises(SettingsError, match="--method"):
        api.explain(folder, [str(tmp_path)], method="lime")
    with pytest.raises(ModelFileError):
        api.explain(tmp_path, [str(tmp_path)])
