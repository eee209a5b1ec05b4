"""`diagnose`: each verdict on constructed histories (and its neighbours on borderline ones), run folders
written by the real `RunFolder` writer, the errors, and two real tiny fine-tuning runs (healthy, diverged)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune_cli import api
from finetune_cli.analysis.diagnose import VERDICTS, Diagnosis, diagnose_history
from finetune_cli.config import DIAGNOSE
from finetune_cli.errors import ModelFileError
from finetune_cli.runs.folder import RunFolder
from finetune_cli.tasks.diagnose import diagnose_run
from tests.conftest import save_tiny_backbone

LN3 = math.log(3)


def epochs(loss, val_loss, accuracy, val_accuracy, lr=None) -> list[dict]:
    """A fine-tuning history as the engine writes it; a scalar accuracy repeats for every epoch."""
    n = len(loss)
    accuracy = accuracy if isinstance(accuracy, list) else [accuracy] * n
    val_accuracy = val_accuracy if isinstance(val_accuracy, list) else [val_accuracy] * n
    rows = [{"epoch": i + 1, "loss": loss[i], "accuracy": accuracy[i], "val_loss": val_loss[i],
             "val_accuracy": val_accuracy[i], "seconds": 0.1} for i in range(n)]
    return [{**row, "lr_head": lr} for row in rows] if lr is not None else rows


def linear(*accuracies, grid=(0.01, 0.1, 1.0)) -> list[dict]:
    return [{"C": c, "cv_accuracy": a} for c, a in zip(grid, accuracies)]


HEALTHY = epochs([0.9, 0.6, 0.45, 0.3], [0.8, 0.6, 0.5, 0.45], [0.6, 0.8, 0.9, 0.95], 0.9, lr=1e-3)


def verdict(history, **kwargs) -> str:
    return diagnose_history(history, **kwargs).verdict


def test_healthy_history_says_so_with_its_numbers():
    d = diagnose_history(HEALTHY, classes=3)
    assert d.verdict == "healthy"
    assert "0.45 at epoch 4 of 4" in d.reason and "nothing to fix" in d.next_step
    assert d.evidence["min_val_loss"] == 0.45 and d.evidence["classes"] == 3
    assert json.loads(json.dumps(d.to_dict()))["verdict"] == "healthy"


# ---------------------------------------------------------------- diverged


def test_a_nan_loss_is_diverged_and_names_the_epoch_and_a_rate():
    d = diagnose_history(epochs([0.9, 0.7, math.nan], [0.8, 0.7, math.nan], 0.7, 0.7, lr=0.01), classes=3)
    assert d.verdict == "diverged"
    assert "NaN or infinite at epoch 3" in d.reason and d.evidence["non_finite_epoch"] == 3
    assert "divide it by 10 (learning_rate = 0.001 in a --recipe file)" in d.next_step


def test_an_infinite_validation_loss_is_diverged():
    d = diagnose_history(epochs([0.9, 0.7, 0.6], [0.8, math.inf, 0.5], 0.9, 0.9), classes=3)
    assert d.verdict == "diverged" and "validation loss became NaN or infinite at epoch 2" in d.reason


@pytest.mark.parametrize("peak, expected", [(DIAGNOSE.blowup * LN3 * 1.02, "diverged"),
                                            (DIAGNOSE.blowup * LN3 * 0.98, "healthy")])
def test_a_training_loss_blown_up_past_blowup_times_chance_is_diverged(peak, expected):
    history = epochs([peak, 2.0, 0.5, 0.3], [1.0, 0.8, 0.6, 0.5], [0.5, 0.7, 0.9, 0.95], 0.9)
    d = diagnose_history(history, classes=3)
    assert d.verdict == expected
    if expected == "diverged":
        assert f"reached {peak:.2f} at epoch 1" in d.reason and "ln(3) = 1.10" in d.reason


@pytest.mark.parametrize("last, expected", [(1.05, "diverged"), (0.95, "healthy")])
def test_a_training_loss_ending_above_end_rise_times_its_start_is_diverged(last, expected):
    history = epochs([0.5, 0.3, 0.6, last], [0.6, 0.55, 0.5, 0.5], 0.9, 0.9)
    d = diagnose_history(history, classes=3)
    assert d.verdict == expected
    if expected == "diverged":
        assert "training loss ended at 1.05, 2.1 times its start 0.50" in d.reason


def test_a_rise_of_a_loss_near_zero_is_noise_not_a_divergence():
    """From a perfect linear head the loss starts near 0; doubling it there (0.008 -> 0.017, far under
    end_rise_floor x ln(3)) is noise, while the same ratio from 0.5 is a divergence (above)."""
    history = epochs([0.008, 0.1, 0.06, 0.017], [0.0013, 0.0012, 0.0011, 0.0009], 1.0, 1.0)
    assert 0.017 > DIAGNOSE.end_rise * 0.008 and 0.017 < DIAGNOSE.end_rise_floor * LN3
    assert diagnose_history(history, classes=3).verdict == "healthy"


def test_a_rate_lowered_by_the_nan_guard_is_diverged_even_when_the_retry_trained_well():
    d = diagnose_history(HEALTHY, classes=3, planned_lr=1e-2)
    assert d.verdict == "diverged" and d.evidence["retried"] is True
    assert "from 0.01 to 0.001" in d.reason
    assert "learning_rate = 0.001" in d.next_step  # start where the retry succeeded
    assert verdict(HEALTHY, classes=3, planned_lr=1e-3) == "healthy"


# ---------------------------------------------------------------- too low


def test_a_flat_training_loss_far_from_full_accuracy_is_too_low():
    flat = epochs([1.0, 0.99, 0.98, 0.97], [0.5, 0.5, 0.5, 0.5], 0.5, 0.5, lr=1e-5)
    d = diagnose_history(flat, classes=3)
    assert d.verdict == "too-low"
    assert "fell only 3.0% (1.00 -> 0.97 at best) over 4 epochs" in d.reason
    assert "multiply it by 10 (learning_rate = 0.0001" in d.next_step


def test_too_low_is_not_said_past_its_borderlines():
    moving = epochs([1.0, 0.98, 0.96, 0.94], [1.0, 0.98, 0.96, 0.94], 0.5, 0.5)  # 6% > min_progress
    assert verdict(moving, classes=3) == "underfitting"  # the loss moved, but stays near chance
    at_ceiling = epochs([1.0, 0.99, 0.98, 0.97], [0.5, 0.5, 0.5, 0.5], 0.92, 0.9)
    assert verdict(at_ceiling, classes=3) == "healthy"  # nothing left to learn on the training set
    short = epochs([1.0, 0.99], [0.5, 0.5], 0.5, 0.5)
    assert verdict(short, classes=3) == "healthy"  # two epochs show no trend


# ---------------------------------------------------------------- overfitting


def overfit(last_val=0.73, val_accuracy=0.7, last_loss=0.08) -> list[dict]:
    loss = [0.9, 0.7, 0.52, 0.3, 0.15, last_loss]
    return epochs(loss, [0.7, 0.5, 0.41, 0.5, 0.6, last_val], [0.6, 0.7, 0.8, 0.9, 0.95, 0.98], val_accuracy)


def test_validation_loss_rising_while_training_loss_falls_is_overfitting():
    d = diagnose_history(overfit(), classes=3)
    assert d.verdict == "overfitting"
    assert ("validation loss rose from 0.41 (epoch 3) to 0.73 (epoch 6) while training loss fell 0.52 -> 0.08"
            in d.reason)
    assert "epochs = 3" in d.next_step and "--strategy linear" in d.next_step
    assert d.evidence["accuracy_gap"] == pytest.approx(0.28)


@pytest.mark.parametrize("case", ["small rise", "small gap", "training loss rose too"])
def test_overfitting_is_not_said_past_its_borderlines(case):
    history = {"small rise": overfit(last_val=0.41 * (1 + DIAGNOSE.overfit_rise) - 0.005),
               "small gap": overfit(val_accuracy=0.98 - DIAGNOSE.overfit_gap + 0.01),
               "training loss rose too": overfit(last_loss=0.6)}[case]
    assert verdict(history, classes=3) == "healthy"
    assert verdict(overfit(), classes=3) == "overfitting"


# ---------------------------------------------------------------- underfitting


def test_losses_near_chance_are_underfitting_and_k_sets_the_chance_level():
    stuck = epochs([1.09, 1.0, 0.9, 0.8], [1.1, 1.0, 0.9, 0.85], 0.45, 0.4)
    d = diagnose_history(stuck, classes=3)
    assert d.verdict == "underfitting"
    assert "73% and 77% of the chance level ln(3) = 1.10" in d.reason and "partial-2" in d.next_step
    # with 10 classes the same losses are well below ln(10) = 2.30: learning happened
    assert verdict(stuck, classes=10) == "healthy"


def test_underfitting_borderline():
    level = DIAGNOSE.underfit_loss * LN3
    below = epochs([1.09, 1.0, 0.9, level - 0.01], [1.1, 1.0, 0.9, 0.85], 0.6, 0.5)
    assert verdict(below, classes=3) == "healthy"
    above = epochs([1.09, 1.0, 0.9, level + 0.01], [1.1, 1.0, 0.9, 0.85], 0.6, 0.5)
    assert verdict(above, classes=3) == "underfitting"


def test_without_k_it_is_estimated_from_the_first_validation_loss():
    stuck = epochs([2.4, 2.2, 2.0, 1.9], [math.log(10), 2.2, 2.1, 2.0], 0.3, 0.3)
    d = diagnose_history(stuck)
    assert d.evidence["classes"] == 10 and d.evidence["classes_estimated"] is True
    assert d.verdict == "underfitting" and "k estimated from the first validation loss" in d.reason


# ---------------------------------------------------------------- linear-head runs


@pytest.mark.parametrize("accuracies, expected, edge", [
    ((0.80, 0.90, 0.85), "healthy", None),
    ((0.90, 0.85, 0.80), "linear", "strong"),
    ((0.80, 0.85, 0.90), "linear", "weak"),
    ((0.90, 0.90, 0.90), "healthy", None),                            # flat: the grid did not decide
    ((0.90, 0.90 - DIAGNOSE.linear_edge_margin / 2, 0.8), "healthy", None),  # on the edge by less than the margin
    ((0.40, 0.45, 0.42), "underfitting", None),                       # below 1/3 + 0.5 x 2/3 = 67%
    ((0.66, 0.60, 0.55), "underfitting", None),
    ((0.68, 0.60, 0.55), "linear", "strong"),
])
def test_linear_head_runs_are_judged_by_their_cross_validation_curve(accuracies, expected, edge):
    d = diagnose_history(linear(*accuracies), classes=3)
    assert (d.verdict, d.evidence["edge"]) == (expected, edge)
    best = max(accuracies)
    assert f"{best:.1%}" in d.reason


def test_linear_edges_say_which_end_and_what_to_do():
    strong = diagnose_history(linear(0.9, 0.85, 0.8), classes=3)
    assert "C = 0.01, the strongest regularisation tried, vs 85.0% at C = 0.1" in strong.reason
    assert "feature_views" in strong.next_step
    weak = diagnose_history(linear(0.8, 0.85, 0.9), classes=3)
    assert "weakest" in weak.reason and "--strategy partial" in weak.next_step
    assert diagnose_history(linear(0.8, 0.85, 0.9), classes=10).verdict == "linear"  # chance 10%: not underfitting


# ---------------------------------------------------------------- run folders written by the real writer


def write_run(path, history, **files):
    """A run folder written by `artifacts.RunFolder`, as `write_run` writes history.csv and the JSON files."""
    run = RunFolder(path)
    run.write_frame("history.csv", pd.DataFrame(history))
    for name, value in files.items():
        run.write_json(f"{name}.json", value)
    return path


def test_a_run_folder_reads_k_from_metrics_or_labels(tmp_path):
    stuck = epochs([1.09, 1.0, 0.9, 0.8], [1.1, 1.0, 0.9, 0.85], 0.45, 0.4)
    ten = [f"c{i}" for i in range(10)]
    d = diagnose_run(write_run(tmp_path / "m", stuck, metrics={"classes": ten}))
    assert d.verdict == "healthy" and d.evidence["classes"] == 10 and d.run == str(tmp_path / "m")
    assert diagnose_run(write_run(tmp_path / "l", stuck, labels=["a", "b", "c"])).verdict == "underfitting"


def test_a_run_folder_detects_the_nan_guard_from_plan_json(tmp_path):
    plan = {"plan": {"learning_rates": {"head": 0.01, "top": 0.001, "intermediate": 0.0001}}}
    path = write_run(tmp_path / "run", HEALTHY, plan=plan,
                     metrics={"classes": ["a", "b", "c"], "learning_rates": {"head": 0.001}, "kept": "linear-head"})
    d = diagnose_run(path)
    assert d.verdict == "diverged" and "from 0.01 to 0.001" in d.reason
    assert d.evidence["kept"] == "linear-head" and "kept its linear head" in d.reason


def test_a_nan_written_to_history_csv_reads_back_as_diverged(tmp_path):
    """pandas writes NaN as an empty cell; diagnose reads the empty cell back as NaN."""
    path = write_run(tmp_path / "run", epochs([0.9, math.nan], [0.8, math.nan], 0.5, 0.5))
    assert ",," in (path / "history.csv").read_text()
    assert diagnose_run(path).verdict == "diverged"


def test_a_linear_run_folder(tmp_path):
    path = write_run(tmp_path / "run", linear(0.9, 0.85, 0.8), metrics={"classes": ["a", "b", "c"]})
    d = diagnose_run(path)
    assert d.verdict == "linear" and d.evidence["best_C"] == 0.01 and d.evidence["classes"] == 3

# ---------------------------------------------------------------- errors


def one_line_error(path, *needles):
    with pytest.raises(ModelFileError) as info:
        diagnose_run(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_errors_not_a_run(tmp_path, shapes):
    one_line_error(tmp_path / "nowhere", "not found", "--out of `finetune train`")
    one_line_error(shapes, "is not a run", "history.csv")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(tmp_path / "file.txt", "is not a folder")


def test_errors_missing_history(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{}")
    one_line_error(run, "has no history.csv", "train it again")
    (run / "state.json").write_text("{}")
    one_line_error(run, "has no history.csv", "--resume")


@pytest.mark.parametrize("content, needle", [
    (b"", "holds no rows"),
    (b"epoch,loss,accuracy,val_loss,val_accuracy\n", "holds no rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage \x00\x81", "garbled"),
    (b"epoch,loss\n1,0.5\n", "lacks accuracy, val_loss, val_accuracy"),
    (b"epoch,loss,accuracy,val_loss,val_accuracy\n1,0.5,0.9,abc,0.8\n", "column val_loss holds 'abc'"),
    (b"epoch,loss,accuracy,val_loss,val_accuracy\n1,0.5,0.9,0.4,0.8,7,8\n", "garbled"),
])
def test_errors_empty_or_garbled_history(tmp_path, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.csv").write_bytes(content)
    one_line_error(run, str(run / "history.csv"), needle)


def test_errors_last_without_runs_and_bad_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error("last", "no finished run")
    with pytest.raises(ValueError, match="Expected at least one history row"):
        diagnose_history([])
    with pytest.raises(ValueError, match="Received: keys"):
        diagnose_history([{"epoch": 1, "loss": 0.5}])


# ---------------------------------------------------------------- real runs


def colour_folder(root, per_class=12, size=32):
    """3 classes of noisy solid colours: a random tiny backbone separates them at once."""
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def real_run(tmp_path, out, learning_rate: float) -> dict:
    recipe = tmp_path / "recipe.toml"
    fields = {"strategy": "partial", "unfreeze_stages": 2, "learning_rate": learning_rate, "epochs": 6,
              "patience": 6, "batch_size": 8, "augmentation": "none", "feature_views": 0}
    recipe.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + "\n")
    base = save_tiny_backbone(tmp_path / "tiny.keras")
    return api.train(colour_folder(tmp_path / "colours"), str(base), out=out, image_size=32,
                     similarity="similar", recipe=str(recipe))


def test_real_healthy_run_found_as_last(tmp_path, monkeypatch):
    """lr 1e-3 on colours the backbone separates: the loss falls every epoch, validation accuracy 100%."""
    monkeypatch.chdir(tmp_path)
    real_run(tmp_path, tmp_path / "runs" / "colours-1", 1e-3)
    d = diagnose_run("last")
    assert d.run == str(tmp_path / "runs" / "colours-1")
    assert d.verdict == "healthy", d.reason
    assert d.evidence["classes"] == 3 and d.evidence["learning_rate"] == pytest.approx(1e-3)
    assert diagnose_run(tmp_path / "runs" / "colours-1" / "model.keras").to_dict() == d.to_dict()


def test_real_run_at_a_huge_learning_rate_is_diverged(tmp_path):
    """A real run at lr 1e10 (Adam: every step moves a weight by about lr).

    The engine never saves a NaN model, so what can be diagnosed is a run it saved. On this tiny backbone
    the first attempt's loss overflows to NaN at epoch 1 and the NaN guard retries at lr/10 = 1e9, which
    stays finite but reaches a training loss near 1e27; the run is saved (and keeps its linear head, which
    beat the wrecked fine-tune). Diagnose calls it diverged from both signs: plan.json's head rate above
    the rate the history ran at, and a loss far above blowup x ln(3). Should the first attempt stay finite
    on another machine, the blow-up alone still makes the verdict, so the test asserts that one always
    and the retry only when it happened.
    """
    run = tmp_path / "run"
    real_run(tmp_path, run, 1e10)
    history = pd.read_csv(run / "history.csv")
    d = diagnose_run(run)
    assert d.verdict == "diverged", d.reason
    assert history["loss"].max() > DIAGNOSE.blowup * LN3 and "times the chance level ln(3)" in d.reason
    retried = bool(history["lr_head"].iloc[0] < 1e10)
    assert d.evidence["retried"] is retried
    if retried:
        assert "the NaN guard cut the head's learning rate from 1e+10 to 1e+09" in d.reason
    assert d.next_step.startswith("learning rate too high: divide it by 10")
    assert d.verdict in VERDICTS and isinstance(d, Diagnosis)
    json.dumps(d.to_dict())


def test_cli_diagnose_and_train_note_on_a_real_diverged_run(tmp_path):
    """`finetune diagnose RUN --json` gives the verdict; `train` itself recorded it in metrics.json and its
    notes; a folder that is not a run is one line and exit 2."""
    from click.testing import CliRunner

    from finetune_cli.cli import cli

    run = tmp_path / "run"
    metrics = real_run(tmp_path, run, 1e10)
    assert metrics["diagnosis"]["verdict"] == "diverged"
    assert any(n.startswith("diagnosis: diverged") for n in metrics["notes"])
    result = CliRunner().invoke(cli, ["diagnose", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verdict"] == "diverged"
    plain = CliRunner().invoke(cli, ["diagnose", str(run)])
    assert plain.exit_code == 0 and "diverged" in plain.output and "next:" in plain.output
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(cli, ["diagnose", str(tmp_path / "empty")])
    assert bad.exit_code == 2 and bad.output.strip().startswith("Error:") and len(bad.output.strip().splitlines()) == 1
