"""`finetune filters`: pictures that maximise chosen units of a layer, and DeepDream.

Steps:

    model     a backbone (`--base`) or a trained run (`--model`), cut at the layer -> (model, layer model, S)
    ascend    gradient ascent on S x S pixels in [0, 255], one picture per unit in
              one batch: objective = the unit's mean activation over the map;
              each step the image is shifted by a random jitter, the gradient is
              divided by its standard deviation, the image is pulled towards grey
              (decay) and blurred every few steps, so the pattern stays readable  -> pictures
    measure   each unit's activation on its picture and on uniform-noise images  -> ratios
    write     filters.png (a grid), index.html; with --dream, dream.png

DeepDream (`--dream IMAGE`) ascends the mean activation of the layer (or of
the named units) on a photo over `octaves` scales, coarse to fine: at a coarse
octave the image is a smaller picture resized up to S inside the gradient, so
the amplified patterns are large; each finer octave adds back the detail the
downscaling lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune_cli.analysis.units import grid, layer_name, pick_units, png_bytes
from finetune_cli.config import FILTERS, SCAN, FiltersConfig
from finetune_cli.data.images import UnusableImage, decode_rgb, read_image_file
from finetune_cli.errors import FolderError, SettingsError
from finetune_cli.files import output_folder, writing
from finetune_cli.pages.html import Tile, figure, page, section, tiles, write_page
from finetune_cli.runtime.keras import import_keras


def load_layer_model(base: str | None, run: str | None, layer, weights: str, image_size: int | None):
    """(layer model: raw RGB (B, S, S, 3) in [0, 255] -> (B, h, w, C), layer name, S, label).

    Raises:
        SettingsError: neither or both of base and run; BackboneError, ModelFileError, WeightsUnavailableError.
    """
    if (base is None) == (run is None):
        raise SettingsError("give exactly one of --base (a backbone) or --model (a run folder)")
    if run is not None:
        from finetune_cli.runs.run import Run

        loaded = Run.load(run)
        model, side, label = loaded.model, loaded.image_size, str(loaded.path)
    else:
        from finetune_cli.models.backbones import build, resolve

        ref = resolve(base, weights, image_size)
        model, side, label = build(ref).model, ref.image_size, ref.label
    name = layer_name(model, layer, base or "BASE")  # a run's base: the one it was trained from
    keras = import_keras()
    return keras.Model(model.inputs[0], model.get_layer(name).output), name, side, label  # a run's input is a list


def _blur(tf, images):
    """3x3 Gaussian blur per channel, edges reflected."""
    kernel = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
    kernel = tf.constant(np.tile(kernel[:, :, None, None], (1, 1, 3, 1)))
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    return tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")


def ascend(layer_model, units: list[int], side: int, settings: FiltersConfig = FILTERS, seed: int = 0) -> np.ndarray:
    """Pictures maximising each unit's mean activation: float32 (len(units), S, S, 3) in [0, 255]."""
    import tensorflow as tf

    channels = int(layer_model.output.shape[-1])
    mask = tf.constant(np.eye(channels, dtype=np.float32)[units][:, None, None, :])
    rng = np.random.default_rng(seed)
    image = tf.Variable(128 + rng.normal(0, 8, (len(units), side, side, 3)).astype(np.float32))

    @tf.function
    def step(shift):
        with tf.GradientTape() as tape:
            moved = tf.roll(image, shift, axis=[1, 2])
            score = tf.reduce_sum(tf.reduce_mean(layer_model(moved, training=False) * mask, axis=[1, 2]))
        gradient = tape.gradient(score, image)  # through the roll: already in the unshifted frame
        gradient /= tf.math.reduce_std(gradient, axis=[1, 2, 3], keepdims=True) + 1e-8
        image.assign(tf.clip_by_value(128 + (image + settings.lr * gradient - 128) * (1 - settings.decay), 0, 255))

    for i in range(settings.steps):
        step(tf.constant(rng.integers(-settings.jitter, settings.jitter + 1, 2), tf.int32))
        if settings.blur_every and (i + 1) % settings.blur_every == 0 and i + 1 < settings.steps:
            image.assign(image + min(1.0, side / 224) * (_blur(tf, image) - image))  # gentler on small canvases
    return image.numpy()


def unit_means(layer_model, images: np.ndarray, units: list[int]) -> np.ndarray:
    """(len(images), len(units)): each unit's activation averaged over the map, per image."""
    maps = np.asarray(layer_model(np.asarray(images, np.float32), training=False))
    return maps.mean(axis=(1, 2))[:, units]


def deep_dream(layer_model, photo: np.ndarray, units: list[int] | None, settings: FiltersConfig = FILTERS) -> np.ndarray:
    """DeepDream of a uint8 (S, S, 3) photo: float32 (S, S, 3) in [0, 255] (see the module docstring)."""
    import tensorflow as tf

    side = photo.shape[0]
    sizes = [max(8, round(side / settings.octave_scale ** k)) for k in range(settings.octaves - 1, -1, -1)]
    original = tf.constant(photo[None].astype(np.float32))
    channels = int(layer_model.output.shape[-1])
    weight = tf.constant(np.eye(channels, dtype=np.float32)[units].sum(0) if units else np.ones(channels, np.float32))
    current = tf.image.resize(original, (sizes[0], sizes[0]))
    for k, size in enumerate(sizes):
        if k:
            lost = tf.image.resize(original, (size, size)) - tf.image.resize(
                tf.image.resize(original, (sizes[k - 1],) * 2), (size, size))
            current = tf.image.resize(current, (size, size)) + lost
        small = tf.Variable(current)
        for _ in range(settings.dream_steps):
            with tf.GradientTape() as tape:
                score = tf.reduce_mean(layer_model(tf.image.resize(small, (side, side)), training=False) * weight)
            gradient = tape.gradient(score, small)
            small.assign(tf.clip_by_value(small + settings.dream_lr * gradient / (tf.math.reduce_std(gradient) + 1e-8),
                                          0, 255))
        current = small.value()
    return tf.image.resize(current, (side, side))[0].numpy()


