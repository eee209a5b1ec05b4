"""`finetune train` vs the Keras transfer-learning guide's recipe, same backbone and data.

Usage: python benchmarks/train.py [--repeat N] [--skip-whole] [--only NAME]

Datasets (each split into a training folder and a held-out test folder):
  signs-20:    ../shared/datasets/sign_language_digits, 20 train + 20 test photos per class
  digits-10:   scikit-learn's 8x8 digits drawn as 64-px images, 10 train + 30 test per class
               (small and unlike ImageNet)
  signs-whole: every sign photo, 80 % train / 20 % test per class (`large`: fine-tuning)
Both tools: EfficientNet-Lite0 from ../shared/backbones at 224 px, whole processes.
Ours = `finetune train --test-dir` (training and test evaluation in one process,
as theirs); theirs = keras_guide_baseline.py. Also: a warm rerun of ours
(features cached) against its cold run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, finetune_cmd, measure, require, printed
from PIL import Image

HERE = Path(__file__).parent


def split_signs(root: Path, per_class: int | None, seed: int = 0) -> tuple[Path, Path]:
    """per_class train + per_class test photos per class, or (None) all of them split 80/20."""
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        picked = rng.permutation(len(files))
        n_train = per_class if per_class else int(round(0.8 * len(files)))
        n_test = per_class if per_class else len(files) - n_train
        for part, idx in (("train", picked[:n_train]), ("test", picked[n_train:n_train + n_test])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                (root / part / folder.name / files[i].name).write_bytes(files[i].read_bytes())
    return root / "train", root / "test"


def write_digits(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        for part, chosen in (("train", idx[:train_per_class]), ("test", idx[train_per_class:train_per_class + test_per_class])):
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
                Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root / "train", root / "test"


def compare(name: str, train_dir: Path, test_dir: Path, tmp: Path, repeat: int = 1, rerun: bool = True) -> None:
    """Ours and theirs in turn, `repeat` times; medians of the wall times and of the paired ratios."""
    ours, theirs, ratios, warms = [], [], [], []
    for i in range(repeat):
        cache, run = tmp / f"cache-{name}-{i}", tmp / f"run-{name}-{i}"
        cold = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", run, "--cache-dir", cache,
                                    "--test-dir", test_dir))
        metrics = json.loads((run / "metrics.json").read_text())
        if rerun:
            warm = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", tmp / f"warm-{name}-{i}",
                                        "--cache-dir", cache, "--test-dir", test_dir))
            warms.append(warm["wall"] / cold["wall"])
        guide = measure([sys.executable, HERE / "keras_guide_baseline.py", train_dir, test_dir, BACKBONE])
        guide_acc = printed(guide["output"], "TEST_ACCURACY")
        ours.append((cold["wall"], metrics["test_accuracy"]))
        theirs.append((guide["wall"], guide_acc))
        ratios.append(cold["wall"] / guide["wall"])
    med = lambda values: float(np.median(values))
    target = 1.0 if name == "signs-whole" else 0.33
    print(f"{name}: ours {metrics['strategy']} ({metrics['similarity']}, {metrics['size_category']}): "
          f"{med([w for w, _ in ours]):.1f} s, test accuracy {med([a for _, a in ours]):.1%} | Keras guide: "
          f"{med([w for w, _ in theirs]):.1f} s, test accuracy {med([a for _, a in theirs]):.1%} | time ratio "
          f"ours/theirs {med(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}; target <= {target}) | warm rerun "
          f"{med(warms) if warms else float('nan'):.2f} of cold (target <= 0.5) | medians of {repeat} | "
          f"our last phases {metrics['timings_s']}" + (f", fine-tuning {metrics['fine_tuning_s']}"
                                                      if "fine_tuning_s" in metrics else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="alternate ours and theirs this many times")
    parser.add_argument("--skip-whole", action="store_true", help="skip the whole signs dataset (~10 min)")
    parser.add_argument("--only", choices=["signs-20", "digits-10", "signs-whole"], default=None)
    args = parser.parse_args()
    require(BACKBONE, SIGNS)
    wanted = lambda name: args.only in (None, name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wanted("signs-20"):
            compare("signs-20", *split_signs(tmp / "signs", 20), tmp, args.repeat)
        if wanted("digits-10"):
            compare("digits-10", *write_digits(tmp / "digits", 10, 30), tmp, args.repeat)
        if wanted("signs-whole") and not args.skip_whole:
            # Fine-tuning recomputes every epoch, so a warm rerun saves only phase 1: not rerun here.
            compare("signs-whole", *split_signs(tmp / "signs-whole", None), tmp, repeat=1, rerun=False)


if __name__ == "__main__":
    main()
