"""Every label used: the linear head validated out-of-fold and refitted on all labels, vs a hold-out.

Usage: python benchmarks/labels.py [--set signs|digits|mri [--mri DIR]] [--per-class 10] [--test-per-class 60] [--seeds 0 1 2]
                                   [--no-guide]

On `--per-class` labelled photos per class of the sign-language digits
(../shared/datasets/sign_language_digits, 10 classes) and `--test-per-class`
other photos per class as the test folder (disjoint by content), or with
`--set digits` scikit-learn's 8x8 digits drawn at 64 px (unlike ImageNet, not
photos; benchmarks/train.py `write_digits`), or with `--set mri --mri DIR` the brain
MRI scans of a checkout's `Training/` folder (4 classes; see decision.py), for each
seed (a different draw of the labelled photos), as whole processes:
- `finetune train` as it now decides (no --val-dir: C, and the features where
  the plan compares them, by k-fold CV on every labelled image, the head
  refitted on all of them, calibrated on out-of-fold probabilities);
  (after one untimed warm-up run, each of these two is run twice, in the
  order A B A B, each run with its own cold feature cache: the wall time is
  their median; the accuracy is the same both times)
- the same with the previous settings: a 20 % hold-out and the 3-point grid
  C in (0.01, 0.1, 1), 3 folds (benchmarks/train_with.py);
- a logistic regression on the raw pixels of the same labelled images
  (16x16 and 32x32 RGB, standardised, C by 5-fold CV over 1e-4..1e2);
- the Keras guide's recipe (keras_guide_baseline.py), same backbone.
It prints each one's test accuracy and wall time per seed, then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, distinct_files, finetune_cmd, measure, require, split_class, printed

HERE = Path(__file__).parent
OLD = {"cross_validate": False, "strategy": "auto", "similarity": "auto",
       "linear": {"c_grid": [0.01, 0.1, 1.0], "c_range": [0.01, 1.0], "folds": 3}}


def draw(root: Path, per_class: int, test_per_class: int, seed: int, data: Path = SIGNS) -> tuple[Path, Path]:
    """train/ and test/ folders of distinct photos of `data` (by content): no test photo is also a training photo."""
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = distinct_files(folder, max_bytes=1_000_000)  # skip the three 3024 px phone photos
        split_class(files, root, folder.name, per_class, test_per_class, rng)
    return root / "train", root / "test"


def pixels(folder: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, side*side*3) in [0, 1], labels (n,)) of a class-folder tree."""
    from PIL import Image

    x, y = [], []
    for label, sub in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(sub.iterdir()):
            with Image.open(path) as image:
                x.append(np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), np.float32).ravel() / 255)
            y.append(label)
    return np.stack(x), np.array(y)


def raw_pixel_accuracy(train_dir: Path, test_dir: Path) -> tuple[float, str]:
    """Best test accuracy of a CV-tuned logistic regression on raw pixels, and which side won."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's notices of coming defaults
    results = []
    for side in (16, 32):
        (x, y), (xt, yt) = pixels(train_dir, side), pixels(test_dir, side)
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, max_iter=2000,
                                                                   scoring="accuracy"))
        results.append((float((model.fit(x, y).predict(xt) == yt).mean()), f"{side}x{side}"))
    return max(results)


def run_seed(seed: int, args, tmp: Path, guide: bool) -> dict:
    if args.set == "digits":
        from train import write_digits

        train_dir, test_dir = write_digits(tmp / f"seed{seed}", args.per_class, args.test_per_class, seed)
    else:  # the signs, or (--set mri) the brain MRI scans of a checkout's Training/ folder
        data = args.mri / "Training" if args.set == "mri" else SIGNS
        train_dir, test_dir = draw(tmp / f"seed{seed}", args.per_class, args.test_per_class, seed, data)
    rows = {"all labels (now)": [], "hold-out, 3 C (before)": []}
    # an untimed first run: the first process after the photos are drawn is measurably slower (about 10 s
    # here, whichever variant it is), which would otherwise be charged to one side
    measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", tmp / f"warm-{seed}", "--test-dir", test_dir,
                         "--cache-dir", tmp / f"cache-warm-{seed}"))
    for turn, name in enumerate(["all labels (now)", "hold-out, 3 C (before)"] * 2):  # A B A B: order effects cancel
        out, cache = tmp / f"run-{seed}-{turn}", tmp / f"cache-{seed}-{turn}"  # each run with its own cold cache
        if name.endswith("(now)"):
            cmd = finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", out, "--test-dir", test_dir,
                               "--cache-dir", cache)
        else:
            cmd = [sys.executable, HERE / "train_with.py", json.dumps(OLD), train_dir, BACKBONE, out, cache, test_dir]
        done = measure(cmd)
        rows[name].append((json.loads((out / "metrics.json").read_text()), done["wall"]))
    rows = {name: (runs[0][0], statistics.median(w for _, w in runs)) for name, runs in rows.items()}
    result = {name: {"test": m["test_accuracy"], "wall": w, "C": m.get("C"), "features": m.get("features"),
                     "fit_s": m["timings_s"].get("train"),
                     "strategy": m["strategy"], "n_train": m["n_train"], "n_val": m["n_val"]}
              for name, (m, w) in rows.items()}
    start = time.perf_counter()
    accuracy, side = raw_pixel_accuracy(train_dir, test_dir)
    result["raw pixels LR"] = {"test": accuracy, "wall": time.perf_counter() - start, "features": side}
    if guide:
        run = measure([sys.executable, HERE / "keras_guide_baseline.py", train_dir, test_dir, BACKBONE])
        result["Keras guide"] = {"test": printed(run["output"], "TEST_ACCURACY"), "wall": run["wall"]}
    for name, row in result.items():
        extra = "".join(f", {k} {row[k]}" for k in ("strategy", "features", "C", "n_train", "n_val", "fit_s") if row.get(k))
        print(f"seed {seed}: {name}: test {row['test']:.1%} in {row['wall']:.0f} s{extra}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["signs", "digits", "mri"], default="signs")
    parser.add_argument("--mri", type=Path, help="with --set mri: a checkout of the brain MRI set (decision.py)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-guide", action="store_true")
    args = parser.parse_args()
    require(BACKBONE, SIGNS, *([args.mri] if args.set == "mri" else []))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(seed, args, Path(tmp), not args.no_guide) for seed in args.seeds]
    print(f"\nmedians over seeds {args.seeds}, {args.per_class} labelled photos per class, "
          f"{args.test_per_class} test photos per class:")
    base = statistics.median(r["all labels (now)"]["wall"] for r in results)
    for name in results[0]:
        acc = statistics.median(r[name]["test"] for r in results)
        wall = statistics.median(r[name]["wall"] for r in results)
        print(f"  {name:24s} test {acc:.1%}   wall {wall:5.0f} s   ({wall / base:.2f}x the new default's time)")


if __name__ == "__main__":
    main()
