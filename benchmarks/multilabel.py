"""Multi-label classification on mosaics of real photos: `finetune train` + `evaluate` against a one-vs-rest
logistic regression on raw pixels and the Keras guide's recipe with a sigmoid head.

Usage: python benchmarks/multilabel.py [--train 400] [--test 200] [--draws 3] [--first-draw 0]

Each draw splits the sign-language digit photos (../shared/datasets, Apache-2.0) of every class into a
training pool (70 %) and a test pool (30 %), distinct by content, then builds 224 px mosaics: a 2 x 2 grid
holding 2 or 3 photos of different digits in random cells (the other cells white), labelled with the
digits it holds ("3;7"). Training mosaics draw only on the training pool, test mosaics only on the test
pool, so no test photo is ever seen in training. Whole processes, each with its own cold cache:
- `finetune train TRAIN.csv` (as decided), then `finetune evaluate` on TEST.csv: mAP and macro-F1;
- a one-vs-rest logistic regression (C 1, standardised) on the raw pixels at 32 x 32, each label at 0.5
  (in this process, timed with `time.perf_counter`);
- the Keras guide's recipe with one sigmoid per label (`keras_guide_multilabel.py`, same backbone).
It prints each one's test mAP, macro-F1 and wall time, then the medians over draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, distinct_files, finetune_cmd, measure, print_medians, printed, require
from PIL import Image

HERE = Path(__file__).parent
CELL = 112


def pools(seed: int) -> tuple[dict, dict]:
    """({class: training photos}, {class: test photos}): each class's distinct photos split 70/30 at random."""
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = distinct_files(folder, max_bytes=1_000_000)  # the three phone photos left out
        order = rng.permutation(len(files))
        cut = int(0.7 * len(files))
        train[folder.name] = [files[i] for i in order[:cut]]
        test[folder.name] = [files[i] for i in order[cut:]]
    return train, test


def mosaics(pool: dict, n: int, folder: Path, rng) -> Path:
    """`n` mosaics from `pool` into `folder`, with folder/labels.csv; returns the table's path."""
    folder.mkdir(parents=True)
    classes, rows = sorted(pool), []
    for i in range(n):
        chosen = rng.choice(classes, size=int(rng.integers(2, 4)), replace=False)
        canvas = Image.new("RGB", (2 * CELL, 2 * CELL), (255, 255, 255))
        for cell, name in zip(rng.permutation(4), chosen):
            photo = Image.open(pool[name][int(rng.integers(len(pool[name])))]).convert("RGB").resize((CELL, CELL))
            canvas.paste(photo, ((cell % 2) * CELL, (cell // 2) * CELL))
        canvas.save(folder / f"m{i:04d}.jpg", quality=92)
        rows.append(f"m{i:04d}.jpg,{';'.join(sorted(chosen))}")
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return folder / "labels.csv"


def pixels_baseline(train_csv: Path, test_csv: Path) -> dict:
    """Test mAP and macro-F1 of one-vs-rest logistic regression (C 1) on standardised 32 x 32 pixels."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, f1_score
    from sklearn.preprocessing import StandardScaler

    def table(csv: Path, labels=None):
        rows = pd.read_csv(csv)
        x = np.stack([np.asarray(Image.open(csv.parent / p).convert("RGB").resize((32, 32)), np.float32).ravel()
                      for p in rows["path"]])
        labels = labels or sorted({name for cell in rows["label"] for name in cell.split(";")})
        return x, np.array([[n in cell.split(";") for n in labels] for cell in rows["label"]], int), labels

    x, y, labels = table(train_csv)
    x_test, y_test, _ = table(test_csv, labels)
    scaler = StandardScaler().fit(x)
    probs = np.stack([LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x), y[:, j])
                      .predict_proba(scaler.transform(x_test))[:, 1] for j in range(len(labels))], axis=1)
    return {"map": float(np.mean([average_precision_score(y_test[:, j], probs[:, j]) for j in range(len(labels))])),
            "macro_f1": float(f1_score(y_test, probs >= 0.5, average="macro", zero_division=0))}


def one_draw(args, seed: int, tmp: Path) -> dict:
    rng = np.random.default_rng(1000 + seed)
    train_pool, test_pool = pools(seed)
    train_csv = mosaics(train_pool, args.train, tmp / f"draw{seed}" / "train", rng)
    test_csv = mosaics(test_pool, args.test, tmp / f"draw{seed}" / "test", rng)
    out = tmp / f"run-{seed}"
    trained = measure(finetune_cmd("train", train_csv, "--base", BACKBONE, "--out", out, "--cache-dir",
                                   tmp / f"cache-{seed}", "--seed", seed, "--strategy", args.strategy,
                                   *(["--no-pilot"] if args.no_pilot else [])))
    evaluated = measure(finetune_cmd("evaluate", out, test_csv, "--json"))
    result = json.loads(evaluated["output"][evaluated["output"].index("{"):])
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {"finetune": {"map": result["mean_average_precision"], "macro_f1": result["macro_f1"],
                         "wall": trained["wall"], "stage": next(c["features"] for c in metrics["candidates"]
                                                                if c["chosen"])
                         + (f", fine-tuning {metrics['fine_tuning']}" if "fine_tuning" in metrics else "")}}
    started = time.perf_counter()
    pixels = pixels_baseline(train_csv, test_csv)
    rows["raw pixels, one-vs-rest LR"] = {**pixels, "wall": time.perf_counter() - started}
    done = measure([sys.executable, HERE / "keras_guide_multilabel.py", train_csv, test_csv, BACKBONE])
    rows["Keras guide, sigmoid head"] = {"map": printed(done["output"], "TEST_MAP"),
                                         "macro_f1": printed(done["output"], "TEST_MACRO_F1"), "wall": done["wall"]}
    for label, row in rows.items():
        print(f"draw {seed}: {label:28s} mAP {row['map']:.3f}  macro-F1 {row['macro_f1']:.3f}  {row['wall']:.0f} s"
              + (f"  ({row['stage']})" if "stage" in row else ""), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--strategy", default="auto", choices=["auto", "linear", "partial", "full"],
                        help="finetune train's --strategy (partial/full: multi-label fine-tuning, checked by its pilot)")
    parser.add_argument("--no-pilot", action="store_true", help="fine-tuning runs its whole schedule")
    args = parser.parse_args()
    require(SIGNS, BACKBONE)
    with tempfile.TemporaryDirectory() as tmp:
        draws = [one_draw(args, seed, Path(tmp)) for seed in range(args.first_draw, args.first_draw + args.draws)]
    print_medians(draws, "Keras guide, sigmoid head", {"map": "mAP", "macro_f1": "macro-F1"}, width=28)


if __name__ == "__main__":
    main()
