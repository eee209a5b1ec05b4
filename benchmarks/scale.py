"""Scaling out: `extract-features` with the local engine vs `--engine ray` with 1 and 2 workers.

Usage: python benchmarks/scale.py [COPIES] [IMAGE_SIZE]   (defaults: 1 copy = 2,062 photos, 224 px)

The sign-language photos of ../shared/datasets (all 2,062, the full-size phone
photos included; COPIES > 1 repeats them) are copied under /tmp, and the real
EfficientNet-Lite0 of ../shared/backbones extracts their features, as users
run it: a whole `finetune` process each time, no feature cache. Each engine
also runs on a 20-image folder; the difference between the two walls gives
the marginal rate (images/s once started) and the fixed cost (process, Ray
start-up, model load) without guessing. Scaling efficiency is the 2-worker
marginal rate over twice the 1-worker one. Ray here is a single node started
by the command (no --address), so its start-up is inside every Ray figure.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from common import BACKBONE, SIGNS, finetune_cmd, measure, require

SMALL = 20


def copy_photos(dst: Path, copies: int, limit: int | None = None) -> int:
    """`copies` copies of every sign photo into dst/<class>/ (at most `limit` in all); returns how many."""
    n = 0
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            for k in range(copies):
                if limit is not None and n >= limit:
                    return n
                shutil.copy2(path, dst / folder.name / f"{k}-{path.name}")
                n += 1
    return n


def run(engine: str, data: Path, out: Path, size: int, workers: int = 0) -> float:
    """Wall seconds of one whole `finetune extract-features` process."""
    extra = ["--engine", "ray", "--workers", str(workers)] if engine == "ray" else ["--no-cache"]
    out = out / f"{engine}-{workers}" if engine == "ray" else out / "local.parquet"
    return measure(finetune_cmd("extract-features", data, "--base", BACKBONE, "--image-size", size,
                                "--out", out, "--overwrite", *extra))["wall"]


def main(copies: int = 1, size: int = 224) -> None:
    require(BACKBONE, SIGNS)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        n = copy_photos(tmp / "big", copies)
        copy_photos(tmp / "small", 1, limit=SMALL)
        print(f"{n} photos, {size} px, EfficientNet-Lite0; each figure one whole `finetune` process")
        rows = []
        for label, engine, workers in (("local", "local", 0), ("ray, 1 worker", "ray", 1),
                                       ("ray, 2 workers", "ray", 2)):
            small = run(engine, tmp / "small", tmp, size, workers)
            big = run(engine, tmp / "big", tmp, size, workers)
            marginal = (n - SMALL) / max(big - small, 1e-9)
            rows.append((label, big, n / big, marginal, small - SMALL / marginal))
        base = rows[0]
        print(f"{'engine':16} {'wall s':>8} {'images/s':>9} {'marginal/s':>11} {'fixed s':>8} {'vs local':>9}")
        for label, wall, rate, marginal, fixed in rows:
            print(f"{label:16} {wall:8.1f} {rate:9.1f} {marginal:11.1f} {fixed:8.1f} {rate / base[2]:8.2f}x")
        one, two = rows[1][3], rows[2][3]
        print(f"scaling efficiency, 1 -> 2 workers: {two / (2 * one):.0%} (marginal rates)")
        print(f"Ray's extra fixed cost over local (start-up, actors, model load per worker): "
              f"{rows[1][4] - base[4]:.1f} s with 1 worker, {rows[2][4] - base[4]:.1f} s with 2")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
