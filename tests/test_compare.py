"""Fine-tuning checks itself against the linear head: `train.compare` and `finetune.keep_better`.

- the rule on constructed validation scores: a clear accuracy win keeps the
  winner; accuracies within noise go to the lower cross-entropy; unpaired
  labels give no interval and fall to cross-entropy;
- a real tiny fine-tuning run whose learning rate wrecks the head keeps the
  linear head: the saved model is the untouched backbone plus the phase-1
  head, metrics.json says so with both scores, and the note is printed;
- a real run that fine-tunes well enough records the comparison too.
"""

from __future__ import annotations

import json

import numpy as np

from finetune_cli import api
from finetune_cli.runtime.keras import import_keras
from finetune_cli.train.compare import compare_on_validation, paired_interval
from tests.conftest import Recorder


def one_hot_probs(labels, right, k=3, confidence=0.9):
    """(n, k) probabilities: the true class with `confidence` where `right`, else the next class."""
    probs = np.full((len(labels), k), (1 - confidence) / (k - 1))
    picked = np.where(right, labels, (labels + 1) % k)
    probs[np.arange(len(labels)), picked] = confidence
    return probs


def test_a_clear_accuracy_win_keeps_the_winner():
    labels = np.arange(200) % 3
    tuned = one_hot_probs(labels, np.arange(200) % 10 != 0)   # 90 % right
    linear = one_hot_probs(labels, np.arange(200) % 2 == 0)   # 50 % right
    assert compare_on_validation(tuned, labels, linear, labels)["kept"] == "fine-tuned"
    facts = compare_on_validation(linear, labels, tuned, labels)
    assert facts["kept"] == "linear-head" and facts["decided_by"] == "accuracy"
    assert facts["accuracy_difference_interval"][1] < 0


def test_accuracies_within_noise_go_to_the_lower_cross_entropy():
    labels = np.arange(20) % 3
    right = np.arange(20) != 3
    sure, unsure = one_hot_probs(labels, right, confidence=0.95), one_hot_probs(labels, right, confidence=0.6)
    facts = compare_on_validation(unsure, labels, sure, labels)
    assert facts["decided_by"].startswith("cross-entropy") and facts["kept"] == "linear-head"
    assert compare_on_validation(sure, labels, unsure, labels)["kept"] == "fine-tuned"
    assert "19 of" not in facts["note"] and "20 validation images" in facts["note"]


def test_a_tie_within_noise_goes_to_the_fine_tuned_model_only_with_a_loss_lower_by_the_margin():
    labels = np.arange(120) % 4
    head = one_hot_probs(labels, np.arange(120) % 8 != 0, k=4, confidence=0.8)  # 105 of 120 right
    one_more = np.arange(120) % 8 != 0
    one_more[0] = True  # fine-tuning gets one more image right: noise
    for confidence, kept in ((0.77, "linear-head"), (0.78, "fine-tuned")):  # loss 0.6 % lower, then 1.8 % lower
        facts = compare_on_validation(one_hot_probs(labels, one_more, k=4, confidence=confidence), labels, head, labels)
        assert facts["difference_interval"][0] <= 0 <= facts["difference_interval"][1]
        assert facts["kept"] == kept and "lower by 1% or more wins" in facts["decided_by"]


def test_unpaired_labels_have_no_interval_and_use_cross_entropy():
    labels = np.arange(12) % 3
    facts = compare_on_validation(one_hot_probs(labels, labels >= 0, confidence=0.9), labels,
                                  one_hot_probs(labels[:10], labels[:10] >= 0, confidence=0.8), labels[:10])
    assert facts["accuracy_difference_interval"] == [-1.0, 1.0] and facts["kept"] == "fine-tuned"


def test_paired_interval_brackets_the_mean_difference():
    a, b = np.arange(100) % 4 != 0, np.arange(100) % 2 == 0   # 75 % vs 50 %
    low, high = paired_interval(a, b, 2000, 0.9, seed=1)
    assert low < 0.25 < high and low > 0


def recipe(tmp_path, rate):
    path = tmp_path / f"r{rate}.toml"
    path.write_text(f'strategy = "partial"\nunfreeze_stages = 1\nepochs = 2\nbatch_size = 8\npatience = 5\n'
                    f'augmentation = "none"\nfeature_views = 0\noptimizer = "sgd"\nmomentum = 0.0\n'
                    f'learning_rate = {rate}\n')
    return str(path)


def test_a_wrecked_fine_tuning_keeps_the_linear_head(shapes, tiny_base, tmp_path):
    keras = import_keras()
    recorder = Recorder()
    out = tmp_path / "run"
    metrics = api.train(shapes, str(tiny_base), out=out, image_size=32, similarity="similar",
                        recipe=recipe(tmp_path, 30.0), reporter=recorder)
    assert metrics["kept"] == "linear-head", metrics["comparison"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["comparison"]["linear_head"]["accuracy"] >= saved["comparison"]["fine_tuned"]["accuracy"]
    assert any(n.startswith("kept the linear head") for n in recorder.notes)
    model = keras.saving.load_model(out / "model.keras")
    base = keras.saving.load_model(tiny_base)
    for layer in (layer for layer in base.layers if layer.weights):
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)   # the backbone as it was before fine-tuning
    # the kept head is refitted on every label: validated out-of-fold on all of them, not on the hold-out
    assert saved["refit"] == "all labels" and saved["validation"]["method"] == "out-of-fold"
    assert saved["n_val"] == saved["n_train"] > saved["comparison"]["n_val"]


def test_a_sound_fine_tuning_records_the_comparison(shapes, tiny_base, tmp_path):
    metrics = api.train(shapes, str(tiny_base), out=tmp_path / "run", image_size=32, similarity="similar",
                        recipe=recipe(tmp_path, 0.001), reporter=Recorder())
    comparison = metrics["comparison"]
    assert metrics["kept"] in ("fine-tuned", "linear-head")
    if metrics["kept"] == "fine-tuned":  # a kept linear head is refitted on every label (test above)
        assert comparison["n_val"] == metrics["n_val"] and metrics["val_accuracy"] == comparison["fine_tuned"]["accuracy"]
    else:
        assert metrics["refit"] == "all labels" and metrics["n_val"] > comparison["n_val"]
