"""Label forecast: does the curve fitted on half the labels predict the accuracy reached with all of them?

Usage: python benchmarks/forecast.py [--data FOLDER ...] [--test-share 0.25] [--seeds 0 1 2]

For each real photo folder (one subfolder per class; default the sign-language
digits, ../shared/datasets/sign_language_digits) and each seed, as whole
processes:
- the photos are split by content (identical files count once) into a test
  share and a pool, and the pool's first half (per class) is the "half" folder;
- `finetune train HALF --strategy linear` records metrics["learning_curve"]:
  its curve is measured on at most the half folder, and its forecast at 2x the
  labels is the accuracy expected with the whole pool;
- `finetune train POOL --strategy linear`, then `finetune evaluate RUN TEST`:
  the accuracy actually reached with all the labels, on test photos neither
  run trained on;
- the same evaluation of the half run checks the forecast at 1x.
It prints, per folder and seed, the 2x forecast with its 95 % interval, the
accuracy reached, and whether it fell inside; then how many did. The plan is
forced to `linear` so that both runs train the model the curve describes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, finetune_cmd, require


def split(data: Path, root: Path, test_share: float, seed: int) -> tuple[Path, Path, Path]:
    """(half, pool, test) folders under `root`: test and pool disjoint by content, half the pool's first half."""
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        seen, files = set(), []
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                files.append(path)
        order = [files[i] for i in rng.permutation(len(files))]
        n_test = int(round(test_share * len(files)))
        pool = order[n_test:]
        for part, chosen in (("test", order[:n_test]), ("pool", pool), ("half", pool[:len(pool) // 2])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy2(path, root / part / folder.name / path.name)
    return root / "half", root / "pool", root / "test"


def trained_and_scored(folder: Path, test: Path, run: Path, seed: int) -> tuple[dict, dict]:
    """(metrics.json of `finetune train FOLDER --strategy linear`, `finetune evaluate RUN TEST --json`)."""
    subprocess.run(finetune_cmd("train", folder, "--base", BACKBONE, "--strategy", "linear", "--out", run,
                                "--seed", seed), check=True, capture_output=True)
    shown = subprocess.run(finetune_cmd("evaluate", run, test, "--json"), check=True, capture_output=True,
                           text=True).stdout
    return json.loads((run / "metrics.json").read_text()), json.loads(shown)


def one(data: Path, seed: int, test_share: float) -> dict:
    """The forecast of the half run against the accuracy reached by the pool run, for one seed."""
    with tempfile.TemporaryDirectory() as tmp:
        half, pool, test = split(data, Path(tmp), test_share, seed)
        half_metrics, half_test = trained_and_scored(half, test, Path(tmp) / "half-run", seed)
        pool_metrics, pool_test = trained_and_scored(pool, test, Path(tmp) / "pool-run", seed)
    curve = half_metrics["learning_curve"]
    ahead = {r["multiple"]: r for r in curve["forecast"]}
    twice, once = ahead[2.0], ahead[1.0]
    reached = pool_test["accuracy"]
    return {"data": data.name, "seed": seed, "verdict": curve["verdict"], "n_half": half_metrics["n_train"],
            "n_pool": pool_metrics["n_train"], "n_test": pool_test["n_images"],
            "forecast_1x": round(once["accuracy"], 4), "interval_1x": [round(once["low"], 4), round(once["high"], 4)],
            "half_reached": half_test["accuracy"],
            "forecast_2x": round(twice["accuracy"], 4), "interval_2x": [round(twice["low"], 4), round(twice["high"], 4)],
            "pool_reached": reached, "inside_2x": twice["low"] <= reached <= twice["high"],
            "inside_1x": once["low"] <= half_test["accuracy"] <= once["high"], "curve_seconds": curve["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[SIGNS])
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    require(BACKBONE, *args.data)
    rows = []
    for data in args.data:
        for seed in args.seeds:
            rows.append(one(data, seed, args.test_share))
            print(json.dumps(rows[-1]), flush=True)
    for data in args.data:
        mine = [r for r in rows if r["data"] == data.name]
        errors = [r["forecast_2x"] - r["pool_reached"] for r in mine]
        print(f"{data.name}: 2x forecast inside its interval {sum(r['inside_2x'] for r in mine)}/{len(mine)}, "
              f"1x {sum(r['inside_1x'] for r in mine)}/{len(mine)}; forecast - reached at 2x: median "
              f"{100 * float(np.median(errors)):+.1f} points (range {100 * min(errors):+.1f} to "
              f"{100 * max(errors):+.1f}); half {mine[0]['n_half']}, pool {mine[0]['n_pool']}, "
              f"test {mine[0]['n_test']} images")


if __name__ == "__main__":
    main()
