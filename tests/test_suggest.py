"""What to label next: the acquisition methods, and `finetune suggest` end to end with its refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.analysis.acquisition import badge, choose, cluster_margin, distances_to, margins
from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import SettingsError


def pool_with_a_crowd(seed: int = 0):
    """30 images: 10 near-copies of one very uncertain image, 20 others spread out and less uncertain."""
    rng = np.random.default_rng(seed)
    crowd = np.tile(rng.normal(size=16), (10, 1)) + 0.01 * rng.normal(size=(10, 16))
    spread = rng.normal(size=(20, 16)) * 3
    probs = np.vstack([np.tile([0.5, 0.49, 0.01], (10, 1)),
                       np.column_stack([np.linspace(0.6, 0.9, 20), np.linspace(0.35, 0.05, 20), np.full(20, 0.05)])])
    return probs, np.vstack([crowd, spread])


def test_margin_takes_the_crowd_and_cluster_margin_takes_one_of_it():
    probs, features = pool_with_a_crowd()
    assert margins(probs)[:10] == pytest.approx(0.01)
    assert set(choose("margin", probs, features, 5)[0]) <= set(range(10))  # five near-copies
    picked = cluster_margin(probs, features, 5)
    assert len(picked) == 5 and len(set(picked) & set(range(10))) == 1
    assert list(picked) == sorted(picked, key=lambda i: margins(probs)[i])  # most uncertain first


def test_badge_distances_are_the_gradient_embeddings_and_its_picks_are_distinct():
    probs, features = pool_with_a_crowd(1)
    a = probs.copy()
    a[np.arange(len(a)), probs.argmax(1)] -= 1
    x = np.hstack([features, np.ones((len(features), 1))])
    g = np.einsum("ik,id->ikd", a, x).reshape(len(a), -1)  # the embeddings BADGE never builds
    lengths = (g * g).sum(1)
    assert distances_to(a, x, lengths, 3) == pytest.approx(((g - g[3]) ** 2).sum(1), abs=1e-9)
    rows, gaps = badge(probs, features, 8, seed=0)
    assert len(set(rows)) == 8 and rows[0] == np.argmax(lengths) and gaps[0] == pytest.approx(lengths.max())
    assert len(set(rows) & set(range(10))) <= 2  # the crowd is one place in gradient space
    with pytest.raises(ValueError, match="unknown method"):
        choose("entropy", probs, features, 3)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def folders(tmp_path):
    labelled = make_shapes_folder(tmp_path / "labelled", per_class=6, size=32, seed=1)
    raw = make_shapes_folder(tmp_path / "raw-src", per_class=5, size=32, seed=2)
    pool = tmp_path / "raw"
    pool.mkdir()
    for path in sorted(p for p in raw.rglob("*.jpg")):  # a flat folder: what an unlabeled pool looks like
        shutil.copy2(path, pool / f"{path.parent.name}-{path.name}")
    shutil.copy2(next(labelled.rglob("*.jpg")), pool / "already-labelled.png")  # left out, by content
    return labelled, pool


def test_suggest_writes_a_ranked_csv_a_gallery_and_copies_to_label(tmp_path, tiny_base, folders):
    labelled, pool = folders
    out, copy = tmp_path / "suggested", tmp_path / "to-label"
    result = invoke("suggest", labelled, "--unlabeled", pool, "--base", tiny_base, "--n", 4, "--out", out,
                    "--copy-to", copy, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["n_pool"] == 15 and found["n_left_out"] == 1 and found["method"] == "cluster-margin"
    rows = list(csv.DictReader((out / "suggest.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4] and len({r["path"] for r in rows}) == 4
    assert all("already-labelled" not in r["path"] and r["predicted"] in ("circle", "square", "triangle")
               for r in rows)
    assert [float(r["margin"]) for r in rows] == sorted(float(r["margin"]) for r in rows)
    assert sorted(p.name.split("-", 1)[1] for p in copy.iterdir()) == sorted(r["path"].rsplit("/", 1)[1] for r in rows)
    assert (out / "index.html").read_text().count("<img") == 4


def test_suggest_refuses_an_empty_pool_a_bad_count_and_a_full_copy_folder_in_one_line(tmp_path, tiny_base, folders):
    labelled, pool = folders
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy2(next(labelled.rglob("*.jpg")), copies / "a.png")
    result = invoke("suggest", labelled, "--unlabeled", copies, "--base", tiny_base, "--out", tmp_path / "o1")
    assert result.exit_code == 2 and "no unlabeled images to rank (1 are already in" in result.output
    assert not (tmp_path / "o1").exists()  # nothing half-written
    result = invoke("suggest", labelled, "--unlabeled", pool, "--base", tiny_base, "--copy-to", copies)
    assert result.exit_code == 2 and "already holds files" in result.output and "Traceback" not in result.output
    result = invoke("suggest", labelled, "--unlabeled", pool, "--n", 0)
    assert result.exit_code == 2 and "--n" in result.output
    with pytest.raises(SettingsError, match="--base .* or --model RUN"):
        api.suggest(labelled, None, unlabeled=pool)
