"""`finetune export` on real photos: every format and quantisation, checked against the Keras model.

Usage: python benchmarks/export.py [--per-class N] [--run RUN] [--work DIR]

Data: N photos per class (default 40) of the shared sign-language digits (10 classes; the
full-size phone photos kept too), or the repository's sample_data/signs when the shared set is
absent. Model: `finetune train DATA` with the default base, EfficientNet-Lite0 (ImageNet
weights, 224 px), the plan it decides; `--run` reuses a trained run instead. Then `finetune
export RUN --data DATA` for each format and quantisation, run as users run it (one process
each, `--force` so that every row is measured), and one table from the export.json files:
file size, accuracy of the file and of Keras on the validation split, top-1 agreement, the
largest probability difference, and CPU ms per image at batch 1 (median) of the file and of
the Keras model measured in the same process (the plain baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, SIGNS, finetune_cmd, measure, subset

CASES = [("keras", "none"), ("savedmodel", "none"), ("tflite", "none"), ("tflite", "fp16"), ("tflite", "dynamic"),
         ("tflite", "int8"), ("onnx", "none"), ("onnx", "int8")]


def data_folder(work: Path, per_class: int) -> Path:
    """The photos to train and check on: a subset of the shared set, else the repository's sample."""
    if SIGNS.exists():
        return subset(SIGNS, work / "signs", per_class)
    print(f"note: {SIGNS} not found; using sample_data/signs", file=sys.stderr)
    return REPO / "sample_data" / "signs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--run", type=Path, default=None, help="a trained run to reuse (give --data too)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder for data, run and exports")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-bench-"))
    data = args.data or data_folder(work, args.per_class)
    run = args.run or work / "run"
    if args.run is None:
        trained = measure(finetune_cmd("train", data, "--out", run))
        print(f"trained {run} in {trained['wall']:.0f} s", file=sys.stderr)
    rows = []
    for fmt, quantize in CASES:
        out = work / f"{fmt}-{quantize}"
        timing = measure(finetune_cmd("export", run, "--format", fmt, "--quantize", quantize, "--data", data,
                                      "--out", out, "--force", "--overwrite"))
        report = json.loads((out / "export.json").read_text())
        rows.append({"format": fmt, "quantize": quantize, "size_kb": round(report["bytes"] / 1024),
                     "accuracy": f"{report['accuracy']:.1%}", "keras_accuracy": f"{report['accuracy_keras']:.1%}",
                     "agreement": f"{report['agreement']:.1%}", "max_prob_diff": f"{report['max_prob_diff']:.3f}",
                     "ms_per_image": f"{report['ms_per_image']:.2f}",
                     "keras_ms": f"{report['ms_per_image_keras']:.2f}",
                     "speedup": f"{report['ms_per_image_keras'] / report['ms_per_image']:.1f}x",
                     "export_s": round(timing["wall"]), "n": report["n_images"]})
        print(rows[-1], file=sys.stderr)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
