"""tf.data pipelines: parallel decode + resize + batch + prefetch, memory flat.

Decoding uses `data.images.decode_rgb` (Pillow, which releases the GIL), so a
file decodes exactly as the scan judged it. A file that became unreadable
after the scan yields a black image and ok=False instead of killing the run.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb


def _loader(size: int, config: ScanConfig, view: int = 0):
    def load(path: bytes):
        try:
            with open(path, "rb") as handle:
                pixels = decode_rgb(handle.read(), config.max_pixels, config.background, size)
        except (OSError, UnusableImage):
            return np.zeros((size, size, 3), np.uint8), False
        return (augmented_view(pixels, view, zlib.crc32(path)) if view else pixels), True

    return load


def augmented_view(pixels: np.ndarray, view: int, salt: int) -> np.ndarray:
    """The `view`-th deterministic augmentation of an image: flip, crop 70-100 %, resize back.

    Args:
        pixels: uint8 (S, S, 3). Returns the same shape and dtype.
    """
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
    load = _loader(size, config, view)

    def load_tf(path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, ok

    names = tf.constant([str(p) for p in paths], dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices(names).map(load_tf, num_parallel_calls=tf.data.AUTOTUNE)


def batched_images(
    paths: Sequence[Path], size: int, batch_size: int, config: ScanConfig = SCAN, view: int = 0
) -> tf.data.Dataset:
    """Batches of (images uint8 (B, size, size, 3), ok bool (B,)), prefetched, in order."""
    return decode_dataset(paths, size, config, view).batch(batch_size).prefetch(tf.data.AUTOTUNE)
