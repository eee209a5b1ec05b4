"""Fine-tuning runs a pilot first, with the linear head as the bar: fine-tuning that cannot win stops early."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from finetune_cli import api
from finetune_cli.config import TRAIN
from finetune_cli.train.finetune import wins_needed
from finetune_cli.data.synthetic import make_shapes_folder
from tests.test_train import recipe_file

NO_CALIBRATION = dataclasses.replace(TRAIN, calibrate=False)


def frozen_recipe(tmp_path):
    """A partial plan whose rate cannot move the weights: fine-tuning built to lose (it stays the linear head)."""
    return recipe_file(tmp_path, learning_rate=1e-12, epochs=6, patience=6, dropout=0.0, l2=0.0)


def test_a_pilot_that_cannot_beat_the_linear_head_is_abandoned(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=10, size=32, seed=2)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=frozen_recipe(tmp_path),
                        similarity="similar", settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=2))
    assert len(pd.read_csv(out / "history.csv")) == 2  # the pilot's 2 epochs, not the recipe's 6
    pilot = metrics["pilot"]
    assert pilot["abandoned"] and metrics["kept"] == "linear-head"
    assert pilot["best"]["val_accuracy"] <= pilot["linear_head"]["val_accuracy"]
    assert any("abandoned after its 2-epoch pilot" in note for note in metrics["notes"])
    # the saved model is the linear head, refitted on every label once the hold-out has done its job
    assert metrics["refit"] == "all labels" and metrics["validation"]["method"] == "out-of-fold"
    assert metrics["n_val"] == metrics["n_train"] == 30


def test_without_a_pilot_the_same_plan_pays_its_whole_schedule(tmp_path, tiny_base):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=10, size=32, seed=2)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, recipe=frozen_recipe(tmp_path),
                        similarity="similar", settings=dataclasses.replace(NO_CALIBRATION, pilot_epochs=0))
    assert len(pd.read_csv(out / "history.csv")) == 6 and "pilot" not in metrics


def test_fine_tuning_with_no_headroom_is_skipped_before_it_is_paid_for(tmp_path, tiny_base):
    """A `large` auto plan whose linear head is already perfect on validation and in CV never fine-tunes."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "flat"  # two classes of flat colours, 100 distinct images each: trivially separable
    rng = np.random.default_rng(0)
    for name, base in (("dark", 40), ("light", 210)):
        (root / name).mkdir(parents=True)
        for i in range(100):
            pixels = np.clip(base + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    out = tmp_path / "run"
    metrics = api.train(root, str(tiny_base), out=out, image_size=32, similarity="similar", settings=NO_CALIBRATION)
    assert metrics["size_category"] == "large" and metrics["strategy"] == "partial"
    assert metrics["kept"] == "linear-head" and metrics["pilot"]["skipped"] == "no headroom"
    assert metrics["val_accuracy"] == 1.0 and not (out / "checkpoint.keras").exists()  # no epoch was run
    # the kept head is refitted on all 200 labelled images, validated out-of-fold, as a linear plan is
    assert metrics["refit"] == "all labels" and metrics["n_train"] == 200
    assert metrics["validation"]["method"] == "out-of-fold" and metrics["validation"]["n_images"] == 200
    assert len(pd.read_csv(out / "predictions_val.csv")) == 200
    assert any(note.startswith("fine-tuning skipped") for note in metrics["notes"])
    forced = api.train(root, str(tiny_base), out=tmp_path / "forced", image_size=32, similarity="similar",
                       strategy="partial", settings=NO_CALIBRATION)
    assert "skipped" not in forced.get("pilot", {})  # --strategy forces the fine-tuning


def _baseline(x, y, x_val, y_val):
    """The phase-1 Baseline a run would build on these features: a real fitted head and its real curve."""
    import numpy as np

    from finetune_cli.train.curve import learning_curve
    from finetune_cli.train.finetune import Baseline
    from finetune_cli.train.linear import fit_linear

    head = fit_linear(x, y, 2, seed=0)
    curve = learning_curve(x, y, ["a", "b"], head.C)
    return Baseline(head, head.probabilities(x_val), np.asarray(y_val), [], curve)


def test_a_head_expected_to_err_on_too_few_validation_images_skips_fine_tuning_and_a_weaker_one_does_not():
    """The second headroom reason: the curve expects so few validation errors that no gain could be told
    from noise. A weaker head, or one whose curve was not measured, leaves the decision to the pilot."""
    import numpy as np

    from finetune_cli.train.finetune import no_headroom

    rng = np.random.default_rng(0)

    def blobs(n, gap):
        y = np.repeat([0, 1], n)
        return rng.normal(0, 1, (2 * n, 6)) + gap * y[:, None] * np.eye(6)[0], y

    (x, y), (xv, yv) = blobs(300, 4.6), blobs(24, 4.6)  # Bayes accuracy about 98.9 %, 48 validation images
    near_top = _baseline(x, y, xv, yv)
    why = no_headroom(near_top, TRAIN)
    assert why is not None and why["skipped"] == "too few errors to measure", near_top.curve["message"]
    assert why["expected_val_errors_at_most"] < why["wins_needed"] == 3 and why["n_val"] == 48
    assert "wrong on at most" in why["note"] and "no gain could be measured" in why["note"]
    (x, y), (xv, yv) = blobs(300, 4.6), blobs(250, 4.6)  # the same head judged on 500 images: it may be seen
    assert no_headroom(_baseline(x, y, xv, yv), TRAIN) is None
    (x, y), (xv, yv) = blobs(300, 2.5), blobs(24, 2.5)  # about 89 %: fine-tuning may pay, the pilot judges
    assert no_headroom(_baseline(x, y, xv, yv), TRAIN) is None
    assert no_headroom(dataclasses.replace(near_top, curve=None), TRAIN) is None


def test_wins_needed_is_where_the_keep_rules_own_interval_first_excludes_zero():
    import numpy as np

    from finetune_cli.train.compare import paired_interval
    from finetune_cli.train.finetune import wins_needed

    needed = wins_needed(TRAIN.compare_interval)
    for n in (48, 200):
        def low(wins):
            tuned = np.zeros(n, bool)
            tuned[:wins] = True  # fine-tuning right where the head was wrong, nowhere worse
            return paired_interval(tuned, np.zeros(n, bool), TRAIN.compare_resamples, TRAIN.compare_interval)[0]
        assert low(needed) > 0 and low(needed - 1) <= 0



def _pilot(val_accuracy: float, loss_ratio: float, n: int = 100):
    """A 1-epoch Pilot after an epoch of `val_accuracy` and `loss_ratio` x the head's cross-entropy, against
    a real head's probabilities that are right on 90 of `n` validation images."""
    import numpy as np

    from finetune_cli.train.engine import LoopState
    from finetune_cli.train.finetune import Baseline, Pilot, wins_needed

    right = np.where(np.arange(n) < int(0.9 * n), 0.8, 0.3)  # p(true class): 90 right, 10 wrong
    pilot, state = Pilot(Baseline(None, np.stack([right, 1 - right], 1), np.zeros(n, int), []), 1,
                         tolerance=wins_needed(0.9)), LoopState()
    assert pilot.bar[0] == 0.9
    pilot.on_epoch_end(None, state, {"epoch": 1, "val_accuracy": val_accuracy, "val_loss": pilot.bar[1] * loss_ratio})
    assert pilot.abandoned == state.stop
    return pilot


def test_the_pilot_judges_as_the_keep_rule_does_a_lower_loss_within_noise_of_the_head_goes_on():
    assert wins_needed(0.9) == 3
    assert not _pilot(0.93, 5.0).abandoned  # 3 images better (what the keep rule tells from noise) wins outright
    assert _pilot(0.92, 0.995).abandoned  # 2 images better is noise: the loss must then be lower by the 1 % margin
    assert not _pilot(0.92, 0.98).abandoned  # ... as it is here
    assert not _pilot(0.88, 0.9).abandoned  # 2 images short (fewer than the 3 noise hides), a lower loss
    assert _pilot(0.87, 0.9).abandoned  # 3 images short: a loss the keep rule could tell from noise
    assert _pilot(0.89, 0.995).abandoned  # within noise, but the loss is not lower by the 1 % margin
    assert _pilot(0.90, 1.2).abandoned  # level on accuracy, worse on loss
    assert _pilot(0.89, 0.9).record()["score_slack"] == 0.025


def test_a_kept_fine_tuned_model_is_trained_again_on_the_held_out_images_too(tmp_path, tiny_base):
    """The hold-out picks the epochs and judges the model; then its labels train the model as well."""
    import numpy as np

    from finetune_cli.models.files import load_model_file as load_model

    shapes = make_shapes_folder(tmp_path / "shapes", per_class=10, size=32, seed=2)
    settings = dataclasses.replace(NO_CALIBRATION, pilot_epochs=0, keep_better=False, headroom_check=False)
    runs = {}
    for refit in (True, False):
        out = tmp_path / f"run-{refit}"
        runs[refit] = out, api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar",
                                     recipe=recipe_file(tmp_path, epochs=3, learning_rate=1e-2),
                                     settings=dataclasses.replace(settings, refit_fine_tuned=refit))
    (out, metrics), (_, plain) = runs[True], runs[False]
    record = metrics["refit_fine_tuning"]
    assert metrics["refit"] == "all labels" and "refit" not in plain
    assert record["images"] == 30 and record["held_out_images"] == plain["n_val"] > 0
    assert record["epochs"] == metrics["best_epoch"] >= 1
    assert metrics["n_train"] == 30 and plain["n_train"] == 30 - plain["n_val"]
    assert len(set((out / "trained_on.txt").read_text().split())) == 30
    assert len(pd.read_csv(out / "predictions_val.csv")) == plain["n_val"]  # the held-out run's, out of sample
    saved, best = load_model(out / "model.keras"), load_model(out / "model.keras")
    best.load_weights(out / "best.weights.h5")  # the held-out run's best epoch
    kernel = lambda m: m.get_layer("classifier").get_weights()[0]  # noqa: E731
    assert not np.allclose(kernel(saved), kernel(best))


