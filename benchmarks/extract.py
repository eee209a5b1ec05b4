"""Feature extraction vs a hand-written extractor, cache speed-up, memory growth.

Usage: python benchmarks/extract.py [PER_CLASS]   (default 30 per class, ~300 photos)

1. Same photos (a subset of ../shared/datasets/sign_language_digits, full-size
   phone photos included), same backbone (../shared/backbones EfficientNet-Lite0),
   224 px: `finetune extract-features --no-cache` vs handwritten_extract.py,
   both whole processes, alternated, 3 rounds each; plus the forward-pass floor.
2. Cache: cold vs warm `finetune extract-features` on the same folder.
3. Memory: peak RSS extracting 1,000 vs 4,000 generated 64-px images at 96 px.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import BACKBONE, SIGNS, finetune_cmd, measure, require, subset

from finetune_cli.data.synthetic import SHAPES, make_shapes_folder

ROUNDS = 3


def main(per_class: int = 30) -> None:
    require(BACKBONE, SIGNS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset(SIGNS, tmp / "signs", per_class)
        n = sum(1 for _ in data.rglob("*.JPG"))
        ours_cmd = finetune_cmd("extract-features", data, "--base", BACKBONE, "--out", tmp / "ours.parquet", "--no-cache",
                                "--overwrite")
        theirs_cmd = [sys.executable, str(Path(__file__).parent / "handwritten_extract.py"), data, BACKBONE, tmp / "theirs.parquet"]
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(measure(ours_cmd)["wall"])
            theirs.append(measure(theirs_cmd)["wall"])
        floor = float(measure([sys.executable, str(Path(__file__).parent / "forward_floor.py"), BACKBONE, n])["output"].split("FLOOR")[-1])
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"images: {n} real photos, EfficientNet-Lite0 at 224 px, median of {ROUNDS} whole-process runs")
        print(f"hand-written extractor: {t:6.2f} s  ({n / t:5.1f} images/s)")
        print(f"finetune (no cache):    {o:6.2f} s  ({n / o:5.1f} images/s)")
        print(f"forward-pass floor:     {floor:6.2f} s  ({n / floor:5.1f} images/s, compute only, no start-up)")
        print(f"ratio ours/hand-written wall time: {o / t:.2f}  (target <= 1.0, goal 0.8)")

        cache = tmp / "cache"
        cached_cmd = finetune_cmd("extract-features", data, "--base", BACKBONE, "--out", tmp / "c.parquet", "--cache-dir", cache,
                                  "--overwrite")
        cold = measure(cached_cmd)["wall"]
        warm = statistics.median(measure(cached_cmd)["wall"] for _ in range(ROUNDS))
        print(f"cache: cold {cold:.2f} s, warm {warm:.2f} s, speed-up {cold / warm:.1f}x (target >= 10x)")

        peaks = {}
        for count in (1000, 4000):
            folder = tmp / f"gen{count}"
            for i, shape in enumerate(SHAPES[:4]):
                make_shapes_folder(folder, classes=(shape,), per_class=count // 4, size=64, seed=i)
            run = measure(finetune_cmd("extract-features", folder, "--base", BACKBONE, "--image-size", 96,
                                       "--out", tmp / f"m{count}.parquet", "--no-cache"))
            peaks[count] = run["peak_mb"]
            print(f"peak memory, {count} images at 96 px: {run['peak_mb']:.0f} MB ({run['wall']:.1f} s)")
        print(f"peak memory 4000 / 1000: {peaks[4000] / peaks[1000]:.3f} (target within 10 %)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
