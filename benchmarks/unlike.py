"""`full` fine-tuning on images unlike ImageNet: scikit-learn's digits, 1,100 training images.

Usage: python benchmarks/unlike.py [--train-per-class 110] [--test-per-class 60] [--lr-auto] [--only full]

The set: scikit-learn's 8x8 handwritten digits (UCI, CC BY 4.0), drawn as 64 px
PNGs (benchmarks/train.py `write_digits`), `--train-per-class` to train and
`--test-per-class` others to test, 10 classes. Digits are not photos, a
mirrored digit is not the same digit, and a logistic regression on the raw
pixels beats ImageNet's final features on them.

Runs, each a whole process with its own cold cache, on the same test images:
  full:          `--strategy full` as shipped: the flip check (`train.flips`), and the trouble cell's
                 linear head (earlier stages, raw pixels) as a rival fine-tuning must beat
                 (`train.finetune.feature_rival`);
  full, before:  the same with TrainConfig.flip_check and feature_rival off (as before both);
  full, lr auto: with --lr-auto, also `--strategy full --lr auto` (the rate from the lr-find sweep);
  linear:        `--strategy linear`;
  raw pixels:    a cross-validated logistic regression on the raw pixels (benchmarks/labels.py);
  Keras guide:   keras_guide_baseline.py on the training folder, same backbone.
Prints each run's test accuracy, wall time, and what the flip check measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import BACKBONE, require
from labels import raw_pixel_accuracy
from train import write_digits
from views import guide, ours

RUNS = {"full": {"strategy": "full", "similarity": "different"},
        "full, before": {"strategy": "full", "similarity": "different", "flip_check": False, "feature_rival": False},
        "linear": {"strategy": "linear", "similarity": "different"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=110)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--lr-auto", action="store_true", help="also run full with --lr auto")
    parser.add_argument("--only", help="comma-separated run names (of full, 'full, before', linear) and no baselines")
    args = parser.parse_args()
    runs = {**RUNS, **({"full, lr auto": {**RUNS["full"], "lr": "auto"}} if args.lr_auto else {})}
    runs = {k: v for k, v in runs.items() if args.only is None or k in args.only.split(",")}
    require(BACKBONE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = write_digits(tmp / "digits", args.train_per_class, args.test_per_class)
        for name, changes in runs.items():
            row = ours(tmp, name.replace(", ", "-"), changes, train, None, test)
            print(f"digits {name}: {json.dumps(row)}", flush=True)
        if args.only:
            return
        start = time.perf_counter()
        accuracy, side = raw_pixel_accuracy(train, test)
        print(f"digits raw pixels: {json.dumps({'test': accuracy, 'wall': time.perf_counter() - start, 'side': side})}")
        print(f"digits Keras guide: {json.dumps(guide(train, test))}", flush=True)


if __name__ == "__main__":
    main()