#: What `filters` writes into its folder, by kind (all that --overwrite replaces there).
FILES = {"grid": "filters.png", "html": "index.html", "dream": "dream.png"}


def filters(base: str | None = None, model: str | None = None, *, layer, units: int | None = None, unit_ids=None,
            out=None, overwrite: bool = False, weights: str = "imagenet", image_size: int | None = None,
            dream=None, seed: int = 0, settings: FiltersConfig = FILTERS) -> dict:
    """Gradient-ascent pictures of `layer`'s units (`base` or a run `model`), and with `dream` a DeepDream photo.

    Args:
        units: how many (default `config.FILTERS.units`), the first ones; unit_ids: these instead.
        out: the folder for filters.png, index.html (and dream.png); None: a new `runs/<base>-filters-N`.
        overwrite: replace an earlier filters output in `out` (refused without it when `out` holds files).

    Returns:
        {"base", "layer", "image_size", "units": [{"unit", "activation", "noise_activation"}] (mean activation
        on its picture, and on uniform noise), "files": {"grid", "html"[, "dream"]}}.

    Raises:
        SettingsError (neither or both of base/model, unit out of range), BackboneError, ModelFileError,
        FolderError (an unusable --dream image), OutputError.
    """
    layer_model, name, side, label = load_layer_model(base, model, layer, weights, image_size)
    channels = int(layer_model.output.shape[-1])
    chosen = pick_units(channels, units or settings.units, unit_ids)
    photo = _photo(dream, side) if dream is not None else None
    target = output_folder(out, f"{label.replace('.keras', '')}-filters", command="filters",
                           owned=tuple(FILES.values()), overwrite=overwrite)
    with target.staged() as staging:
        pictures = ascend(layer_model, chosen, side, settings, seed)
        noise = np.random.default_rng(seed).uniform(0, 255, (8, side, side, 3)).astype(np.float32)
        reached = np.diag(unit_means(layer_model, pictures, chosen))
        baseline = unit_means(layer_model, noise, chosen).mean(0)
        summary = {"base": label, "layer": name, "image_size": side,
                   "units": [{"unit": u, "activation": float(a), "noise_activation": float(b)}
                             for u, a, b in zip(chosen, reached, baseline)]}
        kinds = ("grid", "html", "dream") if photo is not None else ("grid", "html")
        files = {kind: staging / FILES[kind] for kind in kinds}
        if photo is not None:
            _write_png(files["dream"], deep_dream(layer_model, photo, list(unit_ids) if unit_ids else None, settings))
        _write(staging, files, summary, pictures, settings)
        summary["files"] = {kind: str(target.path / FILES[kind]) for kind in kinds}
    return summary


def _photo(path, side: int) -> np.ndarray:
    """The --dream photo as uint8 (S, S, 3).

    Raises:
        FolderError: missing or not a usable image (one line, the reason).
    """
    try:
        return decode_rgb(read_image_file(Path(path), SCAN.max_bytes), SCAN.max_pixels, SCAN.background, side)
    except OSError as exc:
        raise FolderError(f"--dream {path}: {exc.strerror or exc}") from None
    except UnusableImage as exc:
        raise FolderError(f"--dream {path} cannot be used: {exc}") from None


def _write_png(path: Path, picture: np.ndarray) -> None:
    with writing(path) as tmp:
        tmp.write_bytes(png_bytes(np.clip(picture, 0, 255).round().astype(np.uint8)))


def stretched(picture: np.ndarray) -> np.ndarray:
    """For display: the 1st-99th percentile of a float picture stretched to 0-255, uint8 (the pattern, not its
    closeness to grey; activations are always measured on the picture itself)."""
    low, high = np.percentile(picture, [1, 99])
    return np.clip((picture - low) / max(high - low, 1e-6) * 255, 0, 255).round().astype(np.uint8)


def _write(folder: Path, files: dict, summary: dict, pictures: np.ndarray, settings: FiltersConfig) -> dict:
    """filters.png (up to 8 pictures a row) and index.html; returns their paths."""
    shown = [stretched(p) for p in pictures]
    per_row = min(8, len(shown))
    rows = [list(shown[i : i + per_row]) for i in range(0, len(shown), per_row)]
    with writing(files["grid"]) as tmp:
        tmp.write_bytes(png_bytes(grid(rows, settings.cell)))
    cells = [Tile(png_bytes(p), f"unit {u['unit']}: {u['activation']:.3g} (noise {u['noise_activation']:.3g})")
             for p, u in zip(shown, summary["units"])]
    parts = [section("units", tiles(cells))]
    if "dream" in files:
        parts.append(section("DeepDream", figure("dream.png", "the photo with the layer's patterns amplified")))
    notes = [f"{summary['base']}, layer {summary['layer']}: gradient ascent on {summary['image_size']} px images "
             f"({settings.steps} steps, jitter {settings.jitter} px, blur every {settings.blur_every}, decay "
             f"{settings.decay}), shown contrast-stretched; each caption: the unit's mean activation on its picture "
             "and on uniform noise."]
    write_page(files["html"], page(f"filters: {summary['layer']}", section("grid", figure("filters.png")), *parts,
                                   notes=notes))
    return {k: str(v) for k, v in files.items()}
