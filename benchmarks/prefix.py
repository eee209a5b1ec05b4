"""Fine-tuning on cached frozen-prefix activations vs end to end, and float16 vs float32 activations.

Usage: python benchmarks/prefix.py [--per-class N] [--repeat N]

The `partial` recipe (top 2 stages of EfficientNet-Lite0 from ../shared/backbones
at 224 px, 8 epochs at most) on sign-language photos (../shared/datasets), N
per class for training, the rest as the test folder; three ways, each a whole
`finetune train` process, in turn, `--repeat` times:

  cached-f16: the default: the prefix runs once per image and cached view
              (2 flipped/cropped views), activations stored as float16;
  cached-f32: the same with float32 activations (does float16 cost accuracy?);
  end-to-end: the frozen stages run every epoch, on-line augmentation (light),
              as before the cache existed.
Each is `finetune train` through train_with.py, which changes `TrainConfig` fields.

Prints wall time, test accuracy and where the time went, medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import BACKBONE, SIGNS, measure, require

WAYS = {
    "cached-f16": {},
    "cached-f32": {"activation_dtype": "float32"},
    "end-to-end": {"cache_prefix": False},
}
HERE = Path(__file__).parent


def split(root: Path, per_class: int) -> tuple[Path, Path]:
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        for part, chosen in (("train", files[:per_class]), ("test", files[per_class:])):
            (root / part / folder.name).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                (root / part / folder.name / path.name).write_bytes(path.read_bytes())
    return root / "train", root / "test"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    require(BACKBONE, SIGNS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = split(tmp / "data", args.per_class)
        results = {way: [] for way in WAYS}
        for i in range(args.repeat):
            for way, changes in WAYS.items():
                run = tmp / f"{way}-{i}"
                cmd = [sys.executable, HERE / "train_with.py", json.dumps(changes), train, BACKBONE, run,
                       tmp / f"cache-{way}-{i}", test]
                timing = measure(cmd)
                metrics = json.loads((run / "metrics.json").read_text())
                history = (run / "history.csv").read_text().splitlines()
                results[way].append((timing["wall"], metrics["test_accuracy"], timing["peak_mb"], len(history) - 1,
                                     metrics["timings_s"]))
                print(f"{way} #{i + 1}: {timing['wall']:.1f} s, test accuracy {metrics['test_accuracy']:.1%}, "
                      f"{len(history) - 1} epochs, peak {timing['peak_mb']:.0f} MB, steps {metrics['timings_s']}",
                      flush=True)
        base = statistics.median(w for w, *_ in results["end-to-end"])
        for way, rows in results.items():
            wall = statistics.median(w for w, *_ in rows)
            accuracy = statistics.median(a for _, a, *_ in rows)
            print(f"{way:11s} median {wall:7.1f} s ({wall / base:.2f} of end-to-end), test accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
