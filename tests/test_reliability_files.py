"""Crafted files, memory and messages: the last part of the reliability issue.

Every crafted file must be refused in one ``Error: ...`` line with exit code 2, cheaply, before
Keras (or any parser) spends memory on it; every message must say what is true for the command.

  8.  a .keras whose config.json is followed by 2 GB of spaces (a 2 MB zip bomb), and one whose header lies
        test_item8_zip_bomb_config_refused_fast_and_small
  9.  JSON nested 5,000 deep in the tool's files; recipes with inf, nan, negative stages, deep TOML
        test_item9_deeply_nested_json_is_one_line_naming_the_file
        test_item9_recipe_numbers_must_be_finite_and_named
        test_item9_recipe_feature_stage_must_be_a_positive_stage
  a.  distill's epoch lines name its loss
        test_itema_distill_epoch_lines_say_distillation_loss
  b.  the Ctrl-C line fits the command (real SIGINT to `finetune tune`)
        test_itemb_ctrl_c_message_fits_the_command
  c.  `cache info` / `cache clear` with FINETUNE_CACHE_DIR pointing at a file
        test_itemc_cache_dir_that_is_a_file_is_one_line_error
  d.  a cut-off row in trials.csv
        test_itemd_cut_off_trials_row_is_dropped_with_a_note
  e.  the wording of a search mismatch
        test_iteme_search_mismatch_message_reads_well
  f.  the batch is bounded by memory at large image sizes
        test_itemf_batch_bounded_by_memory
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli.cli import cli
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.errors import BackboneError, OutputError, RecipeError
from tests.conftest import Recorder, jpeg_bytes, save_tiny_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACES = 2047 << 20  # 2 GB less 1 MB: just under the plain-zip limit, no zip64 needed


# ---------------------------------------------------------------- helpers


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_error_line(result_or_stderr, exit_code=None, output="") -> str:
    """The user-error contract: exit 2, exactly one 'Error: ' line on stderr, no traceback."""
    if isinstance(result_or_stderr, str):
        stderr = result_or_stderr
    else:
        stderr, output, exit_code = result_or_stderr.stderr, result_or_stderr.output, result_or_stderr.exit_code
    assert exit_code == 2, (exit_code, output, stderr)
    assert "Traceback" not in output + stderr, output + stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def spaces_stream(head: bytes, n_spaces: int) -> tuple[bytes, int, int]:
    """(raw deflate stream, CRC-32, length) of `head` + n_spaces spaces (n_spaces a multiple of 1 MB).

    Each 1 MB of spaces is compressed once after a full flush, which resets the compressor's history, so
    every later megabyte compresses to the same bytes: a 2 GB member is written in a fraction of a second.
    """
    block = b" " * (1 << 20)
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = first.compress(head) + first.flush(zlib.Z_FULL_FLUSH)
    repeat = zlib.compressobj(9, zlib.DEFLATED, -15)
    middle = repeat.compress(block) + repeat.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15)
    final = end.compress(b"") + end.flush()
    crc = zlib.crc32(head)
    for _ in range(n_spaces >> 20):
        crc = zlib.crc32(block, crc)
    return start + middle * (n_spaces >> 20) + final, crc, len(head) + n_spaces


def write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A real zip archive from (name, stored bytes, method, CRC-32, declared size) members (plain zip, no zip64)."""
    local, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        offset, encoded = len(local), name.encode()
        local += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 0x21, crc, len(data), size,
                             len(encoded), 0) + encoded + data
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, method, 0, 0x21, crc, len(data),
                               size, len(encoded), 0, 0, 0, 0, 0o644 << 16, offset) + encoded
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def bombed_model(source: Path, target: Path, declared: int | None = None) -> Path:
    """`source` (a real .keras file) with its config.json followed by 2 GB of spaces, deflated (~2 MB).

    Args:
        declared: the size the zip header claims for config.json; default the true one (2 GB).
    """
    members = []
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename == "config.json":
                stream, crc, size = spaces_stream(data, SPACES)
                members.append((info.filename, stream, zipfile.ZIP_DEFLATED, crc, declared or size))
            else:
                members.append((info.filename, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)))
    return write_zip(target, members)


