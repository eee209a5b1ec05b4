"""`finetune filters`: gradient-ascent pictures really excite their unit; DeepDream amplifies the layer."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.runtime.keras import import_keras
from tests.browser import assert_page_reads, requires_browser

HAS_BROWSER = not requires_browser.args[0]  # else the page checks are left out, as @requires_browser skips


def save_centred_backbone(path):
    """A small conv net on raw [0, 255] pixels, centred first (grey is 0), three ReLU convs."""
    keras = import_keras()
    keras.utils.set_random_seed(11)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c3")(x)
    keras.Model(inputs, x).save(path)
    return path


def layer_means(base, layer, images):
    keras = import_keras()
    model = keras.models.load_model(base)
    maps = np.asarray(keras.Model(model.input, model.get_layer(layer).output)(images.astype(np.float32)))
    return maps.mean(axis=(1, 2))


def test_ascent_pictures_excite_their_units_far_more_than_random_images(tmp_path):
    base = save_centred_backbone(tmp_path / "net.keras")
    result = api.filters(str(base), layer="c3", units=4, image_size=32, out=tmp_path / "f")
    assert [u["unit"] for u in result["units"]] == [0, 1, 2, 3]  # the first units
    pictures = np.asarray(Image.open(result["files"]["grid"]).convert("RGB"))
    assert pictures.shape[0] > 32
    random = np.random.default_rng(5).uniform(0, 255, (16, 32, 32, 3))
    baseline = layer_means(base, "c3", random).mean(axis=0)
    for u in result["units"]:
        assert u["activation"] >= 3 * baseline[u["unit"]] and u["activation"] > 0, (u, baseline)


def test_dream_amplifies_the_layer(tmp_path, shapes):
    base = save_centred_backbone(tmp_path / "net.keras")
    photo = sorted(shapes.rglob("*.jpg"))[0]
    result = api.filters(str(base), layer="c2", units=2, image_size=32, dream=photo, out=tmp_path / "f")
    dreamed = np.asarray(Image.open(result["files"]["dream"]).convert("RGB"), np.float32)
    original = np.asarray(Image.open(photo).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    before, after = layer_means(base, "c2", np.stack([original, dreamed])).mean(axis=1)
    assert after > 1.5 * before
    if HAS_BROWSER:  # the page: grid, one picture per unit, the dream
        assert_page_reads(result["files"]["html"], least_images=1 + 2 + 1)


def test_filter_errors_are_one_line(tmp_path):
    base = str(save_centred_backbone(tmp_path / "net.keras"))
    runner = CliRunner()
    for args, words in ((["--layer", "missing"], "finetune layers --base"),
                        (["--layer", "c1", "--unit-ids", "8"], "unit 8 is out of range"),
                        (["--layer", "c1", "--dream", str(tmp_path / "net.keras")], "cannot be used")):
        result = runner.invoke(cli, ["filters", "--base", base, "--image-size", "32", "--out", str(tmp_path / "o"),
                                     *args])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    neither = runner.invoke(cli, ["filters", "--layer", "1"])
    assert neither.exit_code == 2 and "exactly one of --base" in neither.output
