"""tf.data pipelines: parallel decode + resize + batch + prefetch, memory flat.

Decoding uses `data.images.decode_rgb` (Pillow, which releases the GIL), so a
file decodes exactly as the scan judged it. A file that became unreadable
after the scan yields a black image and ok=False instead of killing the run.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb, read_image_file
from finetune_cli.runtime.keras import import_keras

import_keras()  # TensorFlow starts here quietly, CPU split applied, whoever imports this module first
import tensorflow as tf  # noqa: E402


def image_spec(size: int, dtype=tf.uint8) -> tf.TensorSpec:
    """The signature of an image batch (B, size, size, 3) with any B.

    Functions traced with it trace once: without it, the short last batch of
    every pass traces the whole network a second time (~1.5 s on a CPU).
    """
    return tf.TensorSpec((None, size, size, 3), dtype)


def path_tensor(paths: Sequence[Path]) -> tf.Tensor:
    """File paths as a string tensor of their raw bytes: names need not be UTF-8."""
    return tf.constant([os.fsencode(p) for p in paths], dtype=tf.string)


def loader(size: int, config: ScanConfig, view: int = 0):
    def load(path: bytes):
        try:
            data = read_image_file(path, config.max_bytes)
            pixels = decode_rgb(data, config.max_pixels, config.background, size)
        except (OSError, UnusableImage):
            return np.zeros((size, size, 3), np.uint8), False
        return (augmented_view(pixels, view, zlib.crc32(data)) if view else pixels), True

    return load


MIRROR = -1  # the view number of an image's mirror image alone


def augmented_view(pixels: np.ndarray, view: int, salt: int) -> np.ndarray:
    """The `view`-th deterministic augmentation of an image: flip (odd views), crop 70-100 %, resize back.

    Args:
        pixels: uint8 (S, S, 3). Returns the same shape and dtype.
        view: >= 1, or `MIRROR` (-1): the horizontal mirror image alone, no crop (`train.flips`).
        salt: a checksum of the file's bytes, so a view depends on the content
            alone, as its cache key does (a copy elsewhere gets the same crop).
    """
    if view == MIRROR:
        return np.ascontiguousarray(pixels[:, ::-1])
    rng = np.random.default_rng([view, salt])
    size = pixels.shape[0]
    if view % 2:
        pixels = pixels[:, ::-1]
    side = int(size * np.sqrt(rng.uniform(0.7, 1.0)))
    top, left = rng.integers(0, size - side + 1, 2)
    crop = Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def decode_dataset(paths: Sequence[Path], size: int, config: ScanConfig = SCAN, view: int = 0) -> tf.data.Dataset:
    """Unbatched dataset of (image uint8 (size, size, 3) in 0-255, ok bool), in `paths` order."""
    load = loader(size, config, view)

    def load_tf(path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, ok

    return tf.data.Dataset.from_tensor_slices(path_tensor(paths)).map(load_tf, num_parallel_calls=tf.data.AUTOTUNE)


def batched_images(
    paths: Sequence[Path], size: int, batch_size: int, config: ScanConfig = SCAN, view: int = 0
) -> tf.data.Dataset:
    """Batches of (images uint8 (B, size, size, 3), ok bool (B,)), prefetched, in order."""
    return decode_dataset(paths, size, config, view).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def decoded_arrays(paths: Sequence[Path], size: int, config: ScanConfig = SCAN,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All of `paths` decoded in memory: (images float32 (n, size, size, 3) in [0, 255], ok bool (n,)).

    For the few images a command holds at once (a chunk to explain, a set to
    check an export on); larger sets stream `batched_images` instead.
    """
    batches = [(x.numpy(), ok.numpy()) for x, ok in batched_images(paths, size, batch_size, config)]
    if not batches:
        return np.zeros((0, size, size, 3), np.float32), np.zeros(0, bool)
    return np.concatenate([b[0] for b in batches]).astype(np.float32), np.concatenate([b[1] for b in batches])


def augmenter(strength: str, flips: bool = True):
    """A Keras layer stack augmenting float image batches in [0, 255], or None.

    light: horizontal flip (unless `flips` is False), shifts up to 10 %.
    strong: also zoom up to 20 %, rotation up to 0.05 turns (18 degrees),
    contrast up to 20 %.
    """
    keras = import_keras()
    if strength == "none":
        return None
    layers = [keras.layers.RandomFlip("horizontal")] if flips else []
    layers += [keras.layers.RandomTranslation(0.1, 0.1)]
    if strength == "strong":
        layers += [keras.layers.RandomZoom(0.2), keras.layers.RandomRotation(0.05),
                   keras.layers.RandomContrast(0.2, value_range=(0, 255))]
    return keras.Sequential(layers, name=f"augment_{strength}")


def labelled_batches(
    paths: Sequence[Path],
    labels: Sequence[int],
    weights: Sequence[float],
    size: int,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment=None,
    config: ScanConfig = SCAN,
) -> tf.data.Dataset:
    """Batches of (images float32 (B, S, S, 3) in 0-255, labels int32 (B,), weights float32 (B,)); `labels`
    given as a multi-hot matrix (n, L) give float32 (B, L) labels (multi-label fine-tuning).

    Shuffled (reshuffled each epoch) when `shuffle_seed` is given; files that
    fail to decode get weight 0 so they cannot affect training.
    """
    load = loader(size, config)
    data = tf.data.Dataset.from_tensor_slices((
        path_tensor(paths), tf.constant(np.asarray(labels), tf.float32 if np.ndim(labels) == 2 else tf.int32),
        tf.constant(list(weights), tf.float32),
    ))
    if shuffle_seed is not None:
        data = data.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(path, label, weight):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        return tf.cast(image, tf.float32), label, weight * tf.cast(ok, tf.float32)

    data = data.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if augment is not None:
        data = data.map(lambda x, y, w: (augment(x, training=True), y, w), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def image_batches(
    paths: Sequence[Path],
    size: int,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    in_memory: bool = False,
    config: ScanConfig = SCAN,
) -> tf.data.Dataset:
    """Batches of (images float32 (B, S, S, 3) in 0-255, weights float32 (B,)) for unlabeled training.

    `in_memory` keeps the decoded uint8 images after the first pass (use it
    only when they fit); otherwise files are decoded every epoch and memory
    stays flat. Shuffled each epoch when `shuffle_seed` is given. A file that
    fails to decode gets weight 0.
    """
    load = loader(size, config)

    def decode(path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, ok

    data = tf.data.Dataset.from_tensor_slices(path_tensor(paths))
    if shuffle_seed is not None and not in_memory:
        data = data.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    data = data.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    if in_memory:
        data = data.cache()
        if shuffle_seed is not None:
            data = data.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    data = data.map(lambda image, ok: (tf.cast(image, tf.float32), tf.cast(ok, tf.float32)))
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
