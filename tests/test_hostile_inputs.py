"""Hostile inputs: odd file names, special files, oversized or mismatched bases, bad recipe and model files.

Every user mistake or bad input must give exit code 2 and one ``Error: ...`` line on
stderr, never a traceback; every input that is merely unusual must just work.
Each test reproduces one item of the hostile-inputs issue:

  6.  file names that are not valid UTF-8
        test_item6_inspect_counts_non_utf8_name
        test_item6_extract_features_escapes_non_utf8_name
        test_item6_train_uses_non_utf8_name
        test_item6_predict_escapes_non_utf8_name
  7.  FIFOs and symlinks to /dev/zero among the images (subprocess: old code hangs / eats memory)
        test_item7_inspect_skips_fifo_and_dev_zero
        test_item7_predict_skips_fifo_given_directly
  8.  a .keras base declaring a 30000 x 30000 input (subprocess with a memory rlimit)
        test_item8_extract_features_refuses_huge_input_base
        test_item8_inspect_refuses_huge_input_base
  9.  a fixed-size (32 px) file base used with --image-size 64
        test_item9_extract_features_fixed_size_base_mismatch
        test_item9_train_fixed_size_base_mismatch
        test_item9_inspect_fixed_size_base_mismatch
  12. a recipe file that is not UTF-8
        test_item12_recipe_not_utf8
  13. a run folder whose model.keras is a backbone, not a classifier
        test_item13_predict_refuses_non_classifier_model
        test_item13_evaluate_refuses_non_classifier_model
  14. single-class folders and single-image classes for evaluate / extract-features
        test_item14_extract_features_single_class_folder
        test_item14_evaluate_single_class_folder
        test_item14_evaluate_class_with_one_image
  15. predict over a good folder and a folder of garbage
        test_item15_predict_skips_garbage_folder
  17b. a truncated .keras file
        test_item17b_extract_features_truncated_base
        test_item17b_predict_truncated_run_model
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from tests.conftest import jpeg_bytes, save_tiny_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_NAME = b"caf\xe9.jpg"  # latin-1 e-acute: not valid UTF-8
SHOWN = "caf\\xe9.jpg"  # how it must be displayed: backslash, x, e, 9


# ---------------------------------------------------------------- helpers


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(stderr: str, output: str, exit_code: int, exception=None) -> str:
    """The user-error contract: exit 2, exactly one 'Error: ' line on stderr, no traceback."""
    assert exit_code == 2, (output, exception)
    assert "Traceback" not in output, output
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_user_error(result, *words, tmp_path=None):
    line = error_line(result.stderr, result.output, result.exit_code, result.exception)
    if tmp_path is not None:  # numbers must come from the message, not from the temp folder's name
        line = line.replace(str(tmp_path), "<tmp>")
    for word in words:
        assert word in line, line
    return line


def assert_ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output


def cli_process(*args, timeout=120, mem_bytes=8 << 30):
    """`python -m finetune_cli ARGS` in a real process, memory-capped, with a deadline.

    Runs the code of the checkout this test file lives in. A hang or runaway counts as a failure.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    try:
        return subprocess.run(
            [sys.executable, "-m", "finetune_cli", *[str(a) for a in args]],
            capture_output=True, text=True, errors="backslashreplace", timeout=timeout,
            env=env, cwd=str(REPO_ROOT), preexec_fn=limit, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`finetune {' '.join(map(str, args))}` did not finish within {timeout} s")


def add_bad_name(folder: Path, data: bytes) -> bytes:
    path = os.path.join(os.fsencode(folder), BAD_NAME)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shapes folder, tiny backbone file, run folder) trained once for the module on 3 classes x 8."""
    root = tmp_path_factory.mktemp("trained")
    shapes = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
    base = save_tiny_backbone(root / "tiny.keras")
    out = root / "run"
    result = run("train", shapes, "--base", base, "--image-size", 32, "--out", out, "--no-cache")
    assert result.exit_code == 0, result.output
    return shapes, base, out


# ---------------------------------------------------------------- item 6: non-UTF-8 file names


def test_item6_inspect_counts_non_utf8_name(shapes):
    # a byte copy of circle_000.jpg: usable, and listed among duplicates so its displayed name shows
    add_bad_name(shapes / "circle", (shapes / "circle" / "circle_000.jpg").read_bytes())
    text = run("inspect", shapes)
    assert_ok(text)
    assert "25 usable images" in " ".join(text.stdout.split())
    result = run("inspect", shapes, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert info["n_images"] == 25
    assert {c["name"]: c["count"] for c in info["classes"]}["circle"] == 9
    assert info["skipped"] == []
    shown = {path for group in info["duplicates"] for path in group}
    assert f"circle/{SHOWN}" in shown, info["duplicates"]


def test_item6_extract_features_escapes_non_utf8_name(shapes, tiny_base, tmp_path):
    add_bad_name(shapes / "circle", jpeg_bytes((32, 32), (10, 200, 30)))
    out = tmp_path / "f.csv"
    result = run("extract-features", shapes, "--base", tiny_base, "--image-size", 32, "--out", out)
    assert_ok(result)
    text = out.read_text(encoding="utf-8")
    assert f"circle/{SHOWN}" in text
    frame = pd.read_csv(out)
    assert len(frame) == 25
    assert frame.loc[frame["path"] == f"circle/{SHOWN}", "label"].tolist() == ["circle"]


def test_item6_train_uses_non_utf8_name(shapes, tiny_base, tmp_path):
    add_bad_name(shapes / "circle", jpeg_bytes((32, 32), (10, 200, 30)))
    out = tmp_path / "run"
    result = run("train", shapes, "--base", tiny_base, "--image-size", 32, "--out", out)
    assert_ok(result)
    assert (out / "model.keras").is_file()
    assert "caf" not in (out / "skipped.csv").read_text(encoding="utf-8")  # it was used, not skipped


def test_item6_predict_escapes_non_utf8_name(trained, tmp_path):
    shapes, _, model = trained
    folder = tmp_path / "circle"
    shutil.copytree(shapes / "circle", folder)
    add_bad_name(folder, jpeg_bytes((32, 32), (10, 200, 30)))
    result = run("predict", folder, "--model", model)
    assert_ok(result)
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert len(frame) == 9
    assert any(str(p).endswith(SHOWN) for p in frame["path"]), frame["path"].tolist()


# ---------------------------------------------------------------- item 7: FIFOs and /dev/zero


def special_files(folder: Path):
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    (folder / "zero.jpg").symlink_to("/dev/zero")
    return fifo


def test_item7_inspect_skips_fifo_and_dev_zero(shapes):
    special_files(shapes / "square")
    proc = cli_process("inspect", shapes, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert info["n_images"] == 24
    reasons = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {"square/pipe.jpg", "square/zero.jpg"}, reasons
    for reason in reasons.values():
        assert "not a regular file" in reason


def test_item7_predict_skips_fifo_given_directly(trained, tmp_path):
    shapes, _, model = trained
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = [shapes / "circle" / "circle_000.jpg", shapes / "square" / "square_000.jpg"]
    proc = cli_process("predict", fifo, *good, "--model", model, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    frame = pd.read_csv(io.StringIO(proc.stdout))
    assert len(frame) == 2 and not any("pipe.jpg" in str(p) for p in frame["path"])
    assert "pipe.jpg" in proc.stderr


# ---------------------------------------------------------------- item 8: a base declaring a 30000 px input


def huge_input_base(path: Path) -> Path:
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    inputs = keras.Input((30000, 30000, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(2, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).save(path)  # symbolic: about 20 KB, no 30000 px tensor is ever made
    return path


def assert_process_user_error(proc, *words, tmp_path):
    line = error_line(proc.stderr, proc.stdout + proc.stderr, proc.returncode)
    line = line.replace(str(tmp_path), "<tmp>")
    for word in words:
        assert word in line, line


def test_item8_extract_features_refuses_huge_input_base(shapes, tmp_path):
    base = huge_input_base(tmp_path / "big.keras")
    proc = cli_process("extract-features", shapes, "--base", base, "--out", tmp_path / "f.csv",
                       timeout=120, mem_bytes=12 << 30)
    assert_process_user_error(proc, "30000", "2048", tmp_path=tmp_path)
    assert not (tmp_path / "f.csv").exists()


def test_item8_inspect_refuses_huge_input_base(shapes, tmp_path):
    base = huge_input_base(tmp_path / "big.keras")
    proc = cli_process("inspect", shapes, "--base", base, timeout=120, mem_bytes=12 << 30)
    assert_process_user_error(proc, "30000", "2048", tmp_path=tmp_path)


# ---------------------------------------------------------------- item 9: fixed-size base, other --image-size


@pytest.fixture
def fixed_base(tmp_path):
    return save_tiny_backbone(tmp_path / "fixed.keras", size=32)


def test_item9_extract_features_fixed_size_base_mismatch(shapes, fixed_base, tmp_path):
    result = run("extract-features", shapes, "--base", fixed_base, "--image-size", 64, "--out", tmp_path / "f.csv")
    assert_user_error(result, "32", "--image-size", tmp_path=tmp_path)
    # without --image-size the base's own size is used and all is well
    ok = run("extract-features", shapes, "--base", fixed_base, "--out", tmp_path / "g.csv")
    assert_ok(ok)
    assert len(pd.read_csv(tmp_path / "g.csv")) == 24


def test_item9_train_fixed_size_base_mismatch(shapes, fixed_base, tmp_path):
    result = run("train", shapes, "--base", fixed_base, "--image-size", 64, "--out", tmp_path / "run")
    assert_user_error(result, "32", "--image-size", tmp_path=tmp_path)
    assert not (tmp_path / "run" / "model.keras").exists()


def test_item9_inspect_fixed_size_base_mismatch(shapes, fixed_base, tmp_path):
    result = run("inspect", shapes, "--base", fixed_base, "--image-size", 64)
    assert_user_error(result, "32", "--image-size", tmp_path=tmp_path)


# ---------------------------------------------------------------- item 12: recipe not UTF-8


def test_item12_recipe_not_utf8(shapes, tiny_base, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b"learning_rate = 0.001\n# caf\xe9\n")
    result = run("train", shapes, "--base", tiny_base, "--image-size", 32, "--recipe", recipe,
                 "--out", tmp_path / "run")
    assert_user_error(result, "UTF-8")


# ---------------------------------------------------------------- item 13: model.keras is not a classifier


@pytest.fixture
def backbone_run(trained, tmp_path):
    """A copy of the trained run whose model.keras is the bare backbone (4-D feature-map output)."""
    _, base, model = trained
    out = tmp_path / "run"
    shutil.copytree(model, out)
    shutil.copyfile(base, out / "model.keras")
    return out


def test_item13_predict_refuses_non_classifier_model(trained, backbone_run):
    shapes = trained[0]
    result = run("predict", shapes / "circle" / "circle_000.jpg", "--model", backbone_run)
    assert_user_error(result, "not a classifier")


def test_item13_evaluate_refuses_non_classifier_model(trained, backbone_run):
    result = run("evaluate", trained[0], "--model", backbone_run)
    assert_user_error(result, "not a classifier")


# ---------------------------------------------------------------- item 14: one class, one image


def test_item14_extract_features_single_class_folder(shapes, tiny_base, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(shapes / "circle", single / "circle")
    out = tmp_path / "f.csv"
    result = run("extract-features", single, "--base", tiny_base, "--image-size", 32, "--out", out)
    assert_ok(result)
    frame = pd.read_csv(out)
    assert len(frame) == 8
    assert set(frame["label"]) == {"circle"}


def test_item14_evaluate_single_class_folder(trained, tmp_path):
    shapes, _, model = trained
    single = tmp_path / "single"
    shutil.copytree(shapes / "circle", single / "circle")
    result = run("evaluate", single, "--model", model, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert info["n_images"] == 8
    assert 0 <= info["accuracy"] <= 1


def test_item14_evaluate_class_with_one_image(trained, tmp_path):
    shapes, _, model = trained
    folder = tmp_path / "few"
    shutil.copytree(shapes / "circle", folder / "circle")
    (folder / "square").mkdir()
    shutil.copyfile(shapes / "square" / "square_000.jpg", folder / "square" / "square_000.jpg")
    result = run("evaluate", folder, "--model", model, "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["n_images"] == 9


# ---------------------------------------------------------------- item 15: predict over a garbage folder


def test_item15_predict_skips_garbage_folder(trained, tmp_path):
    shapes, _, model = trained
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x.jpg").write_text("just some text, not a picture\n")
    (garbage / "empty.jpg").write_bytes(b"")
    result = run("predict", shapes / "circle", garbage, "--model", model)
    assert_ok(result)
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert len(frame) == 8
    assert all("circle_00" in str(p) for p in frame["path"])
    assert "garbage" in result.stderr and "skip" in result.stderr.lower(), result.stderr


def test_predict_reads_a_list_file_and_refuses_a_uri_locally(trained, tmp_path):
    shapes, _, model = trained
    listing = tmp_path / "todo.txt"
    circles = sorted((shapes / "circle").iterdir())
    listing.write_text(f"# two circles and a folder\n{circles[0]}\n\n{circles[1]}\n{shapes / 'square'}\n")
    result = run("predict", listing, "--model", model)
    assert_ok(result)
    frame = pd.read_csv(io.StringIO(result.stdout))
    assert sorted(frame["path"]) == sorted(map(str, circles[:2] + sorted((shapes / "square").iterdir())))
    remote = tmp_path / "remote.lst"
    remote.write_text("s3://bucket/photo.jpg\n")
    assert_user_error(run("predict", remote, "--model", model), "s3://bucket/photo.jpg is a URI", "--engine ray")


# ---------------------------------------------------------------- item 17b: truncated .keras


def truncated_copy(source: Path, target: Path) -> Path:
    data = Path(source).read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_item17b_extract_features_truncated_base(shapes, tiny_base, tmp_path):
    base = truncated_copy(tiny_base, tmp_path / "half.keras")
    result = run("extract-features", shapes, "--base", base, "--image-size", 32, "--out", tmp_path / "f.csv")
    line = assert_user_error(result, "truncated or corrupt")
    assert "File not found" not in line


def test_item17b_predict_truncated_run_model(trained, tmp_path):
    shapes, _, model = trained
    out = tmp_path / "run"
    shutil.copytree(model, out)
    truncated_copy(model / "model.keras", out / "model.keras")
    result = run("predict", shapes / "circle" / "circle_000.jpg", "--model", out)
    line = assert_user_error(result, "truncated or corrupt")
    assert "File not found" not in line
