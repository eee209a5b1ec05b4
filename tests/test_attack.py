"""`finetune attack`: FGSM/PGD accuracy curves that agree with `evaluate`, fall with eps, and are checked.

The run is the square model of test_explain (a colour square decides the
class), trained once for the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.errors import SettingsError
from finetune_cli.tasks.attack import corrupt, halving_eps, masking_warnings, parse_eps, perturb
from tests.browser import assert_page_reads, requires_browser
from tests.test_explain import square_images, train_square_run, write_images

EPS = (0.0, 2.0, 4.0, 8.0, 16.0)


@pytest.fixture(scope="module")
def square_run(tmp_path_factory):
    """(run folder, model, labelled test folder, test images, labels): trained once (~5 s)."""
    root = tmp_path_factory.mktemp("attack")
    model = train_square_run(root / "run")
    images, labels, _ = square_images(24, seed=9)
    write_images(root / "test", images, labels)
    return root / "run", model, root / "test", images, labels


def test_curves_agree_with_evaluate_fall_and_pgd_is_stronger(square_run, tmp_path):
    run, model, test_dir, images, labels = square_run
    result = api.attack(run, test_dir, eps=",".join(map(str, EPS)), out=tmp_path / "out")
    clean = api.evaluate(test_dir, run)["accuracy"]
    n = result["n_images"]
    assert n == 24
    fgsm, pgd = result["accuracy"]["fgsm"], result["accuracy"]["pgd"]
    assert fgsm[0] == pytest.approx(clean) and pgd[0] == pytest.approx(clean)
    for curve in (fgsm, pgd):
        assert all(b <= a + 1 / n + 1e-9 for a, b in zip(curve, curve[1:])), curve
    assert all(p <= f + 1e-9 for p, f in zip(pgd, fgsm)), (fgsm, pgd)
    assert pgd[-1] < 0.5 * clean  # the attack works: eps 16 of 255 breaks this small model
    assert result["warnings"] == []
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert saved["eps"] == list(EPS) and saved["accuracy"] == result["accuracy"]
    assert saved["halving_eps"] == {m: halving_eps(EPS, a) for m, a in result["accuracy"].items()}
    assert saved["halving_eps"]["pgd"] is not None and 0 < saved["halving_eps"]["pgd"] <= 16
    assert [(r["method"], r["eps"]) for r in saved["rows"]] == [(m, e) for m in ("fgsm", "pgd") for e in EPS]
    assert saved["corruptions"] is None
    assert (tmp_path / "out" / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_perturbations_stay_in_the_ball_and_the_pixel_range(square_run):
    _, model, _, images, labels = square_run
    x = images[:8]
    for method in ("fgsm", "pgd"):
        adversarial, fooled = perturb(model, x, labels[:8], method, 4.0)
        assert np.abs(adversarial - x).max() <= 4.0 + 1e-4
        assert adversarial.min() >= 0 and adversarial.max() <= 255
        predicted_wrong = model(adversarial).numpy().argmax(1) != labels[:8]
        assert np.array_equal(predicted_wrong, fooled)
    same, fooled = perturb(model, x, labels[:8], "pgd", 0.0)
    assert np.array_equal(same, x)


def test_halving_eps_interpolates():
    assert halving_eps((0, 1, 2, 4), [1.0, 0.8, 0.4, 0.1]) == pytest.approx(1.75)
    assert halving_eps((0, 1, 2), [0.9, 0.45, 0.1]) == pytest.approx(1.0)
    assert halving_eps((0, 1, 2), [0.9, 0.8, 0.7]) is None


def test_masking_warnings():
    eps = (0, 1, 2, 4)
    assert masking_warnings({"fgsm": [1, .6, .3, .1], "pgd": [1, .4, .1, 0]}, eps, 100) == []
    weaker = masking_warnings({"fgsm": [1, .6, .3, .1], "pgd": [1, .7, .2, 0]}, eps, 100)
    assert any("PGD was weaker than FGSM at eps 1" in w for w in weaker)
    rising = masking_warnings({"pgd": [1, .4, .6, 0]}, eps, 100)
    assert any("rose" in w and "eps 2" in w for w in rising)
    flat = masking_warnings({"pgd": [1, .95, .9, .9]}, eps, 100)
    assert any("toward 0" in w for w in flat)
    assert masking_warnings({"pgd": [1, .4, .42, 0]}, eps, 10) == []  # within one image of 10


def test_corruptions(square_run):
    _, _, _, images, _ = square_run
    x = images[:4]
    noisy = corrupt(x, "noise", 16.0)
    assert 10 < np.std(noisy - x) < 20 and noisy.min() >= 0 and noisy.max() <= 255
    assert np.std(corrupt(x, "blur", 2.0)) < np.std(x)
    assert np.abs(corrupt(x, "jpeg", 5) - x).mean() > np.abs(corrupt(x, "jpeg", 40) - x).mean() > 0
    assert np.all(corrupt(x, "brightness", 64.0) >= x)


@requires_browser
def test_cli_table_corruptions_and_gallery(square_run, tmp_path):
    run, _, test_dir, _, _ = square_run
    out = tmp_path / "attack"
    result = CliRunner().invoke(cli, ["attack", str(run), str(test_dir), "--eps", "0,8", "--method", "fgsm,pgd",
                                      "--corruptions", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy against eps" in result.output and "common corruptions" in result.output
    assert "halves at eps" in result.output or "never halves" in result.output
    saved = json.loads((out / "robustness.json").read_text())
    assert len(saved["corruptions"]) == 12
    assert {r["corruption"] for r in saved["corruptions"]} == {"noise", "blur", "jpeg", "brightness"}
    seen = assert_page_reads(out / "index.html", least_images=1 + 6, screenshot=tmp_path / "attack.png")
    assert "perturbation x" in seen.text and "PGD eps 8" in seen.text


@pytest.mark.parametrize("eps, words", [("-1", "--eps"), ("1,abc", "--eps"), ("", "--eps")])
def test_bad_eps_is_one_line(square_run, tmp_path, eps, words):
    run, _, test_dir, _, _ = square_run
    result = CliRunner().invoke(cli, ["attack", str(run), str(test_dir), "--eps", eps, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_non_run_folder_and_bad_method(square_run, tmp_path):
    _, _, test_dir, _, _ = square_run
    result = CliRunner().invoke(cli, ["attack", str(test_dir), str(test_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.keras" in result.output and "Traceback" not in result.output
    with pytest.raises(SettingsError, match="--method"):
        api.attack(test_dir, test_dir, methods="cw")
    assert parse_eps("8, 0,2,2") == (0.0, 2.0, 8.0)
    assert parse_eps("4,1") == (0.0, 1.0, 4.0)  # the clean accuracy is always measured


def test_a_large_folder_is_sampled_and_says_so(square_run, tmp_path):
    """At most AttackConfig.max_images are attacked (held in memory with their copies): a seeded sample."""
    import dataclasses

    from finetune_cli.config import ATTACK
    from finetune_cli.tasks.attack import attack

    run, _, test_dir, _, _ = square_run
    config = dataclasses.replace(ATTACK, max_images=10)
    first = attack(run, test_dir, eps="0,4", methods="fgsm", out=tmp_path / "a", config=config)
    again = attack(run, test_dir, eps="0,4", methods="fgsm", out=tmp_path / "b", config=config)
    assert first["n_images"] == 10 and first["accuracy"] == again["accuracy"]
    assert any("random 10 of the 24 images" in w for w in first["warnings"])
    whole = attack(run, test_dir, eps="0,4", methods="fgsm", out=tmp_path / "c")
    assert whole["n_images"] == 24 and not any("random" in w for w in whole["warnings"])