def test_on_cached_activations_an_abandoned_pilot_tries_the_other_rates_and_the_best_goes_on(tmp_path, tiny_base):
    """Successive halving over the head's rate: the pilot at the recipe's rate cannot move the weights, so it
    never beats the linear head; the arm at 1e10 x that rate runs from the same start, and when it wins it
    goes on at its own rate. A pilot at the recipe's rate that wins runs no other arm."""
    from tests.test_prefix import recipe

    shapes = make_shapes_folder(tmp_path / "shapes", per_class=12, size=32, seed=3)
    settings = dataclasses.replace(NO_CALIBRATION, pilot_epochs=1, pilot_rate_factors=(1.0, 1e10), headroom_check=False)
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar", settings=settings,
                        recipe=recipe(tmp_path, unfreeze_stages=1, epochs=3, learning_rate=5e-12))
    arms = metrics["pilot"]["arms"]
    assert [a["head_lr"] for a in arms] == pytest.approx([5e-12, 0.05])
    assert [a["epochs"] for a in arms] == [1, 1]  # each arm runs the whole pilot (here 1 epoch)
    assert not arms[0]["wins"]  # weights that do not move are the linear head: no lower loss, no higher score
    assert metrics["fine_tuning_s"]["epochs"] >= sum(a["seconds"] for a in arms) - 0.05  # every arm is counted
    history = pd.read_csv(out / "history.csv")
    assert arms[1]["wins"] is not metrics["pilot"]["abandoned"]
    if arms[1]["wins"]:  # the live arm won, and the rest of the schedule runs at its rate
        assert len(history) > 1 and history["lr_head"].iloc[0] == pytest.approx(0.05)
    live = api.train(shapes, str(tiny_base), out=tmp_path / "live", image_size=32, similarity="similar",
                     settings=settings, recipe=recipe(tmp_path, unfreeze_stages=1, epochs=3, learning_rate=0.05))
    assert live["pilot"]["abandoned"] or "arms" not in live["pilot"]


