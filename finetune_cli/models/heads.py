"""Classifier heads on top of a backbone: one Keras model from raw pixels to probabilities."""

from __future__ import annotations

from finetune_cli.runtime.keras import import_keras


def classifier(backbone_model, layer_name: str | list[str], n_classes: int, *, dropout: float = 0.0,
               l2: float = 0.0, kernel=None, bias=None, pooling: str = "avg", suffix: str = "",
               activation: str = "softmax"):
    """raw RGB (B, S, S, 3) in [0, 255] -> class probabilities (B, n_classes).

    Global average (or, with `pooling="max"`, max) pooling of `layer_name`'s
    output (of several layers' outputs, concatenated in order), dropout, and a softmax Dense layer named
    `classifier` (Glorot-uniform init, or `kernel` (d, k) and `bias` (k,) when
    given, e.g. from the linear head). `suffix` is appended to the head's layer
    names (and the model's), so several heads can share one backbone graph (an ensemble).
    `activation="sigmoid"`: one independent probability per output (a multi-label head, `train.multilabel`).
    """
    keras = import_keras()
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    pooled = pooled_outputs(backbone_model, names, pooling, suffix)
    x = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="head_concat" + suffix)(pooled)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout" + suffix)(x)
    dense = keras.layers.Dense(
        n_classes, activation=activation, name="classifier" + suffix, kernel_initializer="glorot_uniform",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
    )
    outputs = dense(x)
    if kernel is not None:
        dense.set_weights([kernel, bias])
    return keras.Model(backbone_model.input, outputs, name="finetune_classifier" + suffix)


def pooled_outputs(backbone_model, names: list[str], pooling: str = "avg", suffix: str = "") -> list:
    """The named layers' outputs, each 4-D map (B, H, W, C) globally average- (or `max`-) pooled to (B, C)
    (layers `head_pool`, `head_pool_1`, ... + `suffix`); a 2-D output as it is."""
    keras = import_keras()
    pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
    pooled = []
    for i, name in enumerate(names):
        x = backbone_model.get_layer(name).output
        pooled.append(pool(name="head_pool" + (f"_{i}" if i else "") + suffix)(x) if len(x.shape) == 4 else x)
    return pooled
