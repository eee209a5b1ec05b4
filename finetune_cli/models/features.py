"""Running a backbone over image files: the TensorFlow side of feature extraction."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from finetune_cli.config import ScanConfig
from finetune_cli.models.backbones import BaseRef, build
from finetune_cli.models.stages import select_layer
from finetune_cli.runtime.keras import import_keras


def pooled_model(model, layer_name: str, pooling: str):
    """Sub-model: raw images -> pooled features (B, C) of `layer_name`; with pooling `none`, its map as is;
    with `maxarg`, (B, 2C): each channel's spatial maximum, then its flat argmax (row * w + col) as float."""
    keras = import_keras()
    output = model.get_layer(layer_name).output
    if len(output.shape) == 4 and pooling == "maxarg":
        flat = keras.ops.reshape(output, (-1, output.shape[1] * output.shape[2], output.shape[3]))
        output = keras.ops.concatenate([keras.ops.max(flat, axis=1),
                                        keras.ops.cast(keras.ops.argmax(flat, axis=1), "float32")], axis=-1)
    elif len(output.shape) == 4 and pooling != "none":
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        output = pool(name=f"{pooling}pool_{layer_name}")(output)  # unique: one pass may pool a layer both ways
    return keras.Model(model.input, output, name=f"{model.name}_features")


def feature_batches(
    ref: BaseRef,
    paths: Sequence[Path],
    layers: Sequence[str | int | None],
    pooling: Sequence[str],
    batch_size: int,
    config: ScanConfig,
    view: int = 0,
    backbone=None,
) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """Run the backbone once over `paths` (one pooling per layer), batched and prefetched; yield each batch.

    Yields:
        (first row, one float32 (b, d_layer) array per layer, ok bool (b,));
        rows with ok=False are files that failed to decode and hold zeros.
    """
    keras = import_keras()
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images, image_spec

    backbone = backbone or build(ref)
    names = [select_layer(backbone.model, layer) for layer in layers]
    heads = [pooled_model(backbone.model, name, pool).output for name, pool in zip(names, pooling)]
    model = keras.Model(backbone.model.input, heads)
    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False),
                          input_signature=[image_spec(ref.image_size)])
    start = 0
    for images, ok in batched_images(paths, ref.image_size, batch_size, config, view):
        results = forward(images)
        results = results if isinstance(results, (list, tuple)) else [results]
        yield start, [r.numpy().reshape(len(ok), -1).astype(np.float32) for r in results], ok.numpy()
        start += len(ok)
