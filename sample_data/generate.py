"""Regenerate sample_data/ deterministically: `python sample_data/generate.py`.

shapes/     3 classes (circle, square, triangle), 30 JPEGs each, 64x64 px
unlabeled/  100 unlabeled JPEGs of the same shapes, for `finetune pretrain`
"""

import shutil
from pathlib import Path

from finetune_cli.data.synthetic import make_shapes_folder

HERE = Path(__file__).parent

if __name__ == "__main__":
    for name in ("shapes", "unlabeled"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    make_shapes_folder(HERE / "shapes", per_class=30, size=64, seed=0)
    tmp = make_shapes_folder(HERE / "_tmp", per_class=0, size=64, seed=1, unlabeled=100)
    (tmp / "unlabeled").rename(HERE / "unlabeled")
    shutil.rmtree(tmp)
