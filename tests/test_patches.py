"""`finetune patches`: receptive-field arithmetic, and crops that really are each unit's strongest."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.data.images import decode_rgb, read_image_file
from finetune_cli.models.backbones import build, resolve
from finetune_cli.models.receptive import receptive_field
from finetune_cli.runtime.keras import import_keras
from tests.browser import assert_page_reads, requires_browser

HAS_BROWSER = not requires_browser.args[0]  # else the page checks are left out, as @requires_browser skips


def small_stack():
    """32 px -> ZeroPadding(1) -> 3x3 valid -> 3x3 s2 same -> 3x3 dilation 2 valid -> 2x2 average pool, linear.

    By hand (size, jump, centre of unit 0), pixel i spanning [i, i+1):
        input (1, 1, 0.5); padding (1, 1, -0.5); conv (3, 1, 0.5); conv s2 same on 32 (pad left 0) -> 16:
        (5, 2, 1.5); conv d2 (span 5) -> 12: (13, 2, 5.5); pool 2 -> 6: (15, 4, 6.5).
    """
    keras = import_keras()
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ZeroPadding2D(1)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="valid")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="valid")(x)
    x = keras.layers.AveragePooling2D(2, name="pooled")(x)
    return keras.Model(inputs, x)


def test_receptive_field_matches_hand_arithmetic_and_the_gradient():
    import tensorflow as tf

    model = small_stack()
    field = receptive_field(model, "pooled")
    assert field.size == (15, 15) and field.jump == (4, 4) and field.start == (6.5, 6.5) and field.grid == (6, 6)
    assert field.box(0, 0, 32) == (0, 0, 14, 14)  # centre 6.5 +- 7.5, clipped at the top/left border
    assert field.box(2, 3, 32) == (7, 11, 22, 26)
    image = tf.Variable(np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        unit = model(image)[0, 2, 3, 1]
    seen = np.abs(tape.gradient(unit, image).numpy()[0]).sum(-1) > 1e-9
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (7, 11, 22, 26)


def test_receptive_field_refuses_an_unsupported_layer():
    from finetune_cli.errors import BackboneError

    keras = import_keras()
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Resizing(8, 8, name="squash")(inputs)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    with pytest.raises(BackboneError, match="squash.*Resizing"):
        receptive_field(keras.Model(inputs, x), "conv")


def test_patches_are_each_units_strongest_images(shapes, tiny_base, tmp_path):
    result = api.patches(shapes, str(tiny_base), layer="s2_conv", units=3, top=4, image_size=32, out=tmp_path / "p")
    keras = import_keras()
    model = keras.models.load_model(tiny_base)
    layer_model = keras.Model(model.input, model.get_layer("s2_conv").output)
    paths = sorted(p for p in shapes.rglob("*.jpg"))
    images = np.stack([decode_rgb(read_image_file(p, 1 << 24), 1 << 24, (255, 255, 255), 32) for p in paths])
    maps = np.asarray(layer_model(images.astype(np.float32)))
    peak = maps.max(axis=(1, 2))
    expected_units = list(np.argsort(-peak.mean(0), kind="stable")[:3])
    assert [u["unit"] for u in result["units"]] == expected_units  # the most active units
    rel = [p.relative_to(shapes).as_posix() for p in paths]
    field = receptive_field(build(resolve(str(tiny_base), image_size=32)).model, "s2_conv")
    for unit in result["units"]:
        chosen = [rel.index(p["path"]) for p in unit["patches"]]
        others = [i for i in range(len(paths)) if i not in chosen]
        got = [p["activation"] for p in unit["patches"]]
        assert np.allclose(got, peak[chosen, unit["unit"]], rtol=1e-4, atol=1e-5)
        assert min(got) >= peak[others, unit["unit"]].max() - 1e-5
        for p, i in zip(unit["patches"], chosen):
            assert maps[i, p["y"], p["x"], unit["unit"]] == pytest.approx(peak[i, unit["unit"]], rel=1e-4, abs=1e-5)
            assert p["box"] == list(field.box(p["y"], p["x"], 32))
    assert (tmp_path / "p" / "patches.csv").read_text().count("\n") == 1 + 3 * 4
    if HAS_BROWSER:  # the page: every crop loads, no console errors
        assert_page_reads(result["files"]["html"], least_images=1 + 3 * 4)


def test_bad_layer_and_unit_are_one_line_errors(shapes, tiny_base, tmp_path):
    runner = CliRunner()
    bad_layer = runner.invoke(cli, ["patches", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                    "--layer", "nope", "--out", str(tmp_path / "o")])
    assert bad_layer.exit_code == 2 and "finetune layers --base" in bad_layer.output
    assert "Traceback" not in bad_layer.output
    bad_unit = runner.invoke(cli, ["patches", str(shapes), "--base", str(tiny_base), "--image-size", "32",
                                   "--layer", "s1_conv", "--unit-ids", "2,4", "--out", str(tmp_path / "o")])
    assert bad_unit.exit_code == 2 and "unit 4 is out of range" in bad_unit.output and "0 to 3" in bad_unit.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(cli, ["patches", str(empty), "--base", str(tiny_base), "--layer", "1"])
    assert nothing.exit_code == 2 and nothing.output.startswith("Error:")
