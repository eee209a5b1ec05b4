"""The embedded default backbone: conversion cost, fidelity, and accuracy as users get it.

Usage: python benchmarks/embedded.py [--repeat N]

1. Conversion on first use, in a fresh models folder (a whole process): its
   seconds and the MB it writes; a second use converts nothing.
2. Fidelity: the converted model against ../shared/backbones' reference
   `.keras` file (converted independently from the same package) on the
   bundled sample photos: max |difference| of the ImageNet probabilities.
3. ImageNet top-1 on real photos with an unambiguous ImageNet class, from
   scikit-image's bundled data (`pip install scikit-image`; skipped without).
4. `finetune train FOLDER` with no `--base` (the embedded default) against
   `--base` the shared reference file, on signs-20 (20 train + 20 test photos
   per class of ../shared/datasets/sign_language_digits): test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BACKBONE, BACKBONE_WITH_TOP, REPO, SIGNS, finetune_cmd, measure, require
from PIL import Image
from train import split_signs

#: scikit-image photo -> the ImageNet-1k class indices that count as right.
PHOTOS = {
    "chelsea.png": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee.png": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket.jpg": {657: "missile", 744: "projectile", 812: "space shuttle"},
}

CONVERT = """
import json, sys, time
from pathlib import Path
from finetune_cli.models import efficientnet_lite
from finetune_cli.models.backbones import file_digest
source = efficientnet_lite.source_file()
done = efficientnet_lite.ensure_converted(Path(sys.argv[1]), source, file_digest(source))
print(json.dumps({"seconds": done.seconds, "converted": done.converted}))
"""


def conversion(tmp: Path) -> None:
    folder = tmp / "models"
    first = measure([sys.executable, "-c", CONVERT, folder])
    second = measure([sys.executable, "-c", CONVERT, folder])
    facts = [json.loads(run["output"].strip().splitlines()[-1]) for run in (first, second)]
    written = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"conversion: {facts[0]['seconds']:.1f} s inside a {first['wall']:.1f} s process (peak "
          f"{first['peak_mb']:.0f} MB RSS), writes {written:.1f} MB "
          f"({', '.join(sorted(p.name for p in folder.iterdir()))}); second use: converted={facts[1]['converted']}, "
          f"{second['wall']:.1f} s process", flush=True)


def photos(folder: Path, size: int = 224) -> np.ndarray:
    files = sorted(folder.glob("*/*.JPG"))[::10]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)), "float32") for f in files])


def fidelity_and_top1() -> None:
    import keras

    from finetune_cli.models.backbones import build, resolve

    ours = build(resolve("efficientnet_lite0")).classifier
    x = photos(REPO / "sample_data" / "signs")
    if BACKBONE_WITH_TOP.exists():
        reference = keras.saving.load_model(BACKBONE_WITH_TOP)
        diff = float(np.abs(ours(x).numpy() - reference(x).numpy()).max())
        print(f"fidelity: max |p_ours - p_reference| = {diff:.2e} over {len(x)} photos x 1000 classes", flush=True)
    try:
        import skimage
    except ImportError:
        print("top-1: skipped (pip install scikit-image for its bundled photos)")
        return
    data = Path(skimage.__file__).parent / "data"
    for name, right in PHOTOS.items():
        image = np.asarray(Image.open(data / name).convert("RGB").resize((224, 224)), "float32")[None]
        probs = ours(image).numpy()[0]
        top5 = np.argsort(probs)[::-1][:5]
        verdict = "right" if int(top5[0]) in right else ("in top-5" if set(map(int, top5)) & set(right) else "wrong")
        print(f"top-1: {name}: class {int(top5[0])} p={probs[top5[0]]:.2f} ({verdict}; right: {right})", flush=True)


def accuracy(tmp: Path, repeat: int) -> None:
    require(SIGNS, BACKBONE)
    train_dir, test_dir = split_signs(tmp / "signs", 20)
    results = {"default": [], "reference": []}
    for i in range(repeat):
        for name, extra in (("default", []), ("reference", ["--base", BACKBONE])):
            run = tmp / f"run-{name}-{i}"
            done = measure(finetune_cmd("train", train_dir, "--test-dir", test_dir, "--out", run, *extra),
                           env={"FINETUNE_CACHE_DIR": str(tmp / f"cache-{i}")})
            metrics = json.loads((run / "metrics.json").read_text())
            results[name].append((metrics["test_accuracy"], done["wall"], metrics["strategy"]))
    for name, rows in results.items():
        accs = [r[0] for r in rows]
        print(f"signs-20 {name}: test accuracy median {statistics.median(accs):.3f} {accs}, "
              f"wall median {statistics.median(r[1] for r in rows):.1f} s, strategy {rows[0][2]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_MODELS_DIR"] = str(Path(tmp) / "models")
        conversion(Path(tmp))
        fidelity_and_top1()
        accuracy(Path(tmp), args.repeat)


if __name__ == "__main__":
    main()
