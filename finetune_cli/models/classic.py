"""Small classic networks built in, from standard Keras layers, random initialisation only.

Sized for 32-128 px images (students for `finetune distill`, or `train --base
lenet` from scratch). Like every backbone they take raw RGB (B, S, S, 3) in
[0, 255] (scaled to [0, 1] by a preprocessing layer) and output their last
feature map (B, h, w, C); the head (`models.heads.classifier`) pools it and
adds the classifier. No pretrained weights exist for them.

    lenet    LeNet-5-like: conv5x5(6) pool conv5x5(16) pool conv(120, kernel =
             the remaining side: 1x1 out, LeNet's C5) conv1x1(84): ~60 k parameters at 32 px
    alexnet  AlexNet-style, narrowed: conv5x5(32) pool conv5x5(64) pool
             conv3x3(96) conv3x3(96) conv3x3(64) pool: ~0.25 M parameters
    vgg      VGG-style: three blocks of two conv3x3 (32, 64, 128) each then a
             2x2 pool: ~0.3 M parameters
"""

from __future__ import annotations

#: builder per registry name (`registry.BackboneSpec.constructor` of a built-in spec).
BUILDERS = ("lenet", "alexnet", "vgg")


def build(keras, name: str, size: int):
    """The named network at input side `size` (>= the spec's min_size), freshly initialised."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="preprocess_scale")(inputs)
    x = {"lenet": _lenet, "alexnet": _alexnet, "vgg": _vgg}[name](layers, x)
    return keras.Model(inputs, x, name=name)


def _lenet(layers, x):
    x = layers.Conv2D(6, 5, activation="relu", name="c1")(x)
    x = layers.MaxPooling2D(2, name="s2")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="c3")(x)
    x = layers.MaxPooling2D(2, name="s4")(x)
    x = layers.Conv2D(120, int(x.shape[1]), activation="relu", name="c5")(x)
    return layers.Conv2D(84, 1, activation="relu", name="f6")(x)


def _alexnet(layers, x):
    x = layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool2")(x)
    for i, filters in enumerate((96, 96, 64), start=3):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
    return layers.MaxPooling2D(3, 2, padding="same", name="pool5")(x)


def _vgg(layers, x):
    for block, filters in enumerate((32, 64, 128), start=1):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return x
