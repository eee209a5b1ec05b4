"""Does autoencoder pretraining on unlabeled images help when labels are few?

Usage: python benchmarks/pretrain.py [--seeds N] [--quick]

Data: scikit-learn's digits (1,797 8x8 images) drawn as 32x32 RGB PNGs. 30 per
class are held out for testing; of the rest, k per class are labelled
(k = 3 and k = 10, drawn with each seed) and all the others are the
unlabeled folder.

For each encoder the same `finetune train` runs twice on the k-labelled
folder and is evaluated on the test folder:
  random      --base ENCODER --weights none  (the same architecture, fresh init)
  pretrained  --base ENCODER                 (the weights learned by `pretrain`)
Encoders: `pretrain --arch conv`, `--arch mlp`, `--arch mlp --greedy`, and,
when ../shared/backbones holds EfficientNet-Lite0, `--init-from` it, compared
with the unadapted ImageNet backbone itself.

Also: pretraining throughput (images/s, from the training loop's own
`time.perf_counter`) at 32 and 64 px. Accuracy runs use the library API in
one process (the accuracy, not the start-up, is measured here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import BACKBONE  # noqa: E402

from finetune_cli import api  # noqa: E402


def write_digits(root: Path, size: int = 32, test_per_class: int = 30) -> dict:
    """{"test": folder, "pool": [(path, label), ...]} with every non-test digit in the pool."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    pool = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels / 16 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        path = root / "all" / f"{label}_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path)
        pool.append((path, int(label)))
    test = set()
    for label in range(10):
        idx = [i for i, (_, y) in enumerate(pool) if y == label]
        test |= set(rng.choice(idx, test_per_class, replace=False).tolist())
    for i in sorted(test):
        path, label = pool[i]
        (root / "test" / str(label)).mkdir(parents=True, exist_ok=True)
        path.rename(root / "test" / str(label) / path.name)
    return {"test": root / "test", "pool": [p for i, p in enumerate(pool) if i not in test]}


def split_labelled(pool, root: Path, ks: tuple[int, ...], seed: int) -> tuple[dict, Path]:
    """({k: folder with k labelled per class}, unlabeled folder), as symlinks.

    The k labelled images are the first k of one seeded draw of max(ks) per
    class, so the unlabeled folder (everything else) serves every k.
    """
    rng = np.random.default_rng(100 + seed)
    rank = {}
    for label in range(10):
        idx = [i for i, (_, y) in enumerate(pool) if y == label]
        for r, i in enumerate(rng.choice(idx, max(ks), replace=False).tolist()):
            rank[i] = r
    folders = {k: root / f"labelled-k{k}" for k in ks}
    for i, (path, label) in enumerate(pool):
        targets = [folders[k] / str(label) for k in ks if rank.get(i, max(ks)) < k] if i in rank else [root / "unlabeled"]
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            (target / path.name).symlink_to(path)
    return folders, root / "unlabeled"


def accuracy(labelled: Path, test: Path, base: Path, weights: str, out: Path, similarity: str) -> tuple[float, str]:
    metrics = api.train(labelled, str(base), out=out, weights=weights, image_size=32, similarity=similarity,
                        use_cache=False)
    return api.evaluate(test, out)["accuracy"], metrics["strategy"]


def unadapted_cut(path: Path) -> Path:
    """The `--init-from` encoder before any adaptation: the backbone cut at the same stage."""
    from finetune_cli.config import PRETRAIN
    from finetune_cli.models.autoencoder import adapted_autoencoder
    from finetune_cli.models.backbones import build, resolve

    ae, _, _ = adapted_autoencoder(build(resolve(str(BACKBONE), "imagenet", 32)).model, 32, PRETRAIN.conv_filters)
    ae.encoder.save(path)
    return path


def encoders(unlabeled: Path, out: Path, epochs: int, only: list[str] | None) -> dict:
    """{name: (encoder path, summary)} for each pretraining variant."""
    made = {}
    variants = {"conv": {"arch": "conv"}, "mlp": {"arch": "mlp"}, "mlp greedy": {"arch": "mlp", "greedy": True}}
    if BACKBONE.exists():
        variants["init-from EfficientNet-Lite0"] = {"init_from": str(BACKBONE)}
    for name, options in variants.items():
        if only and not any(o in name for o in only):
            continue
        path = out / (name.replace(" ", "_").replace("/", "_") + ".keras")
        summary = api.pretrain(unlabeled, path, epochs=epochs, image_size=32, **options)
        made[name] = (path, summary)
        print(f"  pretrained {name}: {summary['epochs_run']} epochs, held-out loss {summary['best_val_loss']:.4f} "
              f"(noisy input {summary['identity_val_loss']:.4f}), {summary['train_images_per_s']:.0f} images/s, "
              f"{summary['seconds']:.0f} s", flush=True)
    return made


def throughput(unlabeled: Path, out: Path) -> None:
    for size in (32, 64):
        for arch in ("conv", "mlp"):
            summary = api.pretrain(unlabeled, out / f"speed_{arch}_{size}.keras", arch=arch, image_size=size, epochs=3)
            print(f"throughput {arch} at {size} px: {summary['steady_images_per_s']:.0f} images/s after the first "
                  f"epoch ({summary['train_images_per_s']:.0f} including it), {summary['n_train']} images, "
                  f"decoded images in memory: {summary['in_memory']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="k=3 only, one seed, no throughput")
    parser.add_argument("--only", nargs="*", help="encoders whose name contains one of these words")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_digits(tmp / "digits")
        ks = (3,) if args.quick else (3, 10)
        seeds = 1 if args.quick else args.seeds
        for seed in range(seeds):
            root = tmp / f"seed{seed}"
            labelled, unlabeled = split_labelled(data["pool"], root, ks, seed)
            print(f"seed={seed}: {len(list(unlabeled.iterdir()))} unlabeled", flush=True)
            made = encoders(unlabeled, root / "enc", args.epochs, args.only)
            for k in ks:
                for name, (path, _) in made.items():
                    # The same command both ways: a linear classifier on the encoder's final features.
                    runs = [("random init", path, "none", "similar"), ("pretrained", path, "imagenet", "similar")]
                    if name.startswith("init-from"):
                        runs = [("unadapted cut", unadapted_cut(root / "cut.keras"), "imagenet", "similar"),
                                ("adapted", path, "imagenet", "similar"),
                                ("whole backbone, auto", BACKBONE, "imagenet", "auto")]
                    for kind, base, weights, similarity in runs:
                        out = root / f"run-k{k}-{name}-{kind}".replace(" ", "_")
                        acc, strategy = accuracy(labelled[k], data["test"], base, weights, out, similarity)
                        results.setdefault((k, name, kind), []).append(acc)
                        print(f"  k={k:2d} {name:30s} {kind:22s} {acc:.1%} ({strategy})", flush=True)
        if not args.quick:
            throughput(unlabeled, tmp / "speed")
    print("\nmean test accuracy on 300 held-out digits (std over seeds)")
    for (k, name, kind), accs in results.items():
        print(f"k={k:2d}  {name:30s} {kind:22s} {np.mean(accs):6.1%} +- {np.std(accs):.1%}  (n={len(accs)})")
    print(json.dumps({f"k{k}|{n}|{t}": float(np.mean(a)) for (k, n, t), a in results.items()}))


if __name__ == "__main__":
    main()
