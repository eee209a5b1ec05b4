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

The forecast's interval is for the accuracy expected on new images; the accuracy
"reached" is measured on a finite test set and carries that set's own sampling
noise (a binomial standard error of about 1.3 points on 629 photos at 88 %).
So each draw is also checked against the interval widened by the test set's own
95 % half-width (the two added in quadrature), and the median error over draws
says whether the forecast leans one way.

`--fast-draws N` adds N more draws in process on one feature table (one
`finetune extract-features` process, then the same head and curve functions
`finetune train --strategy linear` calls: `train.linear.fit_linear` for C,
`train.curve.learning_curve`), so the rate at which the reached accuracy falls
inside the interval is measured on more than three draws.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, features_of, finetune_cmd, require, weighted


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


def widened(forecast: float, low: float, high: float, reached: float, n_test: int) -> bool:
    """Whether `reached` (a share of n_test images) lies in the forecast's interval widened by the test set's
    own 95 % half-width, 1.96 * sqrt(r (1 - r) / n_test), added in quadrature on each side."""
    noise = 1.96 * (reached * (1 - reached) / n_test) ** 0.5
    return forecast - ((forecast - low) ** 2 + noise ** 2) ** 0.5 <= reached <= \
        forecast + ((high - forecast) ** 2 + noise ** 2) ** 0.5


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
            "inside_2x_with_test_noise": widened(twice["accuracy"], twice["low"], twice["high"], reached,
                                                 pool_test["n_images"]),
            "inside_1x": once["low"] <= half_test["accuracy"] <= once["high"], "curve_seconds": curve["seconds"]}


def fast_draws(data: Path, draws: int, test_share: float, first_seed: int, tmp: Path) -> list[dict]:
    """`one`'s check for `draws` more seeds, in process on the features of one `extract-features` run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from finetune_cli.train.curve import learning_curve
    from finetune_cli.train.linear import fit_linear

    x, y, digests = features_of(data, tmp / "f.npz")
    _, first = np.unique(digests, return_index=True)  # one row per content: no photo on both sides
    k, rows = int(y.max()) + 1, []
    for seed in range(first_seed, first_seed + draws):
        rng, half, pool, test = np.random.default_rng(seed), [], [], []
        for c in range(k):  # as `split`: by class, a test share, the pool and the pool's first half
            order = rng.permutation(first[y[first] == c])
            n_test = int(round(test_share * len(order)))
            test += list(order[:n_test])
            pool += list(order[n_test:])
            half += list(order[n_test:][:(len(order) - n_test) // 2])
        head = fit_linear(x[half], y[half], k, balanced=weighted(y[half]), seed=seed)  # as `train` decides
        curve = learning_curve(x[half], y[half], [str(c) for c in range(k)], head.C, balanced=weighted(y[half]),
                               seed=seed)
        grown = fit_linear(x[pool], y[pool], k, balanced=weighted(y[pool]), seed=seed)
        reached = float((grown.probabilities(x[test]).argmax(1) == y[test]).mean())
        twice = {r["multiple"]: r for r in curve["forecast"]}[2.0]
        rows.append({"data": data.name, "seed": seed, "in_process": True, "forecast_2x": round(twice["accuracy"], 4),
                     "interval_2x": [round(twice["low"], 4), round(twice["high"], 4)], "pool_reached": reached,
                     "n_test": len(test), "inside_2x": twice["low"] <= reached <= twice["high"],
                     "inside_2x_with_test_noise": widened(twice["accuracy"], twice["low"], twice["high"], reached,
                                                          len(test))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(name: str, rows: list[dict], how: str) -> str:
    """One line: how often the reached accuracy fell inside the 2x interval, plain and widened, and the error."""
    errors = [r["forecast_2x"] - r["pool_reached"] for r in rows]
    return (f"{name} ({how}, {len(rows)} draws): 2x forecast inside its interval {sum(r['inside_2x'] for r in rows)}/"
            f"{len(rows)}, inside once the test set's own noise is allowed "
            f"{sum(r['inside_2x_with_test_noise'] for r in rows)}/{len(rows)}; forecast - reached: median "
            f"{100 * float(np.median(errors)):+.1f} points, mean {100 * float(np.mean(errors)):+.1f} (range "
            f"{100 * min(errors):+.1f} to {100 * max(errors):+.1f}), test {rows[0]['n_test']} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[SIGNS])
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="whole-process draws (none: only --fast-draws)")
    parser.add_argument("--fast-draws", type=int, default=0, help="more draws, in process on one feature table, "
                        "seeded after --seeds")
    args = parser.parse_args()
    require(BACKBONE, *args.data)
    rows, fast = [], []
    for data in args.data:
        for seed in args.seeds:
            rows.append(one(data, seed, args.test_share))
            print(json.dumps(rows[-1]), flush=True)
        if args.fast_draws:
            with tempfile.TemporaryDirectory() as tmp:
                fast += fast_draws(data, args.fast_draws, args.test_share, max(args.seeds, default=2) + 1, Path(tmp))
    for data in args.data:
        mine = [r for r in rows if r["data"] == data.name]
        if mine:
            print(summary(data.name, mine, "whole processes") + f"; 1x inside {sum(r['inside_1x'] for r in mine)}/"
                  f"{len(mine)}; half {mine[0]['n_half']}, pool {mine[0]['n_pool']} images")
        if args.fast_draws:
            print(summary(data.name, [r for r in fast if r["data"] == data.name], "in process"))


if __name__ == "__main__":
    main()
