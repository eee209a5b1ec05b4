"""`partial` on cached frozen-prefix activations against end to end, on two real 10-class photo sets.

Usage:
    python benchmarks/views.py --set signs [--seeds 3]
    python benchmarks/views.py --set clothing --data CLOTHING_DIR [--seeds 3] [--ways cached,end-to-end]

Sets (10 classes each):
  signs:    sign-language digits (../shared/datasets), 100 training photos per
            class, the rest as the test folder; validation is the run's own
            20 % split;
  clothing: a checkout of github.com/alexeygrigorev/clothing-dataset-small
            (CC0; train/ validation/ test/ folders): the first 100 distinct
            files per class of train/ (1,000 photos), validation/ as --val-dir
            (341), test/ as the test folder (372); files whose content is
            already in another part are left out.

Ways, each a whole `finetune train --strategy partial` process (train_with.py)
with its own cold cache, in turn, once per seed:
  cached:     the default: the frozen prefix runs once per image and cached
              view (2 flipped/cropped views), the top stage trains on them;
  shift:      the same, each activation map also translated by up to one cell
              per batch (TrainConfig.activation_shift = 1);
  end-to-end: the frozen stages run every epoch on on-line augmented images;
and once per set: `--strategy linear`, and the Keras guide's recipe
(keras_guide_baseline.py, on the training folder).

Prints each run (wall time, test accuracy, best epoch, epochs) and, per way,
medians over seeds with the time as a ratio of the end-to-end run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import BACKBONE, SIGNS, measure, printed, require

HERE = Path(__file__).parent
WAYS = {"cached": {}, "shift": {"activation_shift": 1}, "end-to-end": {"cache_prefix": False}}


def signs(root: Path, per_class: int = 100) -> tuple[Path, Path | None, Path]:
    """(train, None, test) folders: the first `per_class` files of each class to train, the rest to test."""
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        for part, chosen in (("train", files[:per_class]), ("test", files[per_class:])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy2(path, root / part / folder.name / path.name)
    return root / "train", None, root / "test"


def clothing(src: Path, root: Path, per_class: int = 100) -> tuple[Path, Path, Path]:
    """(train, validation, test) folders from the clothing checkout, distinct by content across all three."""
    seen: set[str] = set()
    for part in ("validation", "test", "train"):
        for folder in sorted(p for p in (src / part).iterdir() if p.is_dir()):
            kept = 0
            for path in sorted(folder.iterdir()):
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                if digest in seen or (part == "train" and kept >= per_class):
                    continue
                seen.add(digest)
                kept += 1
                (root / part / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, root / part / folder.name / path.name)
    return root / "train", root / "validation", root / "test"


def ours(tmp: Path, name: str, changes: dict, train: Path, val: Path | None, test: Path) -> dict:
    run = tmp / name
    changes = {**changes, **({"val_dir": str(val)} if val else {})}
    timing = measure([sys.executable, HERE / "train_with.py", json.dumps(changes), train, BACKBONE, run,
                      tmp / f"cache-{name}", test])
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = len((run / "history.csv").read_text().splitlines()) - 1 if (run / "history.csv").exists() else 0
    shutil.rmtree(run)
    shutil.rmtree(tmp / f"cache-{name}", ignore_errors=True)
    flip = {k: metrics["flip_check"][k] for k in ("accuracy", "accuracy_mirrored", "flips")} if "flip_check" in metrics else None
    return {"wall": timing["wall"], "test": metrics["test_accuracy"], "best_epoch": metrics.get("best_epoch"),
            "epochs": epochs, "kept": metrics.get("kept"), "flip_check": flip,
            "pilot_abandoned": metrics.get("pilot", {}).get("abandoned"), "features": metrics.get("features")}


def guide(train: Path, test: Path) -> dict:
    timing = measure([sys.executable, HERE / "keras_guide_baseline.py", train, test, BACKBONE])
    return {"wall": timing["wall"], "test": printed(timing["output"], "TEST_ACCURACY")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("signs", "clothing"), required=True)
    parser.add_argument("--data", type=Path, help="the clothing-dataset-small checkout (--set clothing)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    args = parser.parse_args()
    ways = {way: WAYS[way] for way in args.ways.split(",")}
    require(BACKBONE, *([SIGNS] if args.set == "signs" else [args.data or Path("--data")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val, test = signs(tmp / "data") if args.set == "signs" else clothing(args.data, tmp / "data")
        results: dict[str, list[dict]] = {way: [] for way in ways}
        for seed in range(args.seeds):
            for way, changes in ways.items():
                row = ours(tmp, f"{way}-{seed}", {**changes, "seed": seed}, train, val, test)
                results[way].append(row)
                print(f"{args.set} {way} seed {seed}: {json.dumps(row)}", flush=True)
        results["linear"] = [ours(tmp, "linear", {"strategy": "linear"}, train, val, test)]
        results["guide"] = [guide(train, test)]
        for way in ("linear", "guide"):
            print(f"{args.set} {way}: {json.dumps(results[way][0])}", flush=True)
        against = "end-to-end" if "end-to-end" in results else "linear"  # --ways without end-to-end
        base = statistics.median(r["wall"] for r in results[against])
        for way, rows in results.items():
            wall, acc = statistics.median(r["wall"] for r in rows), statistics.median(r["test"] for r in rows)
            print(f"{args.set} {way:10s} median {wall:6.1f} s ({wall / base:.2f}x {against}), test accuracy "
                  f"{acc:.1%} (runs {' / '.join(format(r['test'], '.1%') for r in rows)})")


if __name__ == "__main__":
    main()
