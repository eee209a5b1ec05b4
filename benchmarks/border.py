"""The small/large border, checked: a `large` two-class set where fine-tuning may not pay.

Usage: python benchmarks/border.py [--pairs 6,9 1,7] [--per-class 120]

For each pair of sign-language classes (../shared/datasets/sign_language_digits),
`--per-class` training photos per class (the rule says `large` at a median of
100 per class) and the rest of each class as a held-out test folder:
- `finetune train` as decided (fine-tunes, then keeps the fine-tuned model only
  if it beats its own linear head on validation; metrics.json says which);
- the same with `--no-pilot` (the whole fine-tuning schedule is paid before the check);
- `finetune train --strategy linear` (the linear head alone);
- the Keras guide's recipe (keras_guide_baseline.py), same backbone.
It prints each one's test accuracy and wall time (each run with its own cold cache), the pilot's
verdict and the comparison `train` made.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, finetune_cmd, measure, require, printed

HERE = Path(__file__).parent


def two_classes(root: Path, pair: tuple[str, str], per_class: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    for name in pair:
        files = sorted((SIGNS / name).iterdir())
        order = rng.permutation(len(files))
        for part, idx in (("train", order[:per_class]), ("test", order[per_class:])):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                (root / part / name / files[i].name).write_bytes(files[i].read_bytes())
    return root / "train", root / "test"


def run_pair(pair: tuple[str, str], per_class: int, tmp: Path) -> None:
    train_dir, test_dir = two_classes(tmp / "-".join(pair), pair, per_class)
    rows = {}
    for label, extra in (("decided", []), ("no pilot", ["--no-pilot"]), ("linear", ["--strategy", "linear"])):
        out = tmp / f"run-{label.replace(' ', '-')}-{'-'.join(pair)}"
        cache = tmp / f"cache-{label.replace(' ', '-')}-{'-'.join(pair)}"  # each its own cold cache: a first run
        done = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", out, "--test-dir", test_dir,
                                    "--cache-dir", cache, *extra))
        rows[label] = (json.loads((out / "metrics.json").read_text()), done["wall"])
    guide = measure([sys.executable, HERE / "keras_guide_baseline.py", train_dir, test_dir, BACKBONE])
    guide_acc = printed(guide["output"], "TEST_ACCURACY")
    decided, wall = rows["decided"]
    comparison = decided.get("comparison")
    print(f"pair {pair[0]}/{pair[1]}, {per_class} train per class, {decided['n_val']} validation, "
          f"{decided['test']['n_images']} test: decided {decided['strategy']} ({decided['size_category']}), kept "
          f"{decided.get('kept', 'n/a')}: test {decided['test_accuracy']:.1%} in {wall:.0f} s | linear head alone: "
          f"test {rows['linear'][0]['test_accuracy']:.1%} in {rows['linear'][1]:.0f} s | Keras guide: test "
          f"{guide_acc:.1%} in {guide['wall']:.0f} s", flush=True)
    pilot = decided.get("pilot")
    if pilot and "skipped" in pilot:
        print(f"  fine-tuning skipped ({pilot['skipped']}): linear head {pilot['linear_head_val_accuracy']:.1%} on "
              f"{pilot['n_val']} validation images, {pilot['linear_head_cv_accuracy']:.1%} cross-validated",
              flush=True)
    elif pilot:
        print(f"  pilot: abandoned {pilot['abandoned']}; best pilot epoch {pilot['best']['val_accuracy']:.1%} "
              f"(loss {pilot['best']['val_loss']:.3f}) vs linear head {pilot['linear_head']['val_accuracy']:.1%} "
              f"({pilot['linear_head']['val_loss']:.3f}); kept {decided.get('kept')}", flush=True)
    whole, whole_wall = rows["no pilot"]
    print(f"  without the pilot: test {whole['test_accuracy']:.1%} in {whole_wall:.0f} s, kept {whole.get('kept')}; "
          f"decided / linear time {wall / rows['linear'][1]:.2f}x", flush=True)
    if comparison:
        print(f"  comparison: {comparison['note']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["6,9", "1,7"])
    parser.add_argument("--per-class", type=int, default=120)
    args = parser.parse_args()
    require(SIGNS, BACKBONE)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            run_pair(tuple(pair.split(",")), args.per_class, Path(tmp))


if __name__ == "__main__":
    main()
