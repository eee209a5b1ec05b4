"""Feature extraction and its cache: hits, misses, invalidation, corruption, formats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.errors import OutputError


def test_extract_then_cache_hit_then_changed_file(shapes, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    first, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    assert first.computed == 24 and first.features.shape == (24, 16)
    second, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    assert second.computed == 0
    np.testing.assert_array_equal(first.features, second.features)

    # new content under an old name: only that file recomputes
    from tests.conftest import jpeg_bytes

    (shapes / "circle" / "circle_000.jpg").write_bytes(jpeg_bytes((32, 32), (9, 99, 199)))
    third, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    assert third.computed == 1
    assert not np.allclose(third.features[0], first.features[0])
    np.testing.assert_array_equal(third.features[1:], first.features[1:])

    # a copy of a cached image under a new name costs nothing: keys are content
    (shapes / "circle" / "copy.jpg").write_bytes((shapes / "square" / "square_003.jpg").read_bytes())
    fourth, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    assert fourth.computed == 0 and len(fourth.records) == 25


def test_cache_key_separates_layer_pooling_size_and_weights(shapes, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    for kwargs in ({"layer": 2}, {"pooling": "max"}, {"image_size": 40}, {"weights": "none"}):
        options = {"image_size": 32, **kwargs}
        table, _ = api.extract_features(shapes, str(tiny_base), cache_dir=cache, **options)
        assert table.computed == 24, kwargs
    assert api.extract_features(shapes, str(tiny_base), image_size=32, layer=2, cache_dir=cache)[0].features.shape[1] == 8
    assert len(api.cache_info(cache)["namespaces"]) == 5


def test_corrupt_cache_entry_is_recomputed(shapes, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    first, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    entry = next(cache.glob("*/*/*.f32"))
    entry.write_bytes(entry.read_bytes()[:-3] + b"xyz")
    second, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache)
    assert second.computed == 1
    np.testing.assert_allclose(first.features, second.features, rtol=1e-5)


def test_no_cache_writes_nothing(shapes, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=cache, use_cache=False)
    assert api.cache_info(cache)["entries"] == 0


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_output_formats(shapes, tiny_base, tmp_path, suffix):
    out = tmp_path / f"features{suffix}"
    table, _ = api.extract_features(shapes, str(tiny_base), image_size=32, out=out)
    if suffix == ".npz":
        data = np.load(out)
        paths, labels, features = list(data["path"]), list(data["label"]), data["features"]
    else:
        frame = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
        assert list(frame.columns[:3]) == ["path", "label", "f0"] and frame.shape == (24, 18)
        paths, labels, features = list(frame["path"]), list(frame["label"]), frame.iloc[:, 2:].to_numpy()
    assert paths[0] == "circle/circle_000.jpg" and labels[0] == "circle"
    np.testing.assert_allclose(features, table.features, rtol=1e-5)


def test_bad_output_extension_fails_before_work(shapes, tiny_base, tmp_path):
    with pytest.raises(OutputError, match="extension must be one of"):
        api.extract_features(shapes, str(tiny_base), out=tmp_path / "f.xlsx")


def test_flat_unlabeled_folder_has_empty_labels(shapes, tiny_base):
    table, scan = api.extract_features(shapes / "circle", str(tiny_base), image_size=32)
    assert not scan.labelled and {r.label for r in table.records} == {""}


def test_cli_extract_and_cache_commands(shapes, tiny_base, tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "c")
    out = tmp_path / "f.csv"
    args = ["extract-features", str(shapes), "--base", str(tiny_base), "--image-size", "32", "--out", str(out), "--cache-dir", cache]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "24 images x 16 features" in first.output and "24 computed" in first.output
    assert "0 computed, 24 from cache" in runner.invoke(cli, args + ["--overwrite"]).output
    info = json.loads(runner.invoke(cli, ["cache", "info", "--cache-dir", cache, "--json"]).output)
    assert info["entries"] == 24
    assert "removed 24" in runner.invoke(cli, ["cache", "clear", "--cache-dir", cache]).output
    bad = runner.invoke(cli, ["extract-features", str(shapes), "--base", "vgg61", "--out", str(tmp_path / "g.csv")])
    assert bad.exit_code == 2 and bad.output.startswith("Error: unknown backbone")
    layers = runner.invoke(cli, ["layers", "--base", str(tiny_base), "--image-size", "32", "--json"])
    assert [row["name"] for row in json.loads(layers.output)] == ["s1_conv", "s2_conv", "s3_conv"]


def test_an_older_untagged_cache_is_adopted_and_a_mixed_folder_is_not(shapes, tiny_base, tmp_path):
    from finetune_cli.errors import OutputError

    old = tmp_path / "old-cache"
    api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=old)
    (old / "CACHEDIR.TAG").unlink()  # as a cache from before the tag existed
    next(old.glob("*/meta.json")).unlink()  # and with a namespace that lost its meta.json
    table, _ = api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=old)
    assert table.computed == 0 and (old / "CACHEDIR.TAG").is_file()
    mixed = tmp_path / "mixed"
    (mixed / "0123456789abcdef01234567").mkdir(parents=True)
    (mixed / "thesis.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a finetune feature cache"):
        api.extract_features(shapes, str(tiny_base), image_size=32, cache_dir=mixed)
    assert not (mixed / "CACHEDIR.TAG").exists() and (mixed / "thesis.txt").read_text() == "mine"


def test_an_augmented_view_depends_on_the_content_not_the_path(shapes, tmp_path):
    """Views are cached under the file's content hash, so a copy elsewhere must get the same crop;
    a different image gets its own."""
    from finetune_cli.data.pipeline import batched_images

    files = sorted(shapes.rglob("*.jpg"))
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    copy.write_bytes(files[0].read_bytes())
    (views, _), = list(batched_images([files[0], copy, files[1]], 32, 8, view=3))
    views = views.numpy()
    np.testing.assert_array_equal(views[0], views[1])
    assert not np.array_equal(views[0], views[2])
