"""`finetune audit`: planted label errors rank first, a copied file is leakage, the JSON contract, the gallery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune_cli.cli import cli
from finetune_cli.config import AUDIT
from finetune_cli.tasks.audit import label_scores, robust_z
from tests.browser import assert_page_reads, requires_browser

HAS_BROWSER = not requires_browser.args[0]  # else the page checks are left out, as @requires_browser skips

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
FLIPS = {"red/red_03.png": "green", "blue/blue_05.png": "red"}


@pytest.fixture
def colours(tmp_path):
    """3 colour classes x 12 noisy 32 px PNGs; two files moved into a wrong class (FLIPS).

    Returns (root, {moved path relative to root: true class}).
    """
    root, rng = tmp_path / "colours", np.random.default_rng(4)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    moved = {}
    for rel, wrong in FLIPS.items():
        target = root / wrong / rel.split("/")[1]
        (root / rel).rename(target)
        moved[target.relative_to(root).as_posix()] = rel.split("/")[0]
    return root, moved


def test_label_scores_and_robust_z_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    score, suggested = label_scores(probs, np.array([0, 1]))
    assert np.allclose(score, [0.2 - 0.7, 0.6 - 0.3]) and list(suggested) == [1, 2]
    z = robust_z(np.array([1.0, 1.1, 0.9, 1.0, 0.2]))
    assert z[-1] > 5 and abs(z[0]) < 1e-9


def test_flipped_labels_rank_first_and_a_copy_is_leakage(colours, tiny_base, tmp_path):
    root, moved = colours
    val = tmp_path / "val" / "red"
    val.mkdir(parents=True)
    shutil.copy(root / "red" / "red_07.png", val / "copied.png")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(val / "grey.png")
    (val / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(cli, ["audit", str(root), "--base", str(tiny_base), "--image-size", "32",
                                      "--val-dir", str(tmp_path / "val"), "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert set(info) >= {"folder", "base", "images", "counts", "findings", "skipped", "settings", "files"}
    assert info["images"] == {"train": 36, "val": 2}
    assert [s["path"].rsplit("/", 1)[1] for s in info["skipped"]] == ["broken.png"]  # skipped and listed
    labels = [f for f in info["findings"] if f["kind"] == "label"]
    top = {f["path"].split("colours/")[1]: f["suggested_label"] for f in labels[: len(moved)]}
    assert top == moved  # the planted errors first, each with its true class suggested
    leaks = [f for f in info["findings"] if f["kind"] == "leakage"]
    assert leaks[0]["score"] == pytest.approx(1.0)
    assert {leaks[0]["path"].rsplit("/", 1)[1], leaks[0]["other_path"].rsplit("/", 1)[1]} == {"red_07.png", "copied.png"}
    assert info["counts"] == {k: sum(f["kind"] == k for f in info["findings"]) for k in info["counts"]}
    for finding in info["findings"]:
        assert set(finding) == {"kind", "path", "other_path", "given_label", "suggested_label", "score"}
    rows = (tmp_path / "a" / "audit.csv").read_text().splitlines()
    assert rows[0] == "kind,path,other_path,given_label,suggested_label,score" and len(rows) == 1 + len(info["findings"])
    if HAS_BROWSER:  # the gallery: one thumbnail per finding (at most max_shown a kind), all load
        shown = sum(min(n, AUDIT.max_shown) for n in info["counts"].values())
        seen = assert_page_reads(info["files"]["html"], least_images=shown)
        assert "Possible label errors" in seen.text and "Leakage" in seen.text


def test_inspect_points_at_audit(colours, tiny_base):
    root, _ = colours
    result = CliRunner().invoke(cli, ["inspect", str(root), "--base", str(tiny_base), "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "possible label errors" in result.stdout and f"finetune audit {root} --base" in result.stdout


def test_inspect_of_a_large_folder_only_points_at_audit(colours, tiny_base, monkeypatch):
    import dataclasses

    import finetune_cli.cli as cli_module

    root, _ = colours
    monkeypatch.setattr(cli_module, "AUDIT", dataclasses.replace(AUDIT, inspect_max_images=3))
    result = CliRunner().invoke(cli, ["inspect", str(root), "--base", str(tiny_base), "--image-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["audit"] is None
    text = CliRunner().invoke(cli, ["inspect", str(root), "--base", str(tiny_base), "--image-size", "32"]).stdout
    assert "possible label errors" not in text and f"`finetune audit {root} --base" in text


def test_audit_errors_are_one_line(tmp_path, tiny_base):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["audit", str(empty), "--base", str(tiny_base)])
    assert result.exit_code == 2 and result.output.startswith("Error:") and "Traceback" not in result.output
