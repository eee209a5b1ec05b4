"""What to label next: BADGE against margin and random sampling, over rounds of labelling.

Usage: python benchmarks/suggest.py [--data FOLDER ...] [--start 5] [--k 20] [--rounds 3] [--seeds 0 1 2]

For each real photo folder (default the sign-language digits,
../shared/datasets/sign_language_digits) the final-stage features of every
photo are extracted once, as `finetune extract-features` does (whole process;
the benchmark then reads its table). For each seed: a quarter of the photos
per class is the test set, distinct by content from the rest, the pool; `--start`
labelled photos per class are drawn from the pool, the rest is the unlabeled
pool. Each round, the linear head `finetune suggest` fits (`train.linear.
fit_linear`, C by cross-validation) is fitted on the labelled photos, each
method (`analysis.acquisition.choose`, what `finetune suggest --method` runs)
picks `--k` photos of the pool, their true labels are revealed, and the head
refitted on the grown set is scored on the test photos. It prints each
method's test accuracy after every round, per seed, and the mean and spread
(min-max) over seeds after the last round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, features_of, require

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune_cli.analysis.acquisition import METHODS, choose  # noqa: E402
from finetune_cli.train.linear import fit_linear  # noqa: E402


def rounds(x, y, start, k_per_round, n_rounds, method, seed) -> list[float]:
    """Test accuracy after each round (round 0: the start) for one method and one seed."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 4] for c in np.unique(y)])
    pool = np.setdiff1d(np.arange(len(y)), test)
    labelled = np.concatenate([rng.permutation(pool[y[pool] == c])[:start] for c in np.unique(y)])
    k = len(np.unique(y))
    scores = []
    for r in range(n_rounds + 1):
        head = fit_linear(x[labelled], y[labelled], k, seed=seed)
        scores.append(float((head.probabilities(x[test]).argmax(1) == y[test]).mean()))
        if r == n_rounds:
            break
        unlabeled = np.setdiff1d(pool, labelled)
        picked, _ = choose(method, head.probabilities(x[unlabeled]), x[unlabeled], k_per_round, seed + 100 * r)
        labelled = np.concatenate([labelled, unlabeled[picked]])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[SIGNS])
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    require(BACKBONE, *args.data)
    for data in args.data:
        with tempfile.TemporaryDirectory() as tmp:
            x, y, digests = features_of(data, Path(tmp) / "features.npz")
        _, first = np.unique(digests, return_index=True)  # one row per content: no photo on both sides
        x, y = x[np.sort(first)], y[np.sort(first)]
        final = {m: [] for m in METHODS}
        for seed in args.seeds:
            for method in METHODS:
                curve = rounds(x, y, args.start, args.k, args.rounds, method, seed)
                final[method].append(curve[-1])
                print(f"{data.name} seed {seed} {method:>6}: " + " -> ".join(f"{a:.3f}" for a in curve), flush=True)
        for method in METHODS:
            values = final[method]
            print(f"{data.name} {method:>6} after {args.rounds} rounds of {args.k}: mean {statistics.mean(values):.3f} "
                  f"(min {min(values):.3f}, max {max(values):.3f}) over {len(values)} seeds")


if __name__ == "__main__":
    main()
