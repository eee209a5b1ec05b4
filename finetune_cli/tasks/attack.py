"""`finetune attack`: accuracy of a run under adversarial perturbations (FGSM, PGD) and common corruptions.

Steps: parse eps -> load the run -> scan the labelled folder -> decode ->
per (method, eps) perturb and score -> sanity checks against gradient
masking -> robustness.json, robustness.png, index.html with examples.

The models take raw pixels, so eps is in the user's units: an L-infinity
budget of eps out of 255 per channel, and every perturbed image is clipped
to [0, 255]. The loss attacked is the cross-entropy -log p(label).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from finetune_cli.analysis.saliency import call
from finetune_cli.config import ATTACK, EXPLAIN, SCAN, AttackConfig, ScanConfig
from finetune_cli.data.inputs import decode, labelled_test_scan
from finetune_cli.errors import SettingsError
from finetune_cli.files import output_folder, shown, writing
from finetune_cli.pages.figures import figure_png, png_bytes, pyplot
from finetune_cli.pages.html import Tile, figure, page, section, table, write_page
from finetune_cli.runs.run import Run

CORRUPTIONS = ("noise", "blur", "jpeg", "brightness")


def parse_eps(eps) -> tuple[float, ...]:
    """Budgets from "0,1,2,4,8" (or a sequence), in 0-255 pixel units, sorted, distinct; 0 (the clean
    accuracy, the reference of the halving eps and of the checks) is always included.

    Raises:
        SettingsError: a value that is not a number, negative or above 255.
    """
    items = [e.strip() for e in eps.split(",") if e.strip()] if isinstance(eps, str) else list(eps)
    try:
        values = [float(e) for e in items]
    except (TypeError, ValueError):
        values = None
    if not values or any(not np.isfinite(v) or not 0 <= v <= 255 for v in values):
        raise SettingsError(f"--eps takes numbers from 0 to 255 (pixel units), comma-separated, e.g. 0,1,2,4,8. "
                            f"Received: eps={eps!r}")
    return tuple(sorted(set(values) | {0.0}))


def parse_methods(methods) -> tuple[str, ...]:
    """Attacks from "fgsm,pgd" (or a sequence).

    Raises:
        SettingsError: an unknown name.
    """
    names = [m.strip().lower() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    if not names or any(m not in ATTACK.methods for m in names):
        raise SettingsError(f"--method takes {', '.join(ATTACK.methods)}, comma-separated. Received: method={methods!r}")
    return tuple(dict.fromkeys(names))


def gradient_sign_fn(model):
    """A compiled (images (B, S, S, 3) float32, labels (B,) int32) -> sign of d CE / d images."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def sign(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            p = tf.gather(call(model, x), y, batch_dims=1)
            loss = -tf.math.log(tf.maximum(p, 1e-30))
        return tf.sign(tape.gradient(loss, x))

    return sign


def perturb(model, images: np.ndarray, labels: np.ndarray, method: str, eps: float,
            config: AttackConfig = ATTACK, sign=None) -> tuple[np.ndarray, np.ndarray]:
    """(adversarial images (n, S, S, 3) in [0, 255], fooled (n,) bool) for one method and budget.

    fgsm: x + eps * sign(grad), one step (Goodfellow et al. 2015).
    pgd: `pgd_steps` signed steps of `pgd_step_factor` * eps / steps from a random point of the ball,
    each projected back on the ball and [0, 255] (Madry et al. 2018); an image counts as fooled
    if any iterate was, and the first fooling iterate is returned. `sign`: a `gradient_sign_fn(model)` to
    reuse (traced once for every method and eps).
    """
    sign = sign or gradient_sign_fn(model)
    rng = np.random.default_rng(config.seed)
    out, fooled = np.empty_like(images), np.zeros(len(images), bool)
    for s in range(0, len(images), config.batch_size):
        x, y = images[s:s + config.batch_size], labels[s:s + config.batch_size].astype(np.int32)
        if eps == 0:
            adv, hit = x.copy(), _wrong(model, x, y)
        elif method == "fgsm":
            adv = np.clip(x + eps * sign(x, y).numpy(), 0, 255)
            hit = _wrong(model, adv, y)
        else:
            adv, hit = _pgd(model, sign, x, y, eps, rng, config)
        out[s:s + len(x)], fooled[s:s + len(x)] = adv, hit
    return out, fooled


