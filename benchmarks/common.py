"""Helpers shared by the benchmarks: whole-process timing, real data, subsets.

Timing uses only public means: `time.perf_counter` around a child process and
`os.wait4`'s resource usage for that child's peak memory.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
BACKBONE = SHARED / "backbones" / "efficientnet_lite0_imagenet_notop.keras"
BACKBONE_WITH_TOP = SHARED / "backbones" / "efficientnet_lite0_imagenet.keras"
SIGNS = SHARED / "datasets" / "sign_language_digits"


def require(*paths: Path) -> None:
    """Exit with a clear message when shared benchmark inputs are absent."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"skipped: benchmark inputs not found: {', '.join(missing)} (see benchmarks/README.md)")


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` as a child process; return wall seconds, peak RSS (MB), output.

    Raises:
        RuntimeError: the command failed (its output is included).
    """
    start = time.perf_counter()
    cmd = [str(c) for c in cmd]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
    output = child.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{output[-3000:]}")
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024, "output": output}


def subset(src: Path, dst: Path, per_class: int, seed: int = 0, keep_large: bool = True) -> Path:
    """Copy `per_class` random images of each class of `src` into `dst`.

    With keep_large, files over 1 MB (the full-size phone photos) are kept too,
    so the subset keeps the real-world oddity.
    """
    rng = random.Random(seed)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        chosen = set(rng.sample(files, min(per_class, len(files))))
        if keep_large:
            chosen |= {p for p in files if p.stat().st_size > 1_000_000}
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(chosen):
            shutil.copy2(path, dst / folder.name / path.name)
    return dst


def distinct_files(folder: Path, max_bytes: int | None = None) -> list[Path]:
    """The files of `folder`, sorted, each content once (sha256; the first name kept), optionally under
    `max_bytes`: a photo filed twice can never sit on both sides of a split."""
    import hashlib

    seen, files = set(), []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if (max_bytes is None or path.stat().st_size < max_bytes) and digest not in seen:
            seen.add(digest)
            files.append(path)
    return files


def print_medians(draws: list[dict], baseline: str, scores: dict[str, str], width: int = 26) -> None:
    """Each method's median scores over `draws` ({method: {key: value, "wall": s}} per draw) and its median
    time as a ratio of `baseline`'s; `scores` maps each key to print to its name ("macro_f1": "macro-F1")."""
    import statistics

    base = statistics.median(d[baseline]["wall"] for d in draws)
    print(f"medians over {len(draws)} draws (time as a ratio of {baseline}'s):")
    for label in draws[0]:
        median = lambda key: statistics.median(d[label][key] for d in draws)  # noqa: E731
        shown = "  ".join(f"{name} {median(key):.3f}" for key, name in scores.items())
        print(f"  {label:{width}s} {shown}  time {median('wall') / base:.2f}x")


def split_class(files: list[Path], root: Path, name: str, n_train: int, n_test: int, rng) -> None:
    """Copy a random `n_train` of `files` to root/train/NAME and `n_test` others to root/test/NAME."""
    order = rng.permutation(len(files))
    for part, idx in (("train", order[:n_train]), ("test", order[n_train:n_train + n_test])):
        (root / part / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            (root / part / name / files[i].name).write_bytes(files[i].read_bytes())


def printed(output: str, key: str) -> float:
    """The number a baseline printed after `key` ("TEST_ACCURACY 0.91": 0.91), its last such line."""
    return float(output.split(key + " ")[-1].split()[0])


def finetune_cmd(*args: str) -> list[str]:
    """The CLI, run as users run it, by the interpreter running the benchmark."""
    return [sys.executable, "-m", "finetune_cli", *map(str, args)]


def small_png(image, limit: int) -> tuple[bytes, int | None]:
    """A PIL image as PNG bytes under `limit` if it can be: full colour, else 256, 128, 64 colours.

    Returns (bytes, colours used; None: full colour).
    """
    import io

    for colours in (None, 256, 128, 64):
        shown = image if colours is None else image.quantize(colours, dither=0)
        buffer = io.BytesIO()
        shown.save(buffer, "PNG", optimize=True)
        if buffer.tell() < limit:
            break
    return buffer.getvalue(), colours


def features_of(data: Path, out: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features (n, d), labels (n,) in sorted class order, content digests (n,)) of every usable photo of `data`,
    from one `finetune extract-features` process writing `out` (.npz; the rows in the table's order)."""
    import hashlib

    import numpy as np

    subprocess.run(finetune_cmd("extract-features", data, "--base", BACKBONE, "--out", out), check=True,
                   capture_output=True)
    table = np.load(out, allow_pickle=True)
    _, labels = np.unique(table["label"], return_inverse=True)
    digests = [hashlib.sha256((data / p).read_bytes()).hexdigest() for p in table["path"]]
    return table["features"], labels, digests


def weighted(labels) -> bool:
    """Whether `finetune train` weights the classes of these training labels (int (n,)): the largest class
    `imbalance_warn_ratio` x the smallest or more, as `train.linear.folder_head` decides."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from finetune_cli.config import SCAN

    counts = np.bincount(labels)
    return bool(counts.max() >= SCAN.imbalance_warn_ratio * max(counts.min(), 1))
