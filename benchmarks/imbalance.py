"""Imbalanced classes, measured by macro-F1: the automatic plan against the Keras guide's recipe.

Usage: python benchmarks/imbalance.py --data FOLDER [--ratio 10] [--largest 200] [--test-per-class 50]
       [--draws 2] [--first-draw 0]

From a real photo set (one subfolder per class; TrashNet in the README), each
draw builds a training folder imbalanced `--ratio` x: the classes, in order
of their own size, get `--largest` down to `--largest / --ratio` photos on a
geometric scale; and a balanced test folder of `--test-per-class` other
photos per class (so macro-F1 and accuracy weigh every class alike). Whole
processes, each with its own cold cache:
- `finetune train` as decided (class weights, choices by macro-F1);
- `finetune train --strategy linear`;
- the same linear head with the imbalance remedy off (no class weights,
  choices by accuracy), then prior correction of its test predictions
  (each class's probability divided by its training share);
- the Keras guide's recipe (`keras_guide_baseline.py`, same backbone),
  without and with class weights, and without them plus prior correction.
It prints each one's test macro-F1, accuracy and wall time, then the medians over draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, distinct_files, finetune_cmd, measure, print_medians, printed, require, split_class

HERE = Path(__file__).parent
OFF = json.dumps({"scan": {"imbalance_warn_ratio": 1e9}, "strategy": "linear"})  # weights and macro-F1 choices both off


def draw(data: Path, root: Path, ratio: float, largest: int, test_per_class: int, seed: int) -> tuple[Path, Path]:
    """(train folder, test folder) of one draw (see the module docstring)."""
    rng = np.random.default_rng(seed)
    classes = sorted((p for p in data.iterdir() if p.is_dir()), key=lambda p: -len(list(p.iterdir())))
    counts = np.round(largest * ratio ** (-np.arange(len(classes)) / (len(classes) - 1))).astype(int)
    for folder, n in zip(classes, counts):
        files = distinct_files(folder)
        if len(files) < n + test_per_class:
            sys.exit(f"{folder} has {len(files)} distinct photos: needs {n + test_per_class}; lower --largest")
        split_class(files, root, folder.name, n, test_per_class, rng)
    return root / "train", root / "test"


def prior_corrected(run: Path, train_dir: Path, test_dir: Path) -> dict:
    """Test macro-F1 and accuracy of `run`'s model after dividing each class's probability by its training share."""
    import keras

    from finetune_cli.analysis.scores import metric_value
    from finetune_cli.data.scan import scan_folder
    from finetune_cli.models.inference import probabilities

    classes = json.loads((run / "labels.json").read_text())
    share = np.array([len(list((train_dir / c).iterdir())) for c in classes], float)
    model = keras.saving.load_model(run / "model.keras")
    scan = scan_folder(test_dir)
    probs, ok = probabilities(model, scan, model.input_shape[1])
    truth = np.array([classes.index(r.label) for r in scan.images])[ok]
    guess = (probs[ok] / (share / share.sum())).argmax(1)
    return {"macro_f1": metric_value("macro_f1", truth, guess), "accuracy": metric_value("accuracy", truth, guess)}


def one_draw(args, seed: int, tmp: Path) -> dict:
    train_dir, test_dir = draw(args.data, tmp / f"draw{seed}", args.ratio, args.largest, args.test_per_class, seed)
    rows = {}
    for label, cmd in (("auto", ["train"]), ("linear", ["train", "--strategy", "linear"])):
        out, cache = tmp / f"{label}-{seed}", tmp / f"cache-{label}-{seed}"
        done = measure(finetune_cmd(*cmd, train_dir, "--base", BACKBONE, "--out", out, "--test-dir", test_dir,
                                    "--cache-dir", cache, "--seed", seed))
        test = json.loads((out / "metrics.json").read_text())["test"]
        rows[label] = {"macro_f1": test["macro_f1"], "accuracy": test["accuracy"], "wall": done["wall"]}
    out = tmp / f"off-{seed}"
    done = measure([sys.executable, HERE / "train_with.py", OFF, train_dir, BACKBONE, out, tmp / f"cache-off-{seed}",
                    test_dir])
    test = json.loads((out / "metrics.json").read_text())["test"]
    rows["linear, no remedy"] = {"macro_f1": test["macro_f1"], "accuracy": test["accuracy"], "wall": done["wall"]}
    rows["linear, prior correction"] = {**prior_corrected(out, train_dir, test_dir), "wall": done["wall"]}
    for label, extra in (("guide", []), ("guide, class weights", ["--class-weight"])):
        done = measure([sys.executable, HERE / "keras_guide_baseline.py", train_dir, test_dir, BACKBONE, *extra])
        value = lambda key: printed(done["output"], key)  # noqa: E731
        rows[label] = {"macro_f1": value("TEST_MACRO_F1"), "accuracy": value("TEST_ACCURACY"), "wall": done["wall"]}
        if not extra:
            rows["guide, prior correction"] = {"macro_f1": value("TEST_MACRO_F1_PRIOR"), "accuracy": float("nan"),
                                               "wall": done["wall"]}
    for label, row in rows.items():
        print(f"draw {seed}: {label:26s} macro-F1 {row['macro_f1']:.3f}  accuracy {row['accuracy']:.3f}  "
              f"{row['wall']:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--largest", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--first-draw", type=int, default=0, help="the seed of the first draw (more draws later)")
    args = parser.parse_args()
    require(args.data, BACKBONE)
    with tempfile.TemporaryDirectory() as tmp:
        draws = [one_draw(args, seed, Path(tmp)) for seed in range(args.first_draw, args.first_draw + args.draws)]
    print_medians(draws, "guide", {"macro_f1": "macro-F1", "accuracy": "accuracy"})


if __name__ == "__main__":
    main()
