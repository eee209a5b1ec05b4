"""Outputs: which run a command reads, and how every command writes (the "output" items of the reliability issue).

- item 5:  test_item5_last_is_the_last_finished_run_and_every_reader_names_it (predict, evaluate, report,
           diagnose, export, explain; a folder named ./last)
- item 6:  test_item6_two_exports_without_out_get_two_folders (two threads),
           test_item6_two_pretrains_without_out_get_two_encoders (two real processes)
- item 7:  test_item7_an_existing_out_is_refused_unless_overwrite (explain, attack, audit, patches, filters),
           test_item7_overwrite_replaces_the_gallery_as_a_whole_and_keeps_foreign_files,
           test_item7_a_failed_audit_or_patches_removes_the_out_it_made
- item 10: test_item10_long_output_names_fit_the_name_limit (predict 246, export 250 characters),
           test_item10_a_full_disk_is_one_line_and_leaves_nothing (real 1 MB tmpfs: export, explain, attack)
- item 11: test_item11_sigterm_during_export_leaves_no_staging (real SIGTERM),
           test_item11_staging_of_a_dead_export_is_removed_at_the_next_start
- marker:  test_every_output_folder_carries_the_marker

Everything is real: files, tiny Keras models (32 px), signals and processes; the full-disk case mounts a
1 MB tmpfs (skipped, saying why, where mounting is not allowed).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import finetune_cli
from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import OUTPUT_MARKER
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.files import HOST
from tests.conftest import save_tiny_backbone

PACKAGE_ROOT = Path(finetune_cli.__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles) -> str:
    """Exit code 2, no traceback, one `Error: ` line (the last of stderr) naming each needle."""
    assert result.exit_code == 2, f"exit code {result.exit_code}:\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and sum(x.startswith("Error:") for x in lines) == 1, lines
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny backbone, a 3 x 8 image folder (32 px) and a finished linear run on them (do not modify)."""
    root = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
        tiny = save_tiny_backbone(root / "tiny.keras")
        shapes = make_shapes_folder(root / "shapes", per_class=8, size=32, seed=1)
        api.train(shapes, str(tiny), out=root / "run", image_size=32, similarity="similar", use_cache=False)
    return SimpleNamespace(root=root, tiny=tiny, shapes=shapes, run=root / "run")


# ---------------------------------------------------------------- item 5: `last` is the last finished run, named


