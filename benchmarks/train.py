"""`finetune train` vs the Keras transfer-learning guide's recipe, same backbone and data.

Usage: python benchmarks/train.py [--skip-whole]

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

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import BACKBONE, SIGNS, finetune_cmd, measure, require

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


def compare(name: str, train_dir: Path, test_dir: Path, tmp: Path, rerun: bool = True) -> None:
    cache = tmp / f"cache-{name}"
    run = tmp / f"run-{name}"
    ours_train = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", run, "--cache-dir", cache,
                                      "--test-dir", test_dir))
    metrics = json.loads((run / "metrics.json").read_text())
    ours_acc, ours = metrics["test_accuracy"], ours_train["wall"]
    warm = measure(finetune_cmd("train", train_dir, "--base", BACKBONE, "--out", tmp / f"warm-{name}", "--cache-dir", cache,
                                "--test-dir", test_dir)) if rerun else {"wall": float("nan")}
    theirs_run = measure([sys.executable, HERE / "keras_guide_baseline.py", train_dir, test_dir, BACKBONE])
    theirs_acc = float(theirs_run["output"].split("TEST_ACCURACY")[-1])
    theirs = theirs_run["wall"]
    print(f"{name}: ours {metrics['strategy']} ({metrics['similarity']}, {metrics['size_category']}): "
          f"{ours:.1f} s, test accuracy {ours_acc:.1%} | Keras guide: {theirs:.1f} s, test accuracy {theirs_acc:.1%} "
          f"| time ratio ours/theirs {ours / theirs:.2f} (target <= 0.33) | warm rerun {warm['wall']:.1f} s = "
          f"{warm['wall'] / ours_train['wall']:.2f} of cold (target <= 0.5) | our phases {metrics['timings_s']}")


def main() -> None:
    require(BACKBONE, SIGNS)
    whole = "--skip-whole" not in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compare("signs-20", *split_signs(tmp / "signs", 20), tmp)
        compare("digits-10", *write_digits(tmp / "digits", 10, 30), tmp)
        if whole:
            # Fine-tuning recomputes every epoch, so a warm rerun saves only phase 1: not rerun here.
            compare("signs-whole", *split_signs(tmp / "signs-whole", None), tmp, rerun=False)


if __name__ == "__main__":
    main()
