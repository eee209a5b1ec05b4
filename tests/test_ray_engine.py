"""`--engine ray`: a real two-node Ray cluster on this machine, the same rows as the local engine.

The cluster tests are marked `ray` (deselected by default; run with `-m ray`): the cluster costs ~10 s to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.errors import FolderError, SettingsError
from finetune_cli.scale import ray_data as ray_engine
from tests.conftest import save_tiny_backbone

OBJECT_STORE = 100 << 20


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each (a multi-node topology on one machine); torn down at the end."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 6 JPEGs of 32 px, plus two files that cannot be used."""
    from finetune_cli.data.synthetic import make_shapes_folder

    root = make_shapes_folder(tmp_path_factory.mktemp("ray") / "shapes", per_class=6, size=32, seed=3)
    (root / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "square" / "notes.jpg").write_bytes(b"just text\n")
    return root


@pytest.fixture(scope="module")
def trained_run(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    base = save_tiny_backbone(folder / "tiny.keras")
    api.train(images, str(base), out=folder / "run", image_size=32, strategy="linear",
              cache_dir=folder / "cache")
    return folder / "run"


def sorted_by_path(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def assert_same_rows(local: pd.DataFrame, sharded: pd.DataFrame) -> None:
    local, sharded = sorted_by_path(local), sorted_by_path(sharded)
    assert list(sharded.columns) == list(local.columns)
    assert len(sharded) == len(local) > 0
    numbers = local.select_dtypes("number").columns
    for column in local.columns:
        if column in numbers:
            np.testing.assert_allclose(sharded[column].to_numpy(float), local[column].to_numpy(float),
                                       rtol=1e-4, atol=1e-5, err_msg=column)
        else:
            assert sharded[column].tolist() == local[column].tolist(), column


@pytest.mark.ray
def test_extract_features_on_two_nodes_equals_the_local_table(cluster, images, tmp_path):
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    local, _ = api.extract_features(images, str(base), image_size=32, layer=2, use_cache=False)
    seen = []
    table, skipped = api.extract_features(images, str(base), image_size=32, layer=2, out=tmp_path / "feats",
                                          engine="ray", address=cluster.address, workers=2, batch_size=5,
                                          progress=lambda done, total: seen.append((done, total)))
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    assert manifest == table
    assert manifest["rows"] == len(local.records) == 18
    assert manifest["engine"]["nodes"] == 2 and manifest["engine"]["workers"] == 2
    assert [s["file"] for s in manifest["shards"]] == sorted(p.name for p in (tmp_path / "feats").glob("part-*"))
    assert sorted(s.path for s in skipped) == ["circle/broken.jpg", "square/notes.jpg"]
    assert {s.reason for s in skipped} >= {"not an image: a text file"}
    assert seen[-1] == (20, 20)
    frame = ray_engine.read_output(tmp_path / "feats")
    expected = pd.DataFrame(local.features, columns=[f"f{i}" for i in range(local.features.shape[1])])
    expected.insert(0, "label", [r.label for r in local.records])
    expected.insert(0, "path", [r.path for r in local.records])
    assert manifest["columns"] == list(expected.columns)
    assert_same_rows(expected, frame)


@pytest.mark.ray
def test_predict_on_two_nodes_equals_the_local_frame_from_a_list_file_and_a_uri(cluster, images, trained_run,
                                                                             tmp_path):
    local, local_skipped = api.predict([images / "circle", images / "square"], trained_run, top_k=2, tta=2)
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# what to predict\n{images / 'circle'}\n")
    manifest, skipped = api.predict([str(listing), f"file://{images / 'square'}"], trained_run, top_k=2, tta=2,
                                    out=tmp_path / "preds", engine="ray", address=cluster.address, workers=2)
    frame = ray_engine.read_output(tmp_path / "preds")
    frame["path"] = frame["path"].str.replace("file://", "", regex=False)
    assert_same_rows(local, frame)
    assert manifest["model"] == str(trained_run) and manifest["rows"] == len(local) == 12
    assert len(skipped) == len(local_skipped) == 2


@pytest.mark.ray
def test_a_killed_worker_costs_a_retry_not_the_job(cluster, images, tmp_path):
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    local, _ = api.extract_features(images, str(base), image_size=32, use_cache=False)
    marker = tmp_path / "died-once"
    ref = __import__("finetune_cli.models.backbones", fromlist=["resolve"]).resolve(str(base), "imagenet", 32)
    manifest, _ = ray_engine.extract_features(images, ref, out=str(tmp_path / "feats"), address=cluster.address,
                                              settings=_settings(workers=2, batch_size=4),
                                              worker=_dies_once(str(marker)))
    assert marker.read_text() == "died"
    assert manifest["rows"] == 18
    frame = ray_engine.read_output(tmp_path / "feats")
    np.testing.assert_allclose(sorted_by_path(frame).filter(like="f").to_numpy(),
                               local.features[np.argsort([r.path for r in local.records], kind="stable")],
                               rtol=1e-4, atol=1e-5)


def _settings(**changes):
    from dataclasses import replace

    from finetune_cli.config import SCALE

    return replace(SCALE, **changes)


def _dies_once(marker: str):
    """A ShardWriter whose process exits (a real death, no exception) on the first batch any actor gets."""

    class DiesOnce(ray_engine.ShardWriter):
        def __call__(self, batch):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().__call__(batch)
            os.write(fd, b"died")
            os.close(fd)
            os._exit(1)

    return DiesOnce


@pytest.mark.ray
def test_an_existing_output_folder_is_refused_and_overwrite_replaces_only_our_files(cluster, images, tmp_path):
    base = str(save_tiny_backbone(tmp_path / "tiny.keras"))
    out = tmp_path / "feats"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    runner = CliRunner()
    args = ["extract-features", str(images), "--base", base, "--image-size", "32", "--engine", "ray",
            "--address", cluster.address, "--out", str(out)]
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(cli, args + extra)
        assert result.exit_code == 2 and result.output.startswith("Error: --out"), result.output
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "18 rows" in first.output and "2 files skipped" in first.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "not empty" in again.output
    assert runner.invoke(cli, args + ["--overwrite"]).exit_code == 0
    assert len(ray_engine.read_output(out)) == 18


@pytest.mark.ray
def test_inputs_with_no_usable_image_are_an_error_and_the_manifest_lists_why(cluster, images, trained_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "page.png").write_bytes(b"<!DOCTYPE html><html></html>")
    with pytest.raises(FolderError, match="no usable images among the inputs"):
        api.predict([bad], trained_run, out=tmp_path / "preds", engine="ray", address=cluster.address, workers=1)
    manifest = json.loads((tmp_path / "preds" / "manifest.json").read_text())
    assert manifest["rows"] == 0 and manifest["shards"] == []
    assert [s["reason"] for s in manifest["skipped"]] == ["empty file (0 bytes)",
                                                          "not an image: an HTML page saved under an image name"]


@pytest.mark.ray
def test_an_unknown_layer_is_one_line_not_a_traceback(cluster, images, tmp_path):
    base = str(save_tiny_backbone(tmp_path / "tiny.keras"))
    result = CliRunner().invoke(cli, ["extract-features", str(images), "--base", base, "--image-size", "32",
                                      "--layer", "no_such_layer", "--engine", "ray", "--address", cluster.address,
                                      "--out", str(tmp_path / "feats")])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "Traceback" not in result.output


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_without_ray_installed_the_error_names_the_extra(engine, images, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from finetune_cli.cli import main\n"
            f"sys.argv = ['finetune', 'predict', {str(images)!r}, '--model', {str(tmp_path)!r}, "
            f"'--engine', {engine!r}, '--address', 'auto', '--out', {str(tmp_path / 'out')!r}]\n"
            "main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 2, result.stderr
    if engine == "ray":
        assert result.stderr.strip() == "Error: --engine ray needs Ray: pip install 'finetune-cli[ray]'"
    else:
        assert result.stderr.strip() == "Error: --address names a Ray cluster: use it with --engine ray"


def test_inputs_are_listed_from_folders_list_files_and_uris_without_reading_them(images, tmp_path):
    listing = tmp_path / "more.list"
    listing.write_text(f"# comment\n\n{images / 'circle' / 'broken.jpg'}\nfile://{images / 'square'}\n")
    items, roots = ray_engine.list_inputs([str(images / "triangle"), str(listing)], labelled=False)
    paths = [item["path"] for item in items]
    assert [item["index"] for item in items] == list(range(len(items)))
    assert paths[:6] == [str(images / "triangle" / f) for f in sorted(os.listdir(images / "triangle"))]
    assert paths[6] == str(images / "circle" / "broken.jpg")
    assert all(p.startswith(f"file://{images / 'square'}/") for p in paths[7:]) and len(paths) == 14
    assert roots == [f"file://{images / 'square'}"] and {item["fs"] for item in items[7:]} == {0}
    labelled, _ = ray_engine.list_inputs([str(images)], labelled=None, relative=True)
    remote, _ = ray_engine.list_inputs([f"file://{images}"], labelled=None)
    assert [(i["path"].split("/")[-2], i["label"]) for i in remote] == [(p["label"], p["label"]) for p in labelled]
    (images.parent / "loose").mkdir()
    (images.parent / "loose" / "cls").mkdir()
    (images.parent / "loose" / "stray.jpg").write_bytes(b"x")
    for where in (str(images.parent / "loose"), f"file://{images.parent / 'loose'}"):
        with pytest.raises(FolderError, match="beside the class folders"):
            ray_engine.list_inputs([where], labelled=None)
    with pytest.raises(FolderError, match="not found"):
        ray_engine.list_inputs([str(tmp_path / "nowhere")], labelled=False)


def test_an_unknown_engine_and_a_missing_out_are_settings_errors(images, tmp_path):
    with pytest.raises(SettingsError, match="Expected --engine local or ray"):
        api.predict([images], tmp_path, engine="spark")
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with pytest.raises(SettingsError, match="give --out FOLDER"):
        api.extract_features(images, "tiny", engine="ray")
