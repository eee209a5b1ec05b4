"""Knowledge distillation on scikit-learn's digits: a LeNet student, hard labels vs distilled.

Usage: python benchmarks/distill.py [--train-per-class N] [--teacher-base B] [--epochs E]

Data: the 8x8 digits drawn as 32-px PNGs; N labelled training images per class,
30 test images per class, and every remaining digit as an unlabeled transfer
set (about 1 000 images). Teacher: `finetune train` on the labelled images
(default: EfficientNet-Lite0, ImageNet weights, at 64 px, the plan `train`
chooses; `--teacher-strategy partial` keeps the whole 3.4 M-parameter network;
the teacher sees the same files at its own size). Students: `lenet` (random init, 32 px), trained
by `finetune distill` on hard labels alone and distilled (T = 4, alpha = 0.5,
the transfer set soft-only); then a rerun without the transfer set (the
ablation), which must run no teacher: its outputs are cached.
Prints distill.json's table and the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import finetune_cmd, measure
from PIL import Image


def write_digits(root: Path, train_per_class: int, test_per_class: int, size: int = 32,
                 seed: int = 0) -> tuple[Path, Path, Path]:
    """(train, test, unlabeled) folders of the digits as `size`-px PNGs; the rest of the digits unlabeled."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        parts = (("train", idx[:train_per_class]), ("test", idx[train_per_class:train_per_class + test_per_class]),
                 ("unlabeled", idx[train_per_class + test_per_class:]))
        for part, chosen in parts:
            folder = root / part / (str(label) if part != "unlabeled" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
                Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root / "train", root / "test", root / "unlabeled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=10)
    parser.add_argument("--teacher-base", default="efficientnet_lite0")
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--teacher-strategy", default="auto",
                        help="train --strategy of the teacher (partial: the whole backbone is kept, fine-tuned)")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test, unlabeled = write_digits(tmp / "digits", args.train_per_class, 30)
        cache = tmp / "cache"
        teacher = measure(finetune_cmd("train", train, "--base", args.teacher_base, "--image-size", args.teacher_size,
                                       "--strategy", args.teacher_strategy,
                                       "--out", tmp / "teacher", "--cache-dir", cache, "--test-dir", test))
        common = ["--teacher", tmp / "teacher", "--student", "lenet", "--image-size", 32, "--unlabeled", unlabeled,
                  "--test-dir", test, "--epochs", args.epochs, "--cache-dir", cache]
        cold = measure(finetune_cmd("distill", train, *common, "--out", tmp / "student"))
        without = [str(a) for a in common if str(a) not in ("--unlabeled", str(unlabeled))]
        warm = measure(finetune_cmd("distill", train, *without, "--out", tmp / "again"))
        table = json.loads((tmp / "student" / "distill.json").read_text())
        rerun = json.loads((tmp / "again" / "distill.json").read_text())
        n_unlabeled = table["unlabeled_images"]
        print(f"digits at 32 px: {args.train_per_class} labelled images per class, {n_unlabeled} unlabeled, "
              f"300 test; teacher {args.teacher_base} at {args.teacher_size} px; T={table['temperature']:g}, "
              f"alpha={table['alpha']:g}")
        print(f"{'model':<40}{'test acc':>9}{'params':>10}{'bytes':>10}{'ms/img b1':>11}{'ms/img b32':>11}")
        for rows, tag in ((table["rows"], ""), (rerun["rows"][2:], ", no transfer set")):
            for row in rows:
                print(f"{row['model'] + tag:<40}{row['accuracy']:>9.3f}{row['params']:>10}{row['bytes']:>10}"
                      f"{row['ms_batch1']:>11.3f}{row['ms_batch32']:>11.3f}")
        print(f"wall: teacher train {teacher['wall']:.1f} s; distill {cold['wall']:.1f} s (teacher images "
              f"computed: {table['teacher_images_computed']}); rerun without the transfer set "
              f"{warm['wall']:.1f} s (teacher images computed: {rerun['teacher_images_computed']})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