def _pgd(model, sign, x, y, eps, rng, config: AttackConfig):
    step = config.pgd_step_factor * eps / config.pgd_steps
    start = rng.uniform(-eps, eps, x.shape).astype(np.float32) if config.random_start else 0
    adv = np.clip(x + start, 0, 255).astype(np.float32)
    best, hit = adv.copy(), _wrong(model, adv, y)
    for _ in range(config.pgd_steps):
        adv = np.clip(np.clip(adv + step * sign(adv, y).numpy(), x - eps, x + eps), 0, 255).astype(np.float32)
        now = _wrong(model, adv, y) & ~hit
        best[now], hit = adv[now], hit | now
    best[~hit] = adv[~hit]
    return best, hit


def _wrong(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return call(model, x).numpy().argmax(1) != y


def corrupt(images: np.ndarray, kind: str, severity: float, seed: int = ATTACK.seed) -> np.ndarray:
    """`images` (n, S, S, 3) float32 in [0, 255] corrupted: noise (std px), blur (radius px), jpeg (quality),
    brightness (offset px); clipped to [0, 255]."""
    from PIL import Image, ImageFilter

    if kind == "noise":
        return np.clip(images + np.random.default_rng(seed).normal(0, severity, images.shape), 0, 255).astype(np.float32)
    if kind == "brightness":
        return np.clip(images + severity, 0, 255).astype(np.float32)
    out = np.empty_like(images)
    for i, image in enumerate(images.astype(np.uint8)):
        picture = Image.fromarray(image)
        if kind == "blur":
            picture = picture.filter(ImageFilter.GaussianBlur(severity))
        else:
            buffer = io.BytesIO()
            picture.save(buffer, "JPEG", quality=int(severity))
            picture = Image.open(buffer).convert("RGB")
        out[i] = np.asarray(picture, np.float32)
    return out


def halving_eps(eps: tuple[float, ...], accuracy: list[float]) -> float | None:
    """The eps where accuracy first falls to half of its value at the smallest eps, interpolated linearly
    between the two budgets around it; None if it never does."""
    target = accuracy[0] / 2
    for i in range(1, len(eps)):
        if accuracy[i] <= target:
            a0, a1 = accuracy[i - 1], accuracy[i]
            share = 1.0 if a0 == a1 else (a0 - target) / (a0 - a1)
            return round(float(eps[i - 1] + share * (eps[i] - eps[i - 1])), 4)
    return None


def masking_warnings(curves: dict[str, list[float]], eps: tuple[float, ...], n: int,
                     config: AttackConfig = ATTACK) -> list[str]:
    """Signs of gradient masking (Athalye et al. 2018): PGD weaker than FGSM, accuracy rising with eps,
    or accuracy far from 0 at the largest eps. `curves`: method -> accuracy (0-1) per eps; n images."""
    slack, warnings = config.tolerance_images / max(n, 1) + 1e-9, []
    for method, acc in curves.items():
        rises = [f"{eps[i]:g}" for i in range(1, len(eps)) if acc[i] > acc[i - 1] + slack]
        if rises:
            warnings.append(f"{method}: accuracy rose as eps grew (at eps {', '.join(rises)}): suspect gradient masking")
        if len(eps) > 1 and eps[-1] > 0 and acc[-1] > config.masking_floor * acc[0]:
            warnings.append(f"{method}: accuracy at eps {eps[-1]:g} is still {acc[-1]:.0%} (clean {acc[0]:.0%}); "
                            "it should fall toward 0 as eps grows: try a larger eps, or suspect gradient masking")
    if "fgsm" in curves and "pgd" in curves:
        weaker = [f"{e:g}" for e, f, p in zip(eps, curves["fgsm"], curves["pgd"]) if p > f + slack]
        if weaker:
            warnings.append(f"PGD was weaker than FGSM at eps {', '.join(weaker)}: suspect gradient masking")
    return warnings


#: What `attack` writes into its folder (all that --overwrite replaces there).
OUTPUTS = ("robustness.json", "robustness.png", "index.html")


def attack(run, root, *, eps=None, methods=None, out=None, corruptions: bool = False,
           overwrite: bool = False, config: AttackConfig = ATTACK, scan_config: ScanConfig = SCAN) -> dict:
    """Accuracy of a run against adversarial budgets eps (0-255 pixel units; FGSM, PGD) on a labelled folder,
    and optionally under common corruptions; writes robustness.json, robustness.png and index.html.

    Args:
        eps, methods: comma-separated text or sequences; None: `config.AttackConfig`'s (eps 0,1,2,4,8; fgsm,pgd).
        out: the folder to write; None: a new `runs/<run>-attack-<N>`.
        overwrite: replace an earlier attack's files in `out` (refused without it when `out` holds files).

        config, scan_config: the attack's and the scan's settings (`config.AttackConfig`, `ScanConfig`).

    The files are staged and moved in when all are written (`files.output_folder`).

    Returns (also out/robustness.json):
        {"out", "page", "n_images", "eps", "accuracy": {method: [per eps]}, "halving_eps": {method: eps or None},
        "rows": [{method, eps, accuracy}], "warnings": [...], "corruptions": [{corruption, severity, level,
        accuracy}] or None, "skipped": [{path, reason}]}.

    Raises:
        SettingsError (eps, method), ModelFileError, FolderError, OutputError.
    """
    eps = parse_eps(config.eps if eps is None else eps)
    methods = parse_methods(config.methods if methods is None else methods)
    run = Run.load(run)
    scan, total = sampled(labelled_test_scan(root, run.classes, scan_config), config)
    images = decode(scan, run.classes, run.image_size, scan_config)
    target = output_folder(out, f"{run.path.name}-attack", command="attack", owned=OUTPUTS, overwrite=overwrite)
    with target.staged() as staging:
        summary, chosen, examples = _attacked(run, images, eps, methods, corruptions, scan, total, target.path,
                                              config)
        _write_outputs(staging, summary, images, (chosen, examples), run)
    return summary


def _attacked(run: Run, images, eps: tuple, methods: tuple, corruptions: bool, scan, total: int, folder,
              config: AttackConfig) -> tuple[dict, np.ndarray, dict]:
    """(the summary, the example images' indices, {(method, eps): their perturbed copies}) of every attack."""
    curves, examples = {}, {}
    chosen = np.unique(np.linspace(0, len(images.labels) - 1, config.examples).round().astype(int))
    sign = gradient_sign_fn(run.model)
    for method in methods:
        curves[method] = []
        for e in eps:
            adversarial, fooled = perturb(run.model, images.pixels, images.labels, method, e, config, sign)
            curves[method].append(float(np.mean(~fooled)))
            examples[method, e] = adversarial[chosen]
    summary = {"out": str(folder), "page": str(folder / "index.html"), "n_images": len(images.labels),
               "eps": list(eps), "accuracy": curves,
               "halving_eps": {m: halving_eps(eps, a) for m, a in curves.items()},
               "rows": [{"method": m, "eps": e, "accuracy": round(a, 4)} for m in methods for e, a in zip(eps, curves[m])],
               "warnings": masking_warnings(curves, eps, len(images.labels), config) + (
                   [f"attacked a random {len(scan.images)} of the {total} images (AttackConfig.max_images); "
                    "the figures are estimates for the folder"] if total > len(scan.images) else []),
               "corruptions": corruption_rows(run.model, images.pixels, images.labels, config) if corruptions else None,
               "skipped": [{"path": shown(s.path), "reason": s.reason} for s in images.skipped]}
    return summary, chosen, examples


def sampled(scan, config: AttackConfig = ATTACK):
    """(`scan` cut to a seeded random `config.max_images` of its images, in their order; the original count).

    Every image is held in memory with its perturbed copies, so the number
    attacked is bounded: memory stays flat however large the folder.
    """
    total = len(scan.images)
    if total <= config.max_images:
        return scan, total
    keep = np.sort(np.random.default_rng(config.seed).permutation(total)[:config.max_images])
    return dataclasses.replace(scan, images=tuple(scan.images[i] for i in keep)), total


def corruption_rows(model, images: np.ndarray, labels: np.ndarray, config: AttackConfig = ATTACK) -> list[dict]:
    """Accuracy under each corruption at its three severities (levels 1-3)."""
    rows = []
    for kind in CORRUPTIONS:
        for level, severity in enumerate(getattr(config, kind), start=1):
            changed = corrupt(images, kind, severity, config.seed)
            wrong = np.concatenate([_wrong(model, changed[s:s + config.batch_size], labels[s:s + config.batch_size])
                                    for s in range(0, len(changed), config.batch_size)])
            rows.append({"corruption": kind, "severity": severity, "level": level,
                         "accuracy": round(float(np.mean(~wrong)), 4)})
    return rows


def curve_png(summary: dict) -> bytes:
    """robustness.png: accuracy (0-1) against eps, one line per method."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4))
    for method, acc in summary["accuracy"].items():
        axis.plot(summary["eps"], acc, "o-", label=method.upper())
    axis.set_xlabel("eps (pixels, of 255)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"robustness on {summary['n_images']} images")
    return figure_png(figure)


def example_tiles(images, chosen: np.ndarray, examples: dict, classes: list[str], model) -> list:
    """One tile per chosen image: original | perturbation (amplified to the full range, grey = 0) |
    adversarial, at the largest eps (PGD when run), captioned with the label and both predictions."""
    (method, eps), adversarial = max(examples.items(), key=lambda kv: (kv[0][1], kv[0][0] == "pgd"))
    original = images.pixels[chosen]
    before, after = (call(model, x).numpy().argmax(1) for x in (original, adversarial))
    tiles = []
    for i, index in enumerate(chosen):
        label = int(images.labels[index])
        delta = adversarial[i] - original[i]
        scale = 127.5 / (np.abs(delta).max() or 1)
        gap = np.full((original.shape[1], max(2, original.shape[1] // 16), 3), 255.0)
        strip = np.concatenate([original[i], gap, 127.5 + scale * delta, gap, adversarial[i].round()], axis=1)
        tiles.append(Tile(png_bytes(strip, 3 * EXPLAIN.min_view),
                          f"{shown(images.paths[index]).rsplit('/', 1)[-1]}: label {classes[label]}\n"
                          f"predicted {classes[before[i]]} -> {classes[after[i]]} "
                          f"({method.upper()} eps {eps:g}, perturbation x{scale:.0f})"
                          + (", wrong before the attack" if before[i] != label else ", fooled" if after[i] != label else ""),
                          bool(after[i] != label)))
    return tiles


def _write_outputs(folder, summary: dict, images, chosen_examples: tuple, run: Run) -> None:
    curve = curve_png(summary)
    for name, data in (("robustness.png", curve),
                       ("robustness.json", json.dumps(summary, indent=2, ensure_ascii=False).encode())):
        with writing(folder / name) as tmp:
            tmp.write_bytes(data)
    parts = [section("accuracy against eps", figure("robustness.png", "accuracy against eps"),
                     table(summary["rows"], ["method", "eps", "accuracy"]),
                     notes=[f"{m.upper()}: accuracy halves at eps {h:g}" if h is not None else
                            f"{m.upper()}: accuracy never halves" for m, h in summary["halving_eps"].items()]
                     + summary["warnings"])]
    if summary["corruptions"]:
        parts.append(section("common corruptions", table(summary["corruptions"],
                                                         ["corruption", "severity", "level", "accuracy"])))
    chosen, examples = chosen_examples
    if any(e > 0 for _, e in examples):
        shown_tiles = example_tiles(images, chosen, examples, run.classes, run.model)
        parts.append(section("examples", *(figure(t.src, t.caption.replace("\n", "; ")) for t in shown_tiles),
                             notes=["original | perturbation (grey = 0, amplified) | adversarial"]))
    write_page(folder / "index.html", page(f"finetune attack: run {run.path.name}", *parts))
