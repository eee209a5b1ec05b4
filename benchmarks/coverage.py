"""Prediction sets: does `--coverage P` hold on real held-out photos, and how large are the sets?

Usage: python benchmarks/coverage.py [--data FOLDER] [--per-class 30] [--test-per-class 60] [--seeds 0 1 2]

On `--per-class` labelled photos per class of a real photo folder (default
the sign-language digits, ../shared/datasets/sign_language_digits, 10
classes) and `--test-per-class`
other photos per class (disjoint by content; `labels.draw`), for each seed
(a different draw), as whole processes: `finetune train` as it decides (its
validation probabilities, out-of-fold on every labelled photo for a linear
plan, are the calibration set), then `finetune evaluate RUN TEST --coverage P
--json` for P in 0.8 and 0.9. It prints, per seed and P, the empirical
coverage on the test photos, the mean set size, the top-1 accuracy, and the
medians. The guarantee (split conformal, LAC) is coverage >= P in expectation
over draws, and never below the top-1 accuracy (a set always holds the most
probable class); any one draw varies around it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import BACKBONE, SIGNS, finetune_cmd, require
from labels import draw

TARGETS = (0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SIGNS)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    require(BACKBONE, args.data)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            train, test = draw(Path(tmp), args.per_class, args.test_per_class, seed, args.data)
            run = Path(tmp) / "run"
            subprocess.run(finetune_cmd("train", train, "--base", BACKBONE, "--out", run, "--seed", seed),
                           check=True, capture_output=True)
            for target in TARGETS:
                shown = subprocess.run(finetune_cmd("evaluate", run, test, "--coverage", target, "--json"),
                                       check=True, capture_output=True, text=True).stdout
                found = json.loads(shown)
                rows.append({"seed": seed, "target": target, "coverage": found["coverage"],
                             "mean_set_size": found["mean_set_size"], "accuracy": found["accuracy"],
                             "n_test": found["n_images"], "n_calibration": found["n_calibration"]})
                print(json.dumps(rows[-1]), flush=True)
    for target in TARGETS:
        mine = [r for r in rows if r["target"] == target]
        print(f"coverage {target}: median empirical {statistics.median(r['coverage'] for r in mine):.3f} "
              f"(range {min(r['coverage'] for r in mine):.3f}-{max(r['coverage'] for r in mine):.3f}), "
              f"median set size {statistics.median(r['mean_set_size'] for r in mine):.2f}, median top-1 accuracy "
              f"{statistics.median(r['accuracy'] for r in mine):.3f}, on {mine[0]['n_test']} test photos, "
              f"calibrated on {mine[0]['n_calibration']}")


if __name__ == "__main__":
    main()
