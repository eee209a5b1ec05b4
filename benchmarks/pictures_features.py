"""README pictures of `filters`, `patches` and `audit`, from the shared sign-language photos and the default base.

Writes docs/images/filters-grid.png, filters-dream.png, patches-grid.png and audit-gallery.png (each kept
under 250 KB). Rerun after changing any of the three commands:

    python benchmarks/pictures_features.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SIGNS, require, small_png  # noqa: E402

IMAGES = REPO / "docs" / "images"
BASE = "efficientnet_lite0"
LIMIT = 250_000


def save_small(source: Path, target: Path, width: int | None = None, crop_height: int | None = None) -> None:
    """Copy a PNG, cropped to `crop_height`, scaled to `width`, palette-quantised if needed to stay under LIMIT."""
    image = Image.open(source).convert("RGB")
    if crop_height and image.height > crop_height:
        image = image.crop((0, 0, image.width, crop_height))
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    data, _ = small_png(image, LIMIT)
    target.write_bytes(data)
    print(f"{target.relative_to(REPO)}: {image.width}x{image.height}, {len(data) / 1000:.0f} KB")


def subset(work: Path, per_class: int, flip: float, seed: int = 0) -> Path:
    """`per_class` photos of each digit under work/signs, `flip` of them moved into a wrong class folder."""
    rng = np.random.default_rng(seed)
    root = work / "signs"
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, root / folder.name / path.name)
    files = sorted(root.rglob("*.*"))
    classes = sorted(p.name for p in root.iterdir())
    for path in rng.choice(files, size=round(flip * len(files)), replace=False):
        wrong = rng.choice([c for c in classes if c != path.parent.name])
        path.rename(root / wrong / f"moved-from-{path.parent.name}-{path.name}")
    return root


def main() -> None:
    require(SIGNS)
    from finetune_cli import api
    from tests.browser import view

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pictures-") as tmp:
        work = Path(tmp)
        root = subset(work, per_class=30, flip=0.05)
        photo = sorted((root / "3").iterdir())[0]
        found = api.filters(BASE, layer="block5_project_bn", units=8, out=work / "filters", dream=photo)
        save_small(Path(found["files"]["grid"]), IMAGES / "filters-grid.png", width=1040)
        save_small(Path(found["files"]["dream"]), IMAGES / "filters-dream.png")
        crops = api.patches(root, BASE, layer=3, units=8, top=8, out=work / "patches", cache_dir=work / "cache")
        save_small(Path(crops["files"]["grid"]), IMAGES / "patches-grid.png")
        audited = api.audit(root, BASE, out=work / "audit", cache_dir=work / "cache")
        print("audit counts:", audited["counts"])
        view(Path(audited["files"]["html"]), screenshot=work / "audit.png", width=1000)
        save_small(work / "audit.png", IMAGES / "audit-gallery.png", width=900, crop_height=1100)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
