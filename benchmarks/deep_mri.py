"""What fine-tuning itself reaches on the brain-MRI set, with the keep rule off: is there a fine-tuning that
beats the stage-4 linear head the plan keeps there (84.8 %) by enough to be worth a cell of its own?

Usage: python benchmarks/deep_mri.py --mri DIR [--seeds 0,1] [--only NAME,...] [--keep DIR]

DIR is a checkout of github.com/SartajBhuvaji/Brain-Tumor-Classification-DataSet (see decision.py: the same
600 training and 400 test scans). Each variant is `partial` on cached frozen-prefix activations (2 cached
views), trained for up to 16 epochs (early stopping at patience 5) on the run's own 80 % split, with the keep
rule, the pilot and the refit on all labels off (`TrainConfig.keep_better = False`, `refit_fine_tuned =
False`), so the test accuracy is the fine-tuned model's own. Each seed changes the hold-out split and the
initial shuffles. Prints one JSON line per (variant, seed): test and validation accuracy, best epoch, wall s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import BACKBONE, require
from decision import mri

from finetune_cli import api
from finetune_cli.config import TRAIN

BASE = {"strategy": "partial", "learning_rate": 1e-3, "epochs": 16, "patience": 5, "feature_views": 2}
VARIANTS = {
    "stage5": {"unfreeze_stages": 1, "top_stages": 1},  # the shipped cell, trained longer
    "stage5-mixup": {"unfreeze_stages": 1, "top_stages": 1, "mixup": 0.4},
    "stages45-mixup": {"unfreeze_stages": 2, "top_stages": 1, "mixup": 0.4},  # stage 4 at 1/100
    "stages45-top-mixup": {"unfreeze_stages": 2, "top_stages": 2, "mixup": 0.4},  # stage 4 at 1/10 too
    "stages45-top": {"unfreeze_stages": 2, "top_stages": 2},
}


def run(name: str, train: Path, test: Path, tmp: Path, seed: int) -> dict:
    recipe = tmp / f"{name}.toml"
    recipe.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {"name": name, **BASE, **VARIANTS[name]}.items()))
    settings = dataclasses.replace(TRAIN, keep_better=False, refit_fine_tuned=False)
    started = time.perf_counter()
    metrics = api.train(train, str(BACKBONE), out=tmp / f"run-{name}-{seed}", strategy="partial", recipe=str(recipe),
                        test_dir=test, cache_dir=tmp / "cache", settings=settings, seed=seed)
    return {"variant": name, "seed": seed, "test": metrics["test_accuracy"], "val": metrics["val_accuracy"],
            "best_epoch": metrics["best_epoch"], "wall": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mri", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    require(BACKBONE, args.mri)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        train, test = mri(args.mri, tmp / "mri")
        for name in args.only.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                print(json.dumps(run(name, train, test, tmp, seed)), flush=True)


if __name__ == "__main__":
    main()
