"""Hostile state: foreign folders, damaged run files, real interruptions, unwritable outputs.

Every test reproduces one item of the reliability issue (numbers as in the issue):

- item 1:   test_cache_clear_refuses_a_folder_it_did_not_write_item1 (--cache-dir and $FINETUNE_CACHE_DIR),
            test_cache_clear_keeps_foreign_files_item1, test_cache_with_a_corrupt_meta_json_still_works_item1,
            test_cache_clear_through_a_symlink_item1
- item 2:   test_resume_after_real_sigint_ends_with_the_best_weights_item2 (real SIGINT),
            test_resume_of_a_completed_run_changes_nothing_item2
- item 3:   test_nan_model_is_never_saved_item3
- item 4:   test_labels_json_is_not_trusted_blindly_item4 (reversed, a string, a duplicate, a dict, null)
- item 5:   test_predict_refuses_to_overwrite_item5, test_extract_features_refuses_to_overwrite_before_work_item5
- item 10:  test_resume_refuses_what_changed_or_broke_and_leaves_the_run_alone_item10
            (image size, extra class, renamed class, other recipe, truncated plan.json,
            garbage state.json, truncated checkpoint.keras)
- item 11:  test_unwritable_feature_table_fails_before_extraction_item11 (/proc, /sys),
            test_predict_to_an_unwritable_file_item11, test_file_size_limit_leaves_no_file_item11 (real ulimit -f),
            test_unusable_cache_dir_is_one_line_item11 (/sys/..., FILE/sub)
- item 16:  test_failed_train_leaves_its_out_reusable_item16a, test_sigkill_then_resume_leaves_no_hidden_files_item16b
            (real SIGKILL), test_resume_removes_stale_temp_files_of_dead_processes_only_item16c,
            test_pretrain_checks_its_out_before_training_item16d
- item 17a: test_sigkilled_extraction_keeps_what_was_done_item17a (real SIGKILL)

The contract: a user mistake exits 2 with one `Error: ...` line on stderr, never a traceback.

The three tests that start a real process and signal it take 10-15 s each; they run by default,
since a real signal is the point. Item 4's "string" case writes "abc", a
string as long as the class list, so that a length check alone cannot catch it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

import finetune_cli
from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import OUTPUT_MARKER
from finetune_cli.data.synthetic import make_shapes_folder
from tests.conftest import Recorder, save_tiny_backbone

PACKAGE_ROOT = Path(finetune_cli.__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles):
    """Exit code 2, no traceback, stderr ending in exactly one `Error: ` line that names each needle."""
    if isinstance(result, tuple):
        code, err = result
        everything = err
    else:
        code, err, everything = result.exit_code, result.stderr, result.output
    assert code == 2, f"exit code {code}, expected 2:\n{everything}"
    assert "Traceback" not in everything, everything
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), f"last stderr line is not 'Error: ...':\n{err}"
    assert sum(line.startswith("Error:") for line in lines) == 1, err
    words = lambda text: text.lower().replace("-", " ")  # noqa: E731  "--image-size" names "image size" too
    for needle in needles:
        assert words(needle) in words(lines[-1]), f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def write_recipe(path: Path, **fields) -> Path:
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + "\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def entries(cache: Path) -> list[Path]:
    """Finished feature-cache entries (temporary files start with a dot)."""
    return [p for p in cache.rglob("*.f32") if not p.name.startswith(".")] if cache.exists() else []


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def start_cli(log: Path, *args, **popen) -> subprocess.Popen:
    """`python -m finetune_cli ARGS` in a subprocess, stdout and stderr into `log`.

    The child gets the default SIGINT disposition and an unblocked SIGINT: a
    test suite started in the background (`cmd &` in a script) inherits SIGINT
    ignored, and a runner may start it with SIGINT blocked in its signal mask
    (which survives fork and exec); either way Python would never raise
    KeyboardInterrupt, so Ctrl-C could not be tested.
    """
    extra = popen.pop("preexec_fn", None)

    def prepare():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if extra is not None:
            extra()

    with open(log, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "finetune_cli", *map(str, args)], env=cli_env(),
                                stdout=sink, stderr=subprocess.STDOUT, preexec_fn=prepare, **popen)


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str, log: Path):
    """Poll `condition` while `proc` runs; fail if it exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the process exited (rc {proc.returncode}) before {what}:\n{log.read_text(errors='replace')}")
        time.sleep(0.005)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def cross_entropy(model, folder: Path, classes: list[str], size: int = 32) -> float:
    """Mean cross-entropy of `model` on a labelled folder, as the training loop measures validation loss."""
    from finetune_cli.data.scan import scan_folder
    from finetune_cli.models.inference import probabilities

    scan = scan_folder(folder, labelled=True)
    probs, ok = probabilities(model, scan, size)
    assert ok.all()
    truth = np.array([classes.index(r.label) for r in scan.images])
    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-7, 1.0)).mean())


