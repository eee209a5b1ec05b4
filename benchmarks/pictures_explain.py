"""README pictures and timings of `finetune explain` and `finetune attack` on real photos.

Usage: python benchmarks/pictures_explain.py [--per-class 20] [--test-per-class 2] [--out-dir docs/images]

Data: ../shared/datasets/sign_language_digits (skipped with a message when
absent): `per-class` training photos per digit, and `test-per-class` other
photos per digit to explain and attack. The run is trained by the CLI with
the default base (efficientnet_lite0, embedded ImageNet weights).

Prints, each as a whole process measured in this invocation: the training
run (the baseline), `explain --method occlusion`, `explain --method gradcam
--sanity` and `attack` (FGSM and PGD), with seconds per image and their ratio
to the training time; then the accuracy curve. Writes explain-occlusion.png,
explain-gradcam.png (photo | map) and attack-example.png (photo |
perturbation | adversarial), each < 250 KB.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, SIGNS, finetune_cmd, measure, require
from PIL import Image

sys.path.insert(0, str(REPO))
MAX_BYTES = 250_000


def split_signs(train: Path, test: Path, per_class: int, test_per_class: int, seed: int = 0) -> None:
    """Disjoint training and test photos of each digit (small files only: the phone photos are left out)."""
    rng = random.Random(seed)
    for folder in sorted(p for p in SIGNS.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size < 1_000_000)
        chosen = rng.sample(files, per_class + test_per_class)
        for target, picked in ((train, chosen[:per_class]), (test, chosen[per_class:])):
            (target / folder.name).mkdir(parents=True, exist_ok=True)
            for path in picked:
                shutil.copy2(path, target / folder.name / path.name)


def side_by_side(pictures: list[np.ndarray], width: int = 600) -> Image.Image:
    """Equal-height pictures in a row with white gaps, scaled to `width` px wide."""
    height = max(p.shape[0] for p in pictures)
    gap = np.full((height, 8, 3), 255, np.uint8)
    row = [np.asarray(Image.fromarray(p).resize((height * p.shape[1] // p.shape[0], height))) for p in pictures]
    strip = np.concatenate([x for pair in zip(row, [gap] * len(row)) for x in pair][:-1], axis=1)
    picture = Image.fromarray(strip)
    return picture.resize((width, round(width * picture.height / picture.width)), Image.Resampling.LANCZOS)


def save_small(picture: Image.Image, path: Path) -> None:
    """PNG under MAX_BYTES (shrunk by 10 % steps until it fits)."""
    while True:
        picture.save(path, "PNG", optimize=True)
        if path.stat().st_size < MAX_BYTES:
            return
        picture = picture.resize((picture.width * 9 // 10, picture.height * 9 // 10), Image.Resampling.LANCZOS)


def map_picture(explained: Path, row: dict, size: int) -> Image.Image:
    """photo | map of one explained image."""
    photo = np.asarray(Image.open(row["path"]).convert("RGB").resize((size, size)))
    overlay = np.asarray(Image.open(explained / row["map"]).convert("RGB").resize((size, size)))
    return side_by_side([photo, overlay], 480)


def attack_picture(run: Path, photo_path: str, label: str, eps: float) -> tuple[Image.Image, str]:
    """photo | perturbation (amplified) | PGD adversarial at `eps`, and a caption."""
    from finetune_cli.analysis.saliency import call
    from finetune_cli.runs.run import Run
    from finetune_cli.tasks.attack import perturb

    loaded = Run.load(run)
    size = loaded.image_size
    photo = np.asarray(Image.open(photo_path).convert("RGB").resize((size, size)), np.float32)[None]
    index = np.array([loaded.classes.index(label)])
    adversarial, _ = perturb(loaded.model, photo, index, "pgd", eps)
    before, after = (loaded.classes[int(call(loaded.model, x).numpy().argmax())] for x in (photo, adversarial))
    delta = adversarial[0] - photo[0]
    shown = (127.5 + 127.5 * delta / (np.abs(delta).max() or 1)).astype(np.uint8)
    picture = side_by_side([photo[0].astype(np.uint8), shown, adversarial[0].round().astype(np.uint8)], 600)
    return picture, f"label {label}: predicted {before} -> {after} (PGD, eps {eps:g} of 255)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=2)
    parser.add_argument("--eps", default="0,0.5,1,2,4")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    require(SIGNS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split_signs(tmp / "train", tmp / "test", args.per_class, args.test_per_class)
        n_test = 10 * args.test_per_class
        fresh = {"FINETUNE_CACHE_DIR": str(tmp / "cache")}  # a cold feature cache: the baseline is a full run
        timed = {"train": measure(finetune_cmd("train", tmp / "train", "--out", tmp / "run"), env=fresh)}
        for method, extra in (("occlusion", []), ("gradcam", ["--sanity"])):
            timed[method] = measure(finetune_cmd("explain", tmp / "run", tmp / "test", "--method", method,
                                                 "--out", tmp / method, *extra))
        timed["attack"] = measure(finetune_cmd("attack", tmp / "run", tmp / "test", "--eps", args.eps,
                                               "--out", tmp / "attack"))
        base = timed["train"]["wall"]
        for name, result in timed.items():
            per = "" if name == "train" else f", {result['wall'] / n_test:.2f} s per image"
            print(f"{name:10s} {result['wall']:7.1f} s ({result['wall'] / base:.2f} x train){per}, "
                  f"peak {result['peak_mb']:.0f} MB")
        print(timed["gradcam"]["output"].strip().splitlines()[-2])
        rhos = [r["rho"] for r in json.loads((tmp / "gradcam" / "explain.json").read_text())["images"]]
        known = [r for r in rhos if r is not None]
        print(f"gradcam sanity: {len(rhos) - len(known)} randomised maps vanished (all zero); rho of the others: "
              f"median {np.median(known) if known else float('nan'):.2f}, max {max(known, default=float('nan')):.2f}")
        robustness = json.loads((tmp / "attack" / "robustness.json").read_text())
        print("eps", robustness["eps"], "accuracy", robustness["accuracy"], "halving", robustness["halving_eps"],
              "warnings", robustness["warnings"])
        write_pictures(tmp, args.out_dir, robustness["eps"][-1])


def write_pictures(tmp: Path, out_dir: Path, eps: float) -> None:
    """The three README pictures, from the first correctly classified test photo."""
    rows = {m: json.loads((tmp / m / "explain.json").read_text())["images"] for m in ("occlusion", "gradcam")}
    pick = next((i for i, r in enumerate(rows["occlusion"]) if r["correct"]), 0)
    for method in rows:
        save_small(map_picture(tmp / method, rows[method][pick], 224), out_dir / f"explain-{method}.png")
        print(f"explain-{method}.png: {Path(rows[method][pick]['path']).name}, label {rows[method][pick]['label']}, "
              f"predicted {rows[method][pick]['predicted']}, rho {rows[method][pick]['rho']}")
    picture, caption = attack_picture(tmp / "run", rows["occlusion"][pick]["path"], rows["occlusion"][pick]["label"],
                                      eps)
    save_small(picture, out_dir / "attack-example.png")
    print(f"attack-example.png: {caption}")
    for name in ("explain-occlusion.png", "explain-gradcam.png", "attack-example.png"):
        print(f"{out_dir / name}: {(out_dir / name).stat().st_size // 1000} KB")


if __name__ == "__main__":
    main()