class _Steps:
    """A real `progress.Reporter` that keeps each phase's progress events: (phase, [(done, total), ...])."""

    def __init__(self):
        self.steps = []

    def on_phase(self, name: str) -> None:
        self.steps.append((name, []))

    def on_progress(self, done: int, total: int) -> None:
        if self.steps:
            self.steps[-1][1].append((done, total))

    def __getattr__(self, name):  # on_epoch, on_plan, on_note: nothing to keep
        return lambda *args, **kwargs: None


def test_a_large_automatic_plan_runs_the_backbone_once_for_the_probe_and_the_linear_head(tmp_path, tiny_base):
    """The probe's stages, the final features and phase 1's prefix activations come from one shared pass, so
    phase 1 (and the skip it leads to) reads the cache: every one of its progress events is already done."""
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=100, size=32, seed=3)
    steps = _Steps()
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, batch_size=16,
                        cache_dir=tmp_path / "cache", settings=NO_CALIBRATION, reporter=steps)
    assert metrics["size_category"] == "large" and metrics["strategy"] in ("partial", "full")
    names = [name for name, _ in steps.steps]
    shared = [i for i, name in enumerate(names) if name.startswith("features of")]
    assert len(shared) == 1 and names[shared[0] + 1] == "measuring similarity to the pretraining data"
    assert "'" in names[shared[0]].split("stages ")[1]  # beside the stage numbers and 'final', the cut's layer
    assert steps.steps[shared[0]][1][0][0] < steps.steps[shared[0]][1][0][1]  # that pass computed, in batches
    phase1 = next(events for name, events in steps.steps if name.startswith("phase 1"))
    assert phase1 and all(done == total for done, total in phase1)