def run_measured(*args, timeout=300) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m finetune_cli ARGS` in a child; (its result, its peak resident memory in bytes).

    A wrapper process runs the command, so that the peak (`RUSAGE_CHILDREN`) is the command's own.
    """
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run([sys.executable, '-m', 'finetune_cli', *sys.argv[1:]], capture_output=True, "
               "text=True, stdin=subprocess.DEVNULL); "
               "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    try:
        proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True,
                              errors="backslashreplace", timeout=timeout, env=child_env(), cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        pytest.fail(f"`finetune {' '.join(map(str, args))}` did not finish within {timeout} s")
    *lines, peak = proc.stderr.rstrip("\n").split("\n")
    proc.stderr = "\n".join(lines) + "\n"
    return proc, int(peak) * 1024  # ru_maxrss is in KB on Linux


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny.keras")


# ---------------------------------------------------------------- item 8: a zip bomb in model.keras


def test_item8_zip_bomb_config_refused_fast_and_small(tiny_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    bomb = bombed_model(tiny_file, run / "model.keras")
    (run / "labels.json").write_text('["circle", "square", "triangle"]')
    assert bomb.stat().st_size < 4 << 20  # the bomb is small on disk
    with zipfile.ZipFile(bomb) as archive:
        assert archive.getinfo("config.json").file_size > SPACES  # and declares 2 GB inflated
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes((32, 32)))
    proc, peak = run_measured("predict", photo, "--model", run)
    line = one_error_line(proc.stderr, proc.returncode, proc.stdout)
    assert "config.json" in line and f"{SPACES:,}"[:5] in line, line  # names the member and its declared size
    assert peak < 1 << 30, f"peak memory {peak / 2**20:.0f} MB: the member was inflated"
    # the same archive as a --base, in process: refused before Keras opens it, in a few MB
    from finetune_cli.models.files import archive_json, declared_input

    tracemalloc.start()
    try:
        with pytest.raises(BackboneError, match="config.json"):
            declared_input(bomb)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
        # a header that lies (claims the real config.json's size, the stream inflates to 2 GB): no more than
        # the claim is inflated, and the mismatch is refused as a damaged file
        size = len(zipfile.ZipFile(tiny_file).read("config.json"))
        liar = bombed_model(tiny_file, tmp_path / "liar.keras", declared=size)
        tracemalloc.reset_peak()
        with pytest.raises(BackboneError, match="truncated or corrupt"):
            archive_json(liar, "config.json")
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- item 9: nested JSON, recipe numbers


def nested(depth: int = 5000) -> str:
    return "[" * depth + "]" * depth


def test_item9_deeply_nested_json_is_one_line_naming_the_file(tiny_file, tmp_path):
    # labels.json of a run (a model without class names of its own falls back on it)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(tiny_file.read_bytes())
    (run / "labels.json").write_text(nested())
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes((32, 32)))
    line = one_error_line(invoke("predict", photo, "--model", run))
    assert "labels.json" in line and "nested too deeply" in line, line
    # config.json inside model.keras
    with zipfile.ZipFile(tiny_file) as source, zipfile.ZipFile(tmp_path / "deep.keras", "w") as target:
        for info in source.infolist():
            target.writestr(info, nested() if info.filename == "config.json" else source.read(info))
    line = one_error_line(invoke("layers", "--base", tmp_path / "deep.keras"))
    assert "config.json" in line and "nested too deeply" in line, line
    # plan.json, then state.json, of a run to --resume
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=4, size=16, seed=1)
    resumable = tmp_path / "resumable"
    resumable.mkdir()
    (resumable / "plan.json").write_text(nested())
    line = one_error_line(invoke("train", shapes, "--base", tiny_file, "--image-size", 16, "--out", resumable,
                                 "--resume", "--no-cache"))
    assert "plan.json" in line, line
    # metrics.json of a run: `diagnose` and `report` read it
    (run / "metrics.json").write_text(nested())
    for command in ("diagnose", "report"):
        result = invoke(command, run)
        assert "Traceback" not in result.output and not isinstance(result.exception, RecursionError), result.output
        if result.exit_code:
            one_error_line(result)
    # tune.json of a search folder
    from finetune_cli.tasks.tune.files import TuneFolder

    search = tmp_path / "search"
    search.mkdir()
    (search / "tune.json").write_text(nested())
    with pytest.raises(OutputError, match="tune.json"):
        TuneFolder.open(search, shapes).record_definition({"classes": ["a", "b"]})


def test_item9_recipe_numbers_must_be_finite_and_named():
    import dataclasses

    from finetune_cli.strategy.recipes import Recipe, parse

    floats = [f.name for f in dataclasses.fields(Recipe) if isinstance(getattr(Recipe(), f.name), float)]
    assert {"l2", "weight_decay", "learning_rate", "momentum", "linear_c"} <= set(floats)
    for field in floats:
        for value in ("inf", "-inf", "nan", "1" + "0" * 400):  # the last: an integer no float can hold
            with pytest.raises(RecipeError) as caught:
                parse(f"{field} = {value}", "r.toml")
            message = str(caught.value)
            assert message.startswith(f"r.toml: {field} must be a finite number"), message


def test_item9_recipe_feature_stage_must_be_a_positive_stage(tiny_file, tmp_path):
    from finetune_cli.strategy.recipes import parse

    for bad in ("-1", '"-1"', "0", '"0"', '"²"'):
        with pytest.raises(RecipeError, match="feature_stage must be 'final', 'best' or a stage index from 1"):
            parse(f"feature_stage = {bad}", "r.toml")
    assert parse("feature_stage = 2").feature_stage == parse('feature_stage = "2"').feature_stage == "2"
    # a nested TOML array, then weight_decay = inf, through the real CLI: one line naming what is wrong
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=4, size=16, seed=1)
    for text, words in ((f"x = {nested()}", ("nested too deeply",)),
                        ("strategy = 'partial'\nweight_decay = inf", ("weight_decay", "finite")),
                        ("feature_stage = -1", ("feature_stage", "from 1"))):
        recipe = tmp_path / "r.toml"
        recipe.write_text(text)
        line = one_error_line(invoke("train", shapes, "--base", tiny_file, "--image-size", 16, "--recipe", recipe,
                                     "--out", tmp_path / "out", "--no-cache"))
        assert all(w in line for w in words) and "learning rate" not in line, line
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item a: distill's epoch lines


def test_itema_distill_epoch_lines_say_distillation_loss():
    import io

    import tensorflow as tf
    from rich.console import Console

    from finetune_cli.config import DISTILL
    from finetune_cli.render import RichReporter
    from finetune_cli.runtime.keras import import_keras
    from finetune_cli.train.distill import fit_student, soft_targets

    keras = import_keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="classifier")(x))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1] * 3, np.int32)
    soft = soft_targets([np.eye(2, dtype=np.float32)[labels] * 0.8 + 0.1], 2.0)
    train = [(images, labels, np.ones(6, np.float32), soft, np.ones(6, np.float32))]
    val = [(tf.constant(images), tf.constant(labels), tf.constant(np.ones(6, np.float32)))]
    buffer = io.StringIO()
    reporter = RichReporter(Console(file=buffer, width=300))
    settings = type(DISTILL)(**{**DISTILL.__dict__, "epochs": 2})
    fit_student(model, train, val, 2, temperature=2.0, alpha=0.5, settings=settings,
                progress=lambda s, total: reporter.on_epoch(s.history[-1], total))  # as distill.py reports
    text = buffer.getvalue()
    assert "epoch 1/2: distillation loss" in text and "agreement with the teachers" in text, text
    assert "reconstruction" not in text


# ---------------------------------------------------------------- item b: Ctrl-C messages


def test_itemb_ctrl_c_message_fits_the_command(tiny_file, tmp_path):
    """A real Ctrl-C in a real search: the line names trials.csv, which holds the finished trials."""
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=6, size=16, seed=1)
    out, log = tmp_path / "search", tmp_path / "tune.log"

    def prepare():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "finetune_cli", "tune", str(shapes), "--base", str(tiny_file),
                                 "--image-size", "16", "--budget", "5000", "--method", "random", "--out", str(out),
                                 "--no-cache"], env=child_env(), stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=prepare, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "trials.csv").exists():
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "no trial finished within 180 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    line = next(line for line in text.splitlines() if line.startswith("Interrupted"))
    assert "trials.csv" in line and str(out) in line and "train ... --resume" not in line, line
    assert "Traceback" not in text and (out / "trials.csv").read_text().count("\n") >= 2
    # the other commands: only train is resumable, export keeps nothing
    from finetune_cli.cli import interrupted_message

    for command in ("tune", "export", "distill", "predict", "extract_features"):
        assert "--resume" not in interrupted_message(command, "/x"), command
    assert "--resume" in interrupted_message("train", "/x") and "/x" in interrupted_message("train", "/x")
    assert "nothing was exported" in interrupted_message("export")


# ---------------------------------------------------------------- item c: a cache dir that is a file


def test_itemc_cache_dir_that_is_a_file_is_one_line_error(tmp_path):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("hello")
    for args in (("cache", "info"), ("cache", "info", "--json"), ("cache", "clear")):
        line = one_error_line(invoke(*args, env={"FINETUNE_CACHE_DIR": str(not_a_folder)}))
        assert "is a file" in line and "FINETUNE_CACHE_DIR" in line, line
    assert not_a_folder.read_text() == "hello"


# ---------------------------------------------------------------- items d, e: trials.csv and tune.json


def test_itemd_cut_off_trials_row_is_dropped_with_a_note(tmp_path):
    from finetune_cli.tasks.tune.files import TrialLog, TuneFolder

    folder = TuneFolder.open(tmp_path / "search", tmp_path)
    folder.record_definition({"classes": ["a", "b"]})
    log = TrialLog(folder)
    for i, c in enumerate((0.01, 0.1, 1.0)):
        log.add({"C": c, "stage": "final", "pooling": "avg", "views": 0, "n_images": 24,
                 "mean_accuracy": 0.5 + i / 10, "std_accuracy": 0.05, "mean_macro_f1": 0.4 + i / 10,
                 "std_macro_f1": 0.05, "n_splits": 5, "seconds": 0.1})
    path = folder.file("trials.csv")
    whole = path.read_text()
    path.write_text(whole[: whole.rindex(",") - 2])  # the last row cut off mid-write
    recorder = Recorder()
    again = TrialLog(TuneFolder.open(tmp_path / "search", tmp_path), reporter=recorder)
    assert again.rows == log.rows[:2] and again.n_old == 2
    assert len(recorder.notes) == 1 and "dropped 1 malformed row" in recorder.notes[0], recorder.notes
    # a row with a field that is not a number, and one with a field too many: dropped too, the rest kept
    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], lines[1], lines[2].replace("0.05", "zero"), lines[3] + ",9"]) + "\n")
    recorder = Recorder()
    assert TrialLog(folder, reporter=recorder).rows == log.rows[:1]
    assert "dropped 2 malformed row" in recorder.notes[0] and "line(s) 3, 4" in recorder.notes[0]


def test_iteme_search_mismatch_message_reads_well(tmp_path):
    from finetune_cli.tasks.tune.files import TuneFolder

    folder = TuneFolder.open(tmp_path / "search", tmp_path)
    folder.record_definition({"classes": ["a", "b"], "seed": 0})
    with pytest.raises(OutputError) as caught:
        TuneFolder.open(tmp_path / "search", tmp_path).record_definition({"classes": ["a", "c"], "seed": 1})
    message = str(caught.value)
    assert "a different classes" not in message and "(different classes, seed)" in message, message


# ---------------------------------------------------------------- item f: the batch fits memory


def test_itemf_batch_bounded_by_memory(tiny_file, tmp_path):
    # a real extraction at 2048 px says so (9 images: the old batch of 32 took them all at once)
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=3, size=16, seed=1)
    result = invoke("extract-features", shapes, "--base", tiny_file, "--image-size", 2048, "--out",
                    tmp_path / "f.npz", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "batch 32 -> 5 at 2048 px to stay under 2 GB" in result.stderr, result.stderr
    assert np.load(tmp_path / "f.npz")["features"].shape[0] == 9
    # the estimate itself
    from finetune_cli.config import FEATURES, FeatureConfig
    from finetune_cli.features import memory_batch

    assert memory_batch(32, 224) == 32 and memory_batch(32, 512) == 32 and memory_batch(8, 2048) == 5
    assert memory_batch(32, 2048) == 5 and memory_batch(32, 1024) == 21
    assert memory_batch(32, 2048, FeatureConfig(memory_budget_mb=1)) == 1  # never below 1
    per_image = 2048 * 2048 * 3 * 4 * FEATURES.activation_factor
    assert 5 * per_image <= FEATURES.memory_budget_mb << 20 < 6 * per_image