def test_item5_last_is_the_last_finished_run_and_every_reader_names_it(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished, unfinished = tmp_path / "runs" / "shapes-1", tmp_path / "runs" / "shapes-2"
    shutil.copytree(world.run, finished)
    shutil.copytree(world.run, unfinished)
    (unfinished / "metrics.json").unlink()  # killed before its last file: not finished
    for run in (finished, unfinished):
        (run / "report.html").unlink()
    later = time.time() + 60
    os.utime(unfinished / "model.keras", (later, later))  # and its model is the newest
    readers = [("predict", world.shapes / "circle", "--model", "last"),
               ("evaluate", world.shapes, "--model", "last"),
               ("report", "last"), ("diagnose", "last"),
               ("export", "last", "--format", "keras", "--check-dir", world.shapes, "--out", tmp_path / "e"),
               ("explain", "last", world.shapes / "circle" / sorted(os.listdir(world.shapes / "circle"))[0],
                "--out", tmp_path / "x")]
    for args in readers:
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert f"run: {finished}" in result.stderr.splitlines(), (args[0], result.stderr)
    assert (finished / "report.html").is_file() and not (unfinished / "report.html").exists()
    (tmp_path / "last").mkdir()  # a real folder named last: `last` keeps its meaning, and says so
    result = invoke("predict", world.shapes / "circle", "--model", "last")
    assert result.exit_code == 0, result.output
    assert f"run: {finished}" in result.stderr and "./last" in result.stderr


# ---------------------------------------------------------------- item 6: never one default output for two commands


def test_item6_two_exports_without_out_get_two_folders(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    reports, errors = [], []

    def export():
        try:
            reports.append(api.export(run, format="keras", check_dir=world.shapes))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=export) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    outs = sorted(r["out"] for r in reports)
    assert outs == [str(run / "exports" / "keras-none-1"), str(run / "exports" / "keras-none-2")]
    for out in outs:
        assert sorted(os.listdir(out)) == sorted([OUTPUT_MARKER, "model.keras", "labels.json", "export.json"])
        assert json.loads((Path(out) / "export.json").read_text())["out"] == out


def test_item6_two_pretrains_without_out_get_two_encoders(tmp_path):
    raw = make_shapes_folder(tmp_path / "raw", per_class=8, size=16, seed=3)
    args = [sys.executable, "-m", "finetune_cli", "pretrain", "--unlabeled", str(raw), "--image-size", "16",
            "--code-size", "4", "--epochs", "1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    encoders = sorted(p.name for p in (tmp_path / "runs").glob("*.keras"))
    assert encoders == ["raw-encoder-1.keras", "raw-encoder-2.keras"], logs
    for name in encoders:  # each encoder whole, with its own companions
        encoder = tmp_path / "runs" / name
        assert encoder.stat().st_size > 0
        summary = json.loads(encoder.with_name(name.replace(".keras", ".pretrain.json")).read_text())
        assert summary["encoder"] == str(encoder.absolute())


# ---------------------------------------------------------------- item 7: an existing --out, refused or replaced


def _gallery_args(world, command: str) -> list:
    one = world.shapes / "circle" / sorted(os.listdir(world.shapes / "circle"))[0]
    base = ["--base", world.tiny, "--image-size", "32"]
    return {"explain": ["explain", world.run, one],
            "attack": ["attack", world.run, world.shapes, "--eps", "0,2", "--method", "fgsm"],
            "audit": ["audit", world.shapes, *base, "--no-cache"],
            "patches": ["patches", world.shapes, *base, "--layer", "s2_conv", "--units", "2", "--top", "2",
                        "--no-cache"],
            "filters": ["filters", *base, "--layer", "s2_conv", "--units", "2"]}[command]


@pytest.mark.parametrize("command", ["explain", "attack", "audit", "patches", "filters"])
def test_item7_an_existing_out_is_refused_unless_overwrite(world, tmp_path, command):
    out = tmp_path / "out"
    args = _gallery_args(world, command) + ["--out", out]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused = invoke(*args)
    assert_one_line_error(refused, str(out), "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # the same outputs, no staging left


def test_item7_overwrite_replaces_the_gallery_as_a_whole_and_keeps_foreign_files(world, tmp_path):
    out = tmp_path / "gallery"
    circles = sorted((world.shapes / "circle").iterdir())
    first = invoke("explain", world.run, world.shapes / "circle", "--out", out)
    assert first.exit_code == 0, first.output
    assert len(os.listdir(out / "maps")) == len(circles)
    again = invoke("explain", world.run, circles[0], "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert len(os.listdir(out / "maps")) == 1  # the old maps are gone, not mixed with the new one
    assert len(json.loads((out / "explain.json").read_text())["images"]) == 1
    (out / "notes.txt").write_text("mine")
    page = (out / "index.html").read_bytes()
    refused = invoke("explain", world.run, circles[:2][-1], "--out", out, "--overwrite")
    assert_one_line_error(refused, "notes.txt", "not written by")
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.html").read_bytes() == page


@pytest.mark.parametrize("command", ["audit", "patches"])
def test_item7_a_failed_audit_or_patches_removes_the_out_it_made(world, tmp_path, command):
    (tmp_path / "FILE").write_text("x")
    args = [a for a in _gallery_args(world, command) if a != "--no-cache"]
    out = tmp_path / "out"
    failed = invoke(*args, "--cache-dir", tmp_path / "FILE" / "sub", "--out", out)
    assert_one_line_error(failed)
    assert not out.exists(), sorted(os.listdir(out))


# ---------------------------------------------------------------- item 10: names within the limit, full disks


def test_item10_long_output_names_fit_the_name_limit(world, tmp_path):
    csv = tmp_path / ("p" * 242 + ".csv")  # 246 characters: a legal name
    predicted = invoke("predict", world.shapes / "circle", "--model", world.run, "--out", csv)
    assert predicted.exit_code == 0, predicted.output
    assert csv.is_file() and len(csv.read_text().splitlines()) == 9
    folder = tmp_path / ("e" * 250)
    exported = invoke("export", world.run, "--format", "keras", "--check-dir", world.shapes, "--out", folder)
    assert exported.exit_code == 0, exported.output
    assert (folder / "model.keras").is_file()
    assert sorted(os.listdir(tmp_path)) == sorted([csv.name, folder.name])  # no temporary or staging names left


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB tmpfs, nearly filled: 8 KB stay free (a marker fits, a model or a map does not)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a 1 MB tmpfs is not allowed here (needs root, outside a restricted container): "
                    f"{done.stderr.decode(errors='replace').strip()[:120]}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        os.ftruncate(fd, os.fstat(fd).st_size - 8192)
        os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("command", ["export", "explain", "attack"])
def test_item10_a_full_disk_is_one_line_and_leaves_nothing(world, small_disk, command):
    out = small_disk / "out"
    args = {"export": ["export", world.run, "--format", "keras", "--check-dir", world.shapes],
            "explain": ["explain", world.run, world.shapes / "circle"],
            "attack": ["attack", world.run, world.shapes, "--eps", "0,2", "--method", "fgsm"]}[command]
    result = invoke(*args, "--out", out)
    assert_one_line_error(result, str(out), "No space left on device", "free some space")
    assert sorted(os.listdir(small_disk)) == ["filler"]  # no partial maps, no staging, no empty --out


# ---------------------------------------------------------------- item 11: staging of a killed export


def test_item11_a_sigterm_a_library_rewraps_still_ends_as_an_interrupt():
    """TensorFlow turns an exception raised while a tf.function binds its inputs into its own TypeError; a
    SIGTERM landing there must still end the command as an interrupt (exit 130), not a traceback."""
    from finetune_cli.files import sigterm_as_interrupt

    def library_call():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt as exc:
            raise TypeError(f"Binding inputs to tf.function failed due to `{exc}`") from None

    with pytest.raises(KeyboardInterrupt, match="signal 15") as caught:
        with sigterm_as_interrupt():
            library_call()
    assert isinstance(caught.value.__cause__, TypeError)
    with pytest.raises(TypeError):  # without a signal, the library's own error is left as it is
        with sigterm_as_interrupt():
            raise TypeError("a real bug")


def test_item11_sigterm_during_export_leaves_no_staging(world, tmp_path):
    out, log = tmp_path / "exported", tmp_path / "export.log"
    args = [sys.executable, "-m", "finetune_cli", "export", str(world.run), "--format", "keras", "--check-dir",
            str(world.shapes), "--out", str(out)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(args, env=cli_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(f".{out.name}.~") for n in os.listdir(tmp_path)):
            assert proc.poll() is None, f"export ended before staging:\n{log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 130 and "Traceback" not in text, (code, text)
    assert sorted(os.listdir(tmp_path)) == ["export.log"], text  # neither staging nor a half-made --out


def test_item11_staging_of_a_dead_export_is_removed_at_the_next_start(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "exports").mkdir()
    dead = run / "exports" / f".keras-none-1.~{HOST}.{dead_pid()}~abcd1234.staging"
    live = run / "exports" / f".keras-none-9.~{HOST}.{os.getpid()}~abcd1234.staging"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"13 MB of a model")
    beside = tmp_path / f".mine.~{HOST}.{dead_pid()}~abcd1234.staging"  # left beside an explicit --out
    beside.mkdir()
    report = api.export(run, format="keras", check_dir=world.shapes)
    assert not dead.exists() and live.is_dir(), "a dead export's staging must go, a live one's stay"
    api.export(run, format="keras", check_dir=world.shapes, out=tmp_path / "mine")
    assert not beside.exists()
    assert Path(report["out"]).name == "keras-none-1"


# ---------------------------------------------------------------- the output marker


def test_every_output_folder_carries_the_marker(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = api.train(world.shapes, str(world.tiny), image_size=32, similarity="similar", use_cache=False)
    run = Path(metrics["run_folder"])
    assert run == (tmp_path / "runs" / "shapes-1").absolute()
    exported = Path(api.export(run, format="keras", check_dir=world.shapes)["out"])
    gallery = Path(api.explain(run, [str(world.shapes / "circle")])["out"])
    for folder in (tmp_path / "runs", run, run / "exports", exported, gallery):
        assert (folder / OUTPUT_MARKER).is_file(), folder
    assert json.loads((gallery / OUTPUT_MARKER).read_text()) == {"tool": "finetune", "command": "explain"}
    empty = tmp_path / "marked"  # a folder holding only the marker is empty: a run may use it
    empty.mkdir()
    (empty / OUTPUT_MARKER).write_text("{}")
    api.train(world.shapes, str(world.tiny), out=empty, image_size=32, similarity="similar", use_cache=False)
    assert (empty / "metrics.json").is_file()


def test_a_search_folder_holding_only_the_marker_starts_a_new_search(tmp_path):
    """A tune folder a killed process left with only its marker is empty, not 'another search'."""
    from finetune_cli.tasks.tune.files import TuneFolder

    folder = tmp_path / "search"
    folder.mkdir()
    (folder / OUTPUT_MARKER).write_text("tune\n")
    opened = TuneFolder.open(folder, tmp_path)
    assert opened.path == folder.absolute()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(finetune_cli.errors.OutputError, match="not a search"):
        TuneFolder.open(folder, tmp_path)