def slow_png_folder(root: Path, per_class: int = 67, side: int = 1024) -> Path:
    """3 classes of distinct PNG files that are small on disk but slow to decode (side x side pixels).

    One image per class is compressed once; each copy gets its own tEXt chunk, so every file has its
    own content hash (its own cache entry) at no cost. Decoding 1 M pixels per image makes the
    forward pass take far longer than writing the cache entries does.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    for k, name in enumerate(("circle", "square", "triangle")):
        image = Image.new("RGB", (side, side), (40 + 60 * k, 90, 200 - 50 * k))
        ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(250, 250, 10 * k))
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        data = buffer.getvalue()
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            tag = chunk(b"tEXt", b"Comment\x00" + f"{name} {i}".encode())
            (folder / f"{name}_{i:03d}.png").write_bytes(data[:33] + tag + data[33:])  # after IHDR
    return root


# ---------------------------------------------------------------- shared runs (built once per module)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny backbone and a 3 x 8 image folder shared by the module's runs (do not modify, or restore)."""
    root = tmp_path_factory.mktemp("hostile")
    return SimpleNamespace(
        root=root,
        tiny=save_tiny_backbone(root / "tiny.keras"),
        shapes=make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1),
    )


@pytest.fixture(scope="module")
def linear_run(world):
    """A finished linear run folder, trained through the CLI."""
    out = world.root / "linear-run"
    result = invoke("train", world.shapes, "--base", world.tiny, "--image-size", "32", "--similarity", "similar",
                    "--out", out, "--cache-dir", world.root / "cache-linear")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def interrupted_run(world):
    """A partial fine-tuning run (4 epochs planned) interrupted after epoch 2; copy it before use."""
    out = world.root / "interrupted-run"
    recipe = write_recipe(world.root / "recipe.toml", strategy="partial", unfreeze_stages=2, epochs=4,
                          batch_size=8, patience=5, augmentation="light")

    with pytest.raises(KeyboardInterrupt):
        api.train(world.shapes, str(world.tiny), out=out, image_size=32, recipe=str(recipe), similarity="similar",
                  cache_dir=world.root / "cache-interrupted", reporter=Recorder(stop_at_epoch=2))
    assert json.loads((out / "state.json").read_text())["epoch"] == 2
    return out


def resume_args(world, run, *extra):
    return ["train", world.shapes, "--base", world.tiny, "--image-size", "32", "--out", run, "--resume", *extra]


# ---------------------------------------------------------------- item 1: cache clear deletes only what the cache wrote


@pytest.mark.parametrize("given_by", ["--cache-dir", "FINETUNE_CACHE_DIR"])
def test_cache_clear_refuses_a_folder_it_did_not_write_item1(tmp_path, monkeypatch, given_by):
    user = tmp_path / "u"
    (user / "docs").mkdir(parents=True)
    thesis = user / "docs" / "thesis.txt"
    thesis.write_text("x\n")
    if given_by == "--cache-dir":
        result = invoke("cache", "clear", "--cache-dir", user)
    else:
        monkeypatch.setenv("FINETUNE_CACHE_DIR", str(user))
        result = invoke("cache", "clear")
    assert_user_error(result, "not a finetune feature cache")
    assert thesis.read_text() == "x\n"