@pytest.mark.parametrize("rate,goes_on", [(5e-12, False), (0.05, True)])
def test_the_pilot_runs_on_view_0_and_the_cached_views_are_paid_for_only_when_it_goes_on(tmp_path, tiny_base, rate,
                                                                                         goes_on):
    """A pilot that cannot move the weights is abandoned before any augmented view (or the flip check that
    decides their flips) is computed; one that goes on (here any loss within 11 x the head's wins a tie) pays
    for them after its epochs, and trains on them."""
    from tests.test_prefix import recipe

    shapes = make_shapes_folder(tmp_path / "shapes", per_class=12, size=32, seed=3)
    settings = dataclasses.replace(NO_CALIBRATION, pilot_epochs=1, pilot_rate_factors=(1.0,), headroom_check=False,
                                   refit_fine_tuned=False, tie_loss_margin=-10.0 if goes_on else 0.01)
    steps = _Steps()
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                        settings=settings, reporter=steps, cache_dir=tmp_path / "cache",
                        recipe=recipe(tmp_path, unfreeze_stages=1, epochs=3, feature_views=2, learning_rate=rate))
    names = [name for name, _ in steps.steps]
    views = [i for i, name in enumerate(names) if "view 1 of 2" in name or "view 2 of 2" in name]
    assert metrics["pilot"]["abandoned"] is not goes_on
    assert bool(views) is goes_on and ("flip_check" in metrics) is goes_on
    if goes_on:  # after the pilot's epoch, before the next: the rest of the schedule trains on the views
        phase2 = [i for i, name in enumerate(names) if name.startswith("phase 2")]
        assert phase2[0] < views[0] and len(pd.read_csv(tmp_path / "run" / "history.csv")) > 1
