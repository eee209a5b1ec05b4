"""How well `finetune audit` finds planted label errors and leakage in real photos.

A copy of the shared sign-language digits under a temporary folder gets 5 %
of its images moved into another (random) class folder, with a fixed seed;
a validation folder gets copies of 20 training images (leakage): 10 exact,
10 saved again as JPEG quality 90 at the same size. The audit runs with the default base (efficientnet_lite0).
Reported: precision and recall of the top-k label suspects for k = number
flipped and 2k, against a random ranking's precision (the flipped fraction)
measured on the same images; recall of the planted leakage pairs by kind; wall time
cold (features computed) and warm (features from the cache).

    python benchmarks/audit.py [--fraction 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIGNS, require  # noqa: E402


def planted_copy(source: Path, work: Path, fraction: float, seed: int) -> tuple[Path, Path, dict, list]:
    """(train folder, val folder, {flipped path relative to train: true class}, [(train rel, val rel, kind)])."""
    train, val = work / "signs", work / "val"
    shutil.copytree(source, train, ignore=shutil.ignore_patterns("LICENSE*", "README*"))
    rng = np.random.default_rng(seed)
    files = sorted(p for p in train.rglob("*") if p.is_file())
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    flipped = {}
    for path in rng.choice(files, size=round(fraction * len(files)), replace=False):
        true = path.parent.name
        wrong = rng.choice([c for c in classes if c != true])
        target = train / wrong / f"moved-{true}-{path.name}"
        path.rename(target)
        flipped[target.relative_to(train).as_posix()] = true
    leaks = []
    kept = [p for p in sorted(train.rglob("*")) if p.is_file() and not p.name.startswith("moved-")]
    for n, path in enumerate(rng.choice(kept, size=20, replace=False)):
        kind = "exact" if n % 2 else "reencoded"
        out = val / path.parent.name / f"{kind}-{path.stem}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "exact":
            shutil.copy(path, out)
        else:  # the same pixels saved again as a JPEG of quality 90, same size
            Image.open(path).convert("RGB").save(out, "JPEG", quality=90)
        leaks.append((path.relative_to(train).as_posix(), out.relative_to(val).as_posix(), kind))
    return train, val, flipped, leaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="Also copy the audit folder (index.html) here.")
    args = parser.parse_args()
    require(SIGNS)
    from finetune_cli import api

    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        work = Path(tmp)
        train, val, flipped, leaks = planted_copy(SIGNS, work, args.fraction, args.seed)
        cache = work / "cache"
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            result = api.audit(train, "efficientnet_lite0", val_dir=val, out=work / "audit", cache_dir=cache)
            timings.append(time.perf_counter() - start)
        report = score(result, train, val, flipped, leaks)
        report.update(cold_s=round(timings[0], 1), warm_s=round(timings[1], 1))
        print(json.dumps(report, indent=2))
        if args.keep:
            shutil.copytree(work / "audit", args.keep, dirs_exist_ok=True)


def score(result: dict, train: Path, val: Path, flipped: dict, leaks: list) -> dict:
    """Precision/recall at k and 2k of the label ranking, suggested-label accuracy, leakage recall."""
    ranked = [f for f in result["findings"] if f["kind"] == "label"]
    rel = [Path(f["path"]).relative_to(train).as_posix() for f in ranked]
    k = len(flipped)
    out = {"images": result["images"], "flipped": k, "label_suspects": len(ranked),
           "random_precision": round(k / result["images"]["train"], 3), "counts": result["counts"]}
    for name, top in (("k", k), ("2k", 2 * k)):
        hits = sum(p in flipped for p in rel[:top])
        out[f"precision_at_{name}"] = round(hits / top, 3)
        out[f"recall_at_{name}"] = round(hits / k, 3)
    found = [(p, f["suggested_label"]) for p, f in zip(rel, ranked) if p in flipped]
    out["true_class_suggested"] = round(sum(flipped[p] == s for p, s in found) / max(1, len(found)), 3)
    pairs = {(Path(f["path"]).name, Path(f["other_path"]).name) for f in result["findings"] if f["kind"] == "leakage"}
    pairs |= {(b, a) for a, b in pairs}
    for kind in ("exact", "reencoded"):
        planted = [(a, b) for a, b, k in leaks if k == kind]
        out[f"leakage_recall_{kind}"] = round(sum((Path(a).name, Path(b).name) in pairs for a, b in planted)
                                              / len(planted), 3)
    return out


if __name__ == "__main__":
    main()