def extract_into(world, cache: Path, out: Path, *extra):
    result = invoke("extract-features", world.shapes, "--base", world.tiny, "--image-size", "32", "--out", out,
                    "--cache-dir", cache, *extra)
    assert result.exit_code == 0, result.output
    return result


def cache_entries_reported(cache) -> int:
    result = invoke("cache", "info", "--cache-dir", cache, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["entries"]


def test_cache_clear_keeps_foreign_files_item1(world, tmp_path):
    cache = tmp_path / "C"
    extract_into(world, cache, tmp_path / "f.csv")
    assert (cache / "CACHEDIR.TAG").is_file()
    mine = cache / "mine.txt"
    mine.write_text("my notes")
    result = invoke("cache", "clear", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert mine.read_text() == "my notes"
    assert cache_entries_reported(cache) == 0 and not entries(cache)


def test_cache_with_a_corrupt_meta_json_still_works_item1(world, tmp_path):
    cache = tmp_path / "C"
    extract_into(world, cache, tmp_path / "avg.csv")
    extract_into(world, cache, tmp_path / "max.csv", "--pooling", "max")
    metas = sorted(cache.glob("*/meta.json"))
    assert len(metas) == 2
    metas[0].write_bytes(b"{trunc")
    info = invoke("cache", "info", "--cache-dir", cache, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["entries"] >= 24  # the intact namespace at least
    plain = invoke("cache", "info", "--cache-dir", cache)
    assert plain.exit_code == 0, plain.output
    cleared = invoke("cache", "clear", "--cache-dir", cache)
    assert cleared.exit_code == 0, cleared.output
    assert not entries(cache)


def test_cache_clear_through_a_symlink_item1(world, tmp_path):
    cache = tmp_path / "C"
    extract_into(world, cache, tmp_path / "f.csv")
    link = tmp_path / "link"
    link.symlink_to(cache, target_is_directory=True)
    result = invoke("cache", "clear", "--cache-dir", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and cache.is_dir() and link.resolve() == cache.resolve()
    assert not entries(cache) and cache_entries_reported(cache) == 0


# ---------------------------------------------------------------- item 2: --resume ends with the best weights


def test_resume_after_real_sigint_ends_with_the_best_weights_item2(shapes, tiny_base, tmp_path):
    # The validation folder holds the same classes with their pictures permuted (circle/ holds squares...):
    # the better the model fits the training shapes, the worse the validation loss, so the best epoch is an
    # early one, before the interruption, and never the last.
    source = make_shapes_folder(tmp_path / "val-source", per_class=4, size=32, seed=11)
    val = tmp_path / "val"
    for name, pictures in {"circle": "square", "square": "triangle", "triangle": "circle"}.items():
        shutil.copytree(source / pictures, val / name)
    # 30 short epochs: the interruption after epoch 3 lands long before the end however fast the machine
    recipe = write_recipe(tmp_path / "r.toml", strategy="partial", unfreeze_stages=2, learning_rate=0.01,
                          epochs=30, patience=30, batch_size=8)
    run, log = tmp_path / "run", tmp_path / "train.log"

    def epoch_done():
        try:
            return json.loads((run / "state.json").read_text())["epoch"] >= 3
        except (OSError, ValueError):
            return False

    # --no-calibrate: the saved model must be the best epoch's itself, not a tempered copy
    proc = start_cli(log, "train", shapes, "--base", tiny_base, "--image-size", "32", "--similarity", "similar",
                     "--recipe", recipe, "--val-dir", val, "--out", run, "--no-calibrate", "--no-pilot")
    try:
        wait_for(epoch_done, proc, 120, "epoch 3 was checkpointed", log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text(errors="replace")
    finally:
        stop(proc)
    assert json.loads((run / "state.json").read_text())["epoch"] < 30 and not (run / "metrics.json").exists()

    resumed = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--val-dir", val, "--out", run,
                     "--resume", "--no-calibrate")
    assert resumed.exit_code == 0, resumed.output
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 31))
    best_epoch = int(history["epoch"][history["val_loss"].idxmin()])
    assert best_epoch != 30, f"precondition: the best epoch must not be the last\n{history}"
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == best_epoch

    from finetune_cli.runtime.keras import import_keras

    model = import_keras().saving.load_model(run / "model.keras")
    classes = json.loads((run / "labels.json").read_text())
    assert cross_entropy(model, val, classes) == pytest.approx(history["val_loss"].min(), rel=1e-3)


def test_resume_of_a_completed_run_changes_nothing_item2(world, interrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    first = invoke(*resume_args(world, run))
    assert first.exit_code == 0, first.output
    model, metrics = (run / "model.keras").read_bytes(), (run / "metrics.json").read_bytes()
    time.sleep(1.1)  # a rewrite would carry a new save time
    again = invoke(*resume_args(world, run))
    assert again.exit_code == 0, again.output
    assert "finished" in again.output.lower()
    assert hashlib.sha256((run / "model.keras").read_bytes()).hexdigest() == hashlib.sha256(model).hexdigest()
    assert (run / "metrics.json").read_bytes() == metrics


# ---------------------------------------------------------------- item 3: a NaN model is never saved


def nan_recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "nan.toml", strategy="partial", learning_rate=1e300, epochs=1)


def test_nan_model_is_never_saved_item3(shapes, tiny_base, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--similarity", "similar",
                    "--recipe", nan_recipe(tmp_path), "--out", run)
    assert_user_error(result, "learning rate")
    assert not (run / "model.keras").exists()


# ---------------------------------------------------------------- item 4: labels.json is checked


LABEL_EDITS = {
    "reversed": lambda names: list(reversed(names)),
    "string": lambda names: "abc",  # as many characters as the model has outputs
    "duplicate": lambda names: [names[0], names[0], names[2]],
    "dict": lambda names: {str(i): n for i, n in enumerate(names)},
    "null": lambda names: None,
}


@pytest.mark.parametrize("edit", list(LABEL_EDITS))
def test_labels_json_is_not_trusted_blindly_item4(world, linear_run, tmp_path, edit):
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    labels = run / "labels.json"
    original = labels.read_bytes()
    names = json.loads(original)
    assert names == ["circle", "square", "triangle"]
    labels.write_text(json.dumps(LABEL_EDITS[edit](names)))
    image = world.shapes / "circle" / "circle_000.jpg"
    assert_user_error(invoke("predict", image, "--model", run), "labels.json")
    assert_user_error(invoke("evaluate", world.shapes, "--model", run), "labels.json")
    labels.write_bytes(original)
    restored = invoke("predict", image, "--model", run)
    assert restored.exit_code == 0, restored.output


# ---------------------------------------------------------------- item 5: no silent overwrite


def test_predict_refuses_to_overwrite_item5(world, linear_run, tmp_path):
    existing = tmp_path / "existing.csv"
    existing.write_bytes(b"my,own\n1,2\n")
    image = world.shapes / "circle" / "circle_000.jpg"
    assert_user_error(invoke("predict", image, "--model", linear_run, "--out", existing), "--overwrite")
    assert existing.read_bytes() == b"my,own\n1,2\n"
    replaced = invoke("predict", image, "--model", linear_run, "--out", existing, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert len(pd.read_csv(existing)) == 1 and "predicted" in pd.read_csv(existing).columns


def test_extract_features_refuses_to_overwrite_before_work_item5(world, tmp_path):
    keep = tmp_path / "keep.csv"
    keep.write_bytes(b"precious\n")
    cache = tmp_path / "fresh-cache"
    args = ["extract-features", world.shapes, "--image-size", "32", "--out", keep, "--cache-dir", cache]
    assert_user_error(invoke(*args, "--base", world.tiny), "--overwrite")
    assert keep.read_bytes() == b"precious\n"
    assert not entries(cache)  # refused before extracting anything
    slow = tmp_path / "slow.keras"
    slow.write_bytes(b"PK\x03\x04" + b"\x00" * 4096)
    refused = invoke(*args, "--base", slow)
    assert refused.exit_code == 2 and keep.read_bytes() == b"precious\n"
    replaced = invoke(*args, "--base", world.tiny, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert len(pd.read_csv(keep)) == 24


# ---------------------------------------------------------------- item 10: --resume checks what changed


def _other_image_size(world, run, tmp_path):
    return ["train", world.shapes, "--base", world.tiny, "--image-size", "40", "--out", run, "--resume"], None


def _extra_class(world, run, tmp_path):
    make_shapes_folder(world.shapes, classes=("ring",), per_class=3, size=32, seed=5)
    return resume_args(world, run), lambda: shutil.rmtree(world.shapes / "ring")


def _renamed_class(world, run, tmp_path):
    (world.shapes / "triangle").rename(world.shapes / "triangles")
    return resume_args(world, run), lambda: (world.shapes / "triangles").rename(world.shapes / "triangle")


def _other_recipe(world, run, tmp_path):
    other = write_recipe(tmp_path / "other.toml", strategy="partial", unfreeze_stages=2, epochs=5, batch_size=8,
                         patience=5, augmentation="light")
    return resume_args(world, run, "--recipe", other), None


def _damage(name, data=None):
    def damage(world, run, tmp_path):
        path = run / name
        path.write_bytes(data if data is not None else path.read_bytes()[: path.stat().st_size // 2])
        return resume_args(world, run), None

    return damage


RESUME_CASES = {
    "image-size": (_other_image_size, ["image size"]),
    "extra-class": (_extra_class, ["classes"]),
    "renamed-class": (_renamed_class, ["classes"]),
    "other-recipe": (_other_recipe, ["recipe"]),
    "truncated-plan": (_damage("plan.json"), []),
    "garbage-state": (_damage("state.json", b"\x00\xffnot json{"), []),
    "truncated-checkpoint": (_damage("checkpoint.keras"), []),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refuses_what_changed_or_broke_and_leaves_the_run_alone_item10(world, interrupted_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    change, needles = RESUME_CASES[case]
    args, undo = change(world, run, tmp_path)
    try:
        before = snapshot(run)
        result = invoke(*args)
        after = snapshot(run)
    finally:
        if undo:
            undo()
    assert_user_error(result, *needles)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    assert [name for name in before if before[name] != after[name]] == []


# ---------------------------------------------------------------- item 11: write failures are one line, found early


@pytest.mark.parametrize("target", ["/proc/nope.csv", "/sys/nope.csv"])
def test_unwritable_feature_table_fails_before_extraction_item11(world, tmp_path, target):
    cache = tmp_path / "fresh-cache"
    result = invoke("extract-features", world.shapes, "--base", world.tiny, "--image-size", "32", "--out", target,
                    "--cache-dir", cache)
    assert_user_error(result)
    assert not entries(cache), "features were extracted before the output was found unwritable"


def test_predict_to_an_unwritable_file_item11(world, linear_run):
    result = invoke("predict", world.shapes / "circle", "--model", linear_run, "--out", "/proc/x.csv")
    assert_user_error(result)


def test_file_size_limit_leaves_no_file_item11(shapes, tiny_base, tmp_path):
    import resource

    folder = tmp_path / "out"
    folder.mkdir()
    log = tmp_path / "log.txt"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # noqa: E731
    proc = start_cli(log, "extract-features", shapes, "--base", tiny_base, "--image-size", "32", "--no-cache",
                     "--out", folder / "f.csv", preexec_fn=limit)
    try:
        code = proc.wait(timeout=180)
    finally:
        stop(proc)
    assert_user_error((code, log.read_text(errors="replace")))
    assert os.listdir(folder) == []  # neither f.csv nor a temporary file beside it


@pytest.mark.parametrize("where", ["/sys/finetune-cache", "FILE/sub"])
def test_unusable_cache_dir_is_one_line_item11(world, tmp_path, where):
    if where.startswith("FILE"):
        (tmp_path / "FILE").write_text("a regular file")
        where = str(tmp_path / where)
    out = tmp_path / "f.csv"
    result = invoke("extract-features", world.shapes, "--base", world.tiny, "--image-size", "32", "--out", out,
                    "--cache-dir", where)
    assert_user_error(result)
    assert not out.exists()


# ---------------------------------------------------------------- item 16: no leftovers


def test_failed_train_leaves_its_out_reusable_item16a(shapes, tiny_base, tmp_path):
    run = tmp_path / "run"
    failed = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--similarity", "similar",
                    "--recipe", nan_recipe(tmp_path), "--out", run)
    assert_user_error(failed, "learning rate")
    again = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--similarity", "similar",
                   "--out", run)
    assert again.exit_code == 0, again.output
    assert (run / "model.keras").is_file()


def test_sigkill_then_resume_leaves_no_hidden_files_item16b(shapes, tiny_base, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", strategy="partial", unfreeze_stages=2, epochs=30, patience=30,
                          batch_size=8)  # long enough that the kill always lands before the end
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = start_cli(log, "train", shapes, "--base", tiny_base, "--image-size", "32", "--similarity", "similar",
                     "--recipe", recipe, "--out", run)
    try:
        wait_for(lambda: (run / "state.json").exists(), proc, 120, "RUN/state.json appeared", log)
        # Most hostile moment: while a checkpoint is being written (a temporary file exists), else soon.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not any(n.startswith(".") and n != OUTPUT_MARKER
                                                      for n in os.listdir(run)):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    finally:
        stop(proc)
    resumed = invoke("train", shapes, "--base", tiny_base, "--image-size", "32", "--out", run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "model.keras").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != OUTPUT_MARKER] == []


def test_resume_removes_stale_temp_files_of_dead_processes_only_item16c(world, interrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    dead = run / f".checkpoint.keras.~{host}.{finished.pid}~abcd.keras"
    live = run / f".checkpoint.keras.~{host}.{os.getpid()}~abcd.keras"
    dead.write_bytes(b"half a model")
    live.write_bytes(b"being written")
    result = invoke(*resume_args(world, run))
    assert "Traceback" not in result.output
    assert not dead.exists(), "the temporary file of a dead process was left behind"
    assert live.read_bytes() == b"being written", "the temporary file of a live process was touched"


def test_pretrain_checks_its_out_before_training_item16d(tmp_path):
    unlabeled = make_shapes_folder(tmp_path / "raw", per_class=10, size=24, seed=3)
    result = invoke("pretrain", "--unlabeled", unlabeled, "--out", "/proc/enc.keras", "--image-size", "16",
                    "--code-size", "8", "--epochs", "2")
    assert_user_error(result, "cannot write")
    assert "reconstruction loss" not in result.output  # refused before the first epoch


# ---------------------------------------------------------------- item 17a: an interrupted extraction keeps its work


def test_sigkilled_extraction_keeps_what_was_done_item17a(tiny_base, tmp_path):
    folder = slow_png_folder(tmp_path / "images")  # 201 images
    cache, log = tmp_path / "C", tmp_path / "extract.log"
    args = ["extract-features", folder, "--base", tiny_base, "--image-size", "32", "--batch-size", "4",
            "--cache-dir", cache, "--out", tmp_path / "f.csv"]
    proc = start_cli(log, *args)
    try:
        wait_for(lambda: entries(cache), proc, 120, "the first cache entry was written", log)
        # Entries must appear as batches finish, not in one burst after the whole pass: a moment after the
        # first one the pass is still running (writing all 201 entries takes well under this pause).
        time.sleep(0.3)
        assert proc.poll() is None, "the extraction finished: its entries were written only at the end"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    rerun = invoke(*args)
    assert rerun.exit_code == 0, rerun.output
    counts = re.search(r"(\d+) computed, (\d+) from cache", rerun.output)
    assert counts, rerun.output
    computed, cached = map(int, counts.groups())
    assert computed + cached == 201
    assert cached > 0, "nothing done before the kill was kept"
    assert computed > 0, "the kill came after the whole pass: entries were not written as batches finished"
