"""The decision table on five real sets of different kinds, as a user runs it: the plan as decided
against `--strategy linear` and the Keras guide's recipe, each a whole process with its own cold cache.

Usage: python benchmarks/decision.py [--clothing DIR] [--bccd DIR] [--mri DIR] [--sets signs-20,signs-pair,...]
                                    [--pairs N] [--keep DIR]

Sets (a set whose data is absent is skipped with a message):
  signs-20:    sign-language digits (../shared/datasets), 20 training / 20 test photos per class, 10
               classes: small, photos of hands;
  signs-pair:  classes 6 and 9 of the same photos, 120 training per class, the rest to test: large, 2 classes;
  clothing:    a checkout of github.com/alexeygrigorev/clothing-dataset-small (CC0): the first 100
               distinct photos per class of train/ to train, test/ (372) to test (benchmarks/views.py);
               10 classes, large, like ImageNet;
  bccd:        a checkout of github.com/Shenggan/BCCD_Dataset (MIT): every labelled box of the 364
               blood-smear microscope photos cropped (`Platelets`, `RBC`, `WBC`), split by photo (70 % of
               the photos train, 30 % test), at most 150 training and 80 test crops per class: large,
               3 classes, unlike ImageNet;
  mri:         a checkout of github.com/SartajBhuvaji/Brain-Tumor-Classification-DataSet (brain MRI slices,
               4 classes; the repository carries no licence file, so nothing of it is redistributed here):
               150 distinct scans per class of Training/ to train, 100 others to test (distinct by content;
               neighbouring slices of one patient may fall on both sides, as the set names no patient):
               large, 4 classes, unlike ImageNet, real scans;
  mri-shift:   the same training scans, tested on every Testing/ scan whose content is not also in
               Training/ (250 of 394: the rest are copies of training scans): a shifted source; on request.
  digits:      scikit-learn's 8x8 digits drawn at 64 px, 110 training / 60 test per class (benchmarks/train.py
               `write_digits`): large, 10 classes, unlike ImageNet, not photos.
Each set runs `finetune train DIR --test-dir TEST` (as decided), the same with `--strategy linear`, and
keras_guide_baseline.py; prints the plan, what was kept, test accuracy and wall time, and the plan's
time as a ratio of the linear head's and of the guide's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from common import BACKBONE, SIGNS, distinct_files, finetune_cmd, measure, printed, require, split_class
from PIL import Image
from border import two_classes
from labels import raw_pixel_accuracy
from train import split_signs, write_digits
from views import clothing

HERE = Path(__file__).parent
SETS = ("signs-20", "signs-pair", "clothing", "bccd", "mri", "digits")  # "mri-shift" on request
UNLIKE = ("bccd", "mri", "mri-shift", "digits")  # these also get the raw-pixel logistic regression


def bccd(src: Path, root: Path, train_cap: int = 150, test_cap: int = 80, seed: int = 0) -> tuple[Path, Path]:
    """Box crops of the BCCD photos, split by photo (module docstring)."""
    rng = np.random.default_rng(seed)
    notes = sorted((src / "BCCD" / "Annotations").glob("*.xml"))
    test_photos = {notes[i].stem for i in rng.permutation(len(notes))[: int(0.3 * len(notes))]}
    crops: dict[tuple[str, str], list] = {}
    for note in notes:
        part = "test" if note.stem in test_photos else "train"
        for obj in ET.parse(note).getroot().iter("object"):
            box = [int(float(obj.find("bndbox").find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")]
            if box[2] - box[0] >= 8 and box[3] - box[1] >= 8:
                crops.setdefault((part, obj.find("name").text.strip()), []).append((note.stem, box))
    for (part, label), items in sorted(crops.items()):
        cap = train_cap if part == "train" else test_cap
        (root / part / label).mkdir(parents=True, exist_ok=True)
        for k in sorted(rng.permutation(len(items))[:cap]):
            stem, box = items[k]
            with Image.open(src / "BCCD" / "JPEGImages" / f"{stem}.jpg") as photo:
                photo.convert("RGB").crop(box).save(root / part / label / f"{stem}-{k}.jpg", quality=95)
    return root / "train", root / "test"


def mri(src: Path, root: Path, shift: bool = False, per_class: int = 150, test_per_class: int = 100,
        seed: int = 0) -> tuple[Path, Path]:
    """The brain-MRI sets (module docstring): `per_class` distinct photos per class of Training/ to train, and
    to test `test_per_class` others of Training/ or (`shift`) every Testing/ photo whose content is not in
    Training/. A content filed under two classes is left out."""
    import hashlib

    digest = lambda path: hashlib.sha256(path.read_bytes()).digest()  # noqa: E731
    classes = sorted(p for p in (src / "Training").iterdir() if p.is_dir())
    kept = {folder: {path: digest(path) for path in distinct_files(folder)} for folder in classes}
    owners = {}
    for folder, files in kept.items():
        for content in files.values():
            owners.setdefault(content, set()).add(folder.name)
    rng = np.random.default_rng(seed)
    for folder in classes:
        files = [p for p, content in kept[folder].items() if len(owners[content]) == 1]
        split_class(files, root, folder.name, per_class, 0 if shift else test_per_class, rng)
        if shift:
            (root / "test" / folder.name).mkdir(parents=True, exist_ok=True)
            for path in distinct_files(src / "Testing" / folder.name):
                if digest(path) not in owners:
                    (root / "test" / folder.name / path.name).write_bytes(path.read_bytes())
    return root / "train", root / "test"


def build(name: str, args, tmp: Path) -> tuple[Path, Path] | None:
    data = tmp / name
    if name == "signs-20":
        return split_signs(data, 20)
    if name == "signs-pair":
        return two_classes(data, ("6", "9"), 120)
    if name == "digits":
        return write_digits(data, 110, 60)
    src = getattr(args, name.split("-")[0])
    if src is None or not src.exists():
        print(f"{name}: skipped (pass --{name} DIR, a checkout; see the docstring)")
        return None
    if name == "bccd":
        return bccd(src, data)
    if name in ("mri", "mri-shift"):
        return mri(src, data, shift=name == "mri-shift")
    train, _, test = clothing(src, data)  # its validation/ folder is not used: the run holds out its own
    return train, test


def run_set(name: str, train: Path, test: Path, tmp: Path, pairs: int = 1) -> None:
    """Print one JSON line for a set: the plan as decided and `--strategy linear`, `pairs` times each (in turn,
    each run a whole process with a cold cache), and the guide once. Times are medians; x_linear is the
    median of the pairs' ratios, and with pairs > 1 "walls" lists every pair."""
    runs = [pair(name, train, test, tmp) for _ in range(pairs)]
    guide = measure([sys.executable, HERE / "keras_guide_baseline.py", train, test, BACKBONE])
    guide_acc = printed(guide["output"], "TEST_ACCURACY")
    (plan, _), (linear, _) = runs[-1]["decided"], runs[-1]["linear"]
    wall = float(np.median([r["decided"][1] for r in runs]))
    linear_wall = float(np.median([r["linear"][1] for r in runs]))
    record = {"set": name, "n_train": plan["n_train"], "n_val": plan["n_val"], "n_test": plan["test"]["n_images"],
              "decided": f"{plan['strategy']} ({plan['size_category']}, {plan['similarity']})",
              "kept": plan.get("kept"), "features": plan.get("features"),
              "pilot": {k: v for k, v in plan.get("pilot", {}).items() if k in ("skipped", "abandoned", "best")},
              "test": plan["test_accuracy"], "wall": round(wall, 1), "linear_test": linear["test_accuracy"],
              "linear_wall": round(linear_wall, 1), "guide_test": guide_acc, "guide_wall": round(guide["wall"], 1),
              "x_linear": round(float(np.median([r["decided"][1] / r["linear"][1] for r in runs])), 2),
              "x_guide": round(wall / guide["wall"], 2)}
    if pairs > 1:
        record["walls"] = [[round(r["decided"][1], 1), round(r["linear"][1], 1)] for r in runs]
        record["tests"] = [[r["decided"][0]["test_accuracy"], r["linear"][0]["test_accuracy"]] for r in runs]
    if name in UNLIKE:
        record["raw_pixels_test"], record["raw_pixels_side"] = raw_pixel_accuracy(train, test)
    print(json.dumps(record), flush=True)


def pair(name: str, train: Path, test: Path, tmp: Path) -> dict:
    """{"decided" | "linear": (metrics, wall seconds)}: the two runs, each with a new run folder and cache."""
    rows = {}
    for label, extra in (("decided", []), ("linear", ["--strategy", "linear"])):
        out, cache = tmp / f"run-{name}-{label}", tmp / f"cache-{name}-{label}"
        for folder in (out, cache):
            shutil.rmtree(folder, ignore_errors=True)
        done = measure(finetune_cmd("train", train, "--base", BACKBONE, "--out", out, "--test-dir", test,
                                    "--cache-dir", cache, *extra))
        rows[label] = (json.loads((out / "metrics.json").read_text()), done["wall"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clothing", type=Path)
    parser.add_argument("--bccd", type=Path)
    parser.add_argument("--mri", type=Path)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--pairs", type=int, default=1, help="run the plan and --strategy linear this many times "
                        "each, in turn, and report median times (the machine is noisy)")
    parser.add_argument("--keep", type=Path, help="write the sets and runs here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    require(BACKBONE, SIGNS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        for name in args.sets.split(","):
            built = build(name, args, tmp)
            if built is not None:
                run_set(name, *built, tmp, args.pairs)


if __name__ == "__main__":
    main()
