"""`finetune inspect` through Click: exit codes, the JSON contract, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from finetune_cli.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_inspect_json_contract(messy):
    root, expected = messy
    (root / "good" / "dup.jpg").write_bytes((root / "odd ünïcode" / "cmyk.jpg").read_bytes())
    result = run("inspect", str(root), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    kept = sorted(k for k, v in expected.items() if v == "keep") + ["good/dup.jpg"]
    assert info["n_images"] == len(kept)
    assert {c["name"]: c["count"] for c in info["classes"]} == {"good": 4, "odd ünïcode": 11}
    skipped = {s["path"] for s in info["skipped"]}
    assert skipped == {k for k, v in expected.items() if v != "keep"}
    assert info["duplicates"] == [["good/dup.jpg", "odd ünïcode/cmyk.jpg"]]
    assert any("label conflict" in w for w in info["warnings"])
    assert info["size_category"] == "small"


def test_inspect_tables(shapes):
    result = run("inspect", str(shapes))
    assert result.exit_code == 0
    assert "24 usable images in 3 classes" in " ".join(result.stdout.split())
    assert "triangle" in result.stdout


def test_folder_fault_is_one_line_exit_2(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.txt").write_text("x")
    result = run("inspect", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_missing_folder_exit_2(tmp_path):
    result = run("inspect", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_python_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "finetune_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("finetune, version ")


def test_inspect_with_base_shows_similarity_and_plan(shapes, tiny_base):
    result = run("inspect", str(shapes), "--json", "--base", str(tiny_base), "--image-size", "32")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["plan"]["strategy"] == "linear"  # 8 per class: small, either cell is linear
    assert set(info["similarity"]["stage_accuracy"]) == {"1", "2", "3"}
    text = run("inspect", str(shapes), "--base", str(tiny_base), "--image-size", "32")
    assert "plan: linear" in " ".join(text.stdout.split())
