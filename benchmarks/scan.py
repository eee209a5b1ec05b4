"""Scan throughput: `python benchmarks/scan.py [N]` (default 5,000 small JPEGs).

Generates N 64x64 JPEGs in a temp folder (10 classes), then times
`finetune_cli.data.scan.scan_folder` (read + hash + full decode of every file)
against a plain single-threaded Pillow loop (`Image.open(p).load()`) over the
same files, in the same run. Prints images/s and the ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from finetune_cli.data.scan import scan_folder
from finetune_cli.data.synthetic import SHAPES, make_shapes_folder


def main(n: int = 5000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        classes = tuple(f"{s}{k}" for k in range(2) for s in SHAPES)
        for i, name in enumerate(classes):
            make_shapes_folder(root / "_", classes=(SHAPES[i % len(SHAPES)],), per_class=n // len(classes), size=64, seed=i)
            (root / "_" / SHAPES[i % len(SHAPES)]).rename(root / name)
        (root / "_").rmdir()
        files = sorted(root.glob("*/*.jpg"))

        start = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                image.load()
        plain = time.perf_counter() - start

        start = time.perf_counter()
        scan = scan_folder(root)
        ours = time.perf_counter() - start

    assert len(scan.images) == len(files)
    print(f"files: {len(files)}")
    print(f"plain Pillow loop (open + decode):  {len(files) / plain:8,.0f} images/s  {plain:6.2f} s")
    print(f"finetune scan (+ hash, checks):     {len(files) / ours:8,.0f} images/s  {ours:6.2f} s")
    print(f"ratio ours/plain wall time: {ours / plain:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
