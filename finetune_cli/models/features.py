"""Running a backbone over image files: the TensorFlow side of feature extraction."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from finetune_cli.config import ScanConfig
from finetune_cli.models.backbones import BaseRef, build
from finetune_cli.models.stages import select_layer
from finetune_cli.tfquiet import import_keras


def pooled_model(model, layer_name: str, pooling: str):
    """Sub-model: raw images -> pooled features (B, C) of `layer_name`."""
    keras = import_keras()
    output = model.get_layer(layer_name).output
    if len(output.shape) == 4:
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        output = pool(name="feature_pool")(output)
    return keras.Model(model.input, output, name=f"{model.name}_features")


def compute_features(
    ref: BaseRef,
    paths: Sequence[Path],
    layer: str | int | None,
    pooling: str,
    batch_size: int,
    config: ScanConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Build the backbone and run it over `paths`, batched and prefetched.

    Returns:
        (layer name, features float32 (n, d), ok bool (n,)); rows with ok=False
        are files that failed to decode and hold zeros.
    """
    import_keras()
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images

    backbone = build(ref)
    name = select_layer(backbone.model, layer)
    model = pooled_model(backbone.model, name, pooling)
    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), reduce_retracing=True)
    outputs, oks, done = [], [], 0
    for images, ok in batched_images(paths, ref.image_size, batch_size, config):
        outputs.append(forward(images).numpy())
        oks.append(ok.numpy())
        done += len(oks[-1])
        if progress:
            progress(done, len(paths))
    features = np.concatenate(outputs).astype(np.float32)
    return name, features, np.concatenate(oks)
