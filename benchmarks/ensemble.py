"""Single model vs `train --ensemble 5` vs `evaluate --tta 4`, on held-out test photos.

Usage: python benchmarks/ensemble.py [--members 5] [--tta 4]

Datasets (from benchmarks/train.py):
  signs-20:  ../shared/datasets/sign_language_digits, 20 train + 20 test photos per class
  digits-10: scikit-learn's 8x8 digits drawn as 64-px images, 10 train + 30 test per class
EfficientNet-Lite0 from ../shared/backbones at 224 px; the CLI in whole processes.
Test accuracy with a bootstrap 95 % interval over the test images (2000
resamples, seeded); two variants are "within noise" where their intervals
overlap. ECE (validation, 15 bins) before and after calibration from metrics.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import BACKBONE, SIGNS, finetune_cmd, measure, require
from train import split_signs, write_digits


def correct(run: Path, test_dir: Path, tmp: Path, tta: int = 1) -> np.ndarray:
    """(n_test,) bool: the run's predictions on the test folder (by `predict`, TTA views averaged) vs the truth."""
    out = tmp / f"{run.name}-tta{tta}.csv"
    measure(finetune_cmd("predict", run, test_dir, "--out", out, "--tta", tta))
    frame = pd.read_csv(out)
    truth = frame["path"].map(lambda p: Path(p).parent.name)
    return (frame["predicted"].astype(str) == truth.astype(str)).to_numpy()


def interval(hits: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high): the bootstrap 95 % interval of the mean of `hits` (n,) bool."""
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (resamples, len(hits)))].mean(1)
    return float(hits.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def ece_text(metrics: dict) -> str:
    facts = metrics.get("calibration")
    if not facts:
        return "no calibration"
    return (f"ECE {facts['ece_before']:.1%} -> {facts['ece_after']:.1%}"
            + ("" if facts["applied"] else " (not applied)"))


def bench(name: str, train_dir: Path, test_dir: Path, tmp: Path, members: int, tta: int) -> None:
    """Train single and ensemble runs, predict the test folder three ways, print one block."""
    cache, rows = tmp / f"cache-{name}", {}
    runs = {"single": [], f"ensemble {members}": ["--ensemble", members]}
    facts = {}
    for label, extra in runs.items():
        run = tmp / f"{name}-{label.replace(' ', '')}"
        timed = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", run, "--cache-dir", cache,
                                     *extra))
        facts[label] = (json.loads((run / "metrics.json").read_text()), timed["wall"], run)
        rows[label] = interval(correct(run, test_dir, tmp))
    rows[f"single + tta {tta}"] = interval(correct(facts["single"][2], test_dir, tmp, tta))
    single = rows["single"]
    n_test = len(pd.read_csv(tmp / f"{facts['single'][2].name}-tta1.csv"))
    print(f"{name} ({n_test} test images)")
    for label, (acc, low, high) in rows.items():
        overlap = "" if label == "single" else (
            "  within noise of single" if low <= single[2] and single[1] <= high else "  outside single's interval")
        print(f"  {label:18s} test accuracy {acc:.1%} [{low:.1%}, {high:.1%}]{overlap}")
    for label, (metrics, wall, _) in facts.items():
        kept = metrics.get("ensemble", {}).get("kept", "-")
        print(f"  {label:18s} train {wall:.1f} s (warm cache for the second), strategy {metrics['strategy']}, "
              f"val accuracy {metrics['val_accuracy']:.1%}, {ece_text(metrics)}, kept: {kept}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--tta", type=int, default=4)
    args = parser.parse_args()
    require(BACKBONE, SIGNS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench("signs-20", *split_signs(tmp / "signs", 20), tmp, args.members, args.tta)
        bench("digits-10", *write_digits(tmp / "digits", 10, 30), tmp, args.members, args.tta)


if __name__ == "__main__":
    main()
