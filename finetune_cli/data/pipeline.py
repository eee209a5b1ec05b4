"""tf.data pipelines: parallel decode + resize + batch + prefetch, memory flat.

Decoding uses `data.images.decode_rgb` (Pillow, which releases the GIL), so a
file decodes exactly as the scan judged it. A file that became unreadable
after the scan yields a black image and ok=False instead of killing the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.images import UnusableImage, decode_rgb


def _loader(size: int, config: ScanConfig):
    def load(path: bytes):
        try:
            with open(path, "rb") as handle:
                return decode_rgb(handle.read(), config.max_pixels, config.background, size), True
        except (OSError, UnusableImage):
            return np.zeros((size, size, 3), np.uint8), False

    return load


def decode_dataset(paths: Sequence[Path], size: int, config: ScanConfig = SCAN) -> tf.data.Dataset:
    """Unbatched dataset of (image uint8 (size, size, 3) in 0-255, ok bool), in `paths` order."""
    load = _loader(size, config)

    def load_tf(path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, ok

    names = tf.constant([str(p) for p in paths], dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices(names).map(load_tf, num_parallel_calls=tf.data.AUTOTUNE)


def batched_images(paths: Sequence[Path], size: int, batch_size: int, config: ScanConfig = SCAN) -> tf.data.Dataset:
    """Batches of (images uint8 (B, size, size, 3), ok bool (B,)), prefetched, in order."""
    return decode_dataset(paths, size, config).batch(batch_size).prefetch(tf.data.AUTOTUNE)
