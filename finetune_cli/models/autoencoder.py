"""Denoising autoencoders whose encoder is an ordinary backbone.

Every encoder built here takes raw RGB in [0, 255], shape (B, S, S, 3), scales
it with a `preprocess_scale` layer, and outputs a feature map (B, h, w, C),
using standard Keras layers only, so a saved encoder loads in safe mode and
works as `--base ENCODER.keras` anywhere. Decoders output (B, S, S, 3) in
[0, 1] and are used only while pretraining.

- `conv`: blocks of two 3x3 convolutions and a 2x2 max-pool, then a dense
  code reshaped to (1, 1, code). A dense bottleneck, not a code map, so the
  code must compress the image (a map as wide as the input learns the
  identity) and pooled features keep the spatial layout. The decoder unfolds
  the code with a dense layer and mirrors the blocks with stride-2
  transposed convolutions.
- `mlp`: flatten, dense layers, a dense code reshaped to (1, 1, code). The
  decoder is tied (Vincent et al. 2010): each decoding layer multiplies by
  the transpose of its encoding layer's kernel and owns only a bias.
- `adapted`: the early stages of a pretrained backbone (`--init-from`), cut
  where the resolution reaches S / 8, with a new decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_cli.errors import BackboneError
from finetune_cli.models.backbones import PREPROCESS_PREFIX
from finetune_cli.models.stages import find_stages
from finetune_cli.runtime.keras import import_keras


@dataclass
class Autoencoder:
    """An encoder, its decoder, and how they fit together.

    Attributes:
        encoder: raw RGB (B, S, S, 3) in [0, 255] -> features (B, h, w, C).
        model: raw RGB -> reconstruction (B, S, S, 3) in [0, 1]; shares the
            encoder's layers.
        arch: `conv`, `mlp` or `adapted`.
        encoder_variables: the encoder's trainable variables.
        decoder_variables: the decoder's own trainable variables (for a tied
            decoder: only the biases).
        layers: for `mlp`, the encoder's dense layers and their tied decoder
            layers, in pairs from the input inward (for greedy training).
    """

    encoder: object
    model: object
    arch: str
    encoder_variables: list
    decoder_variables: list
    layers: list | None = None


def _scaled_input(keras, size: int):
    inputs = keras.Input((size, size, 3), name="image")
    return inputs, keras.layers.Rescaling(1 / 255.0, name=PREPROCESS_PREFIX + "scale")(inputs)


def conv_autoencoder(size: int, filters: tuple[int, ...], code_size: int, seed: int = 0) -> Autoencoder:
    """A convolutional denoising autoencoder; S must be divisible by 2^len(filters)."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    step = 2 ** len(filters)
    if size % step or size < step:
        raise BackboneError(f"--image-size {size} must be a multiple of {step} for a {len(filters)}-block conv encoder")
    layers = keras.layers
    inputs, x = _scaled_input(keras, size)
    for i, width in enumerate(filters, 1):
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{i}_conv1")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{i}_conv2")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    side = size // step
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(code_size, activation="relu", name="code")(x)
    code = layers.Reshape((1, 1, code_size), name="code_map")(x)
    encoder = keras.Model(inputs, code, name="conv_encoder")
    return _with_decoder(keras, encoder, size, tuple(reversed(filters)), "conv", unfold=side)


def adapted_autoencoder(backbone_model, size: int, filters: tuple[int, ...], seed: int = 0):
    """The early stages of a pretrained backbone (raw pixels in) plus a new decoder.

    The cut is the deepest stage whose side is at least S / 8, so the code
    keeps a spatial layout the decoder can rebuild.

    Returns:
        (Autoencoder, stage index cut at, number of stages of the backbone).
    """
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    stages = find_stages(backbone_model)
    usable = [s for s in stages if s.shape[0] and s.shape[0] >= size / 8] or stages[:1]
    stage = usable[-1]
    encoder = keras.Model(backbone_model.input, backbone_model.get_layer(stage.name).output,
                          name=f"{backbone_model.name}_to_stage{stage.index}")
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # inference mode: small batches must not rewrite ImageNet statistics
    widths = tuple(reversed(filters))
    return _with_decoder(keras, encoder, size, widths, "adapted"), stage.index, len(stages)


def _with_decoder(keras, encoder, size: int, widths: tuple[int, ...], arch: str, unfold: int | None = None) -> Autoencoder:
    """Append a transposed-convolution decoder from the encoder's output back to (S, S, 3).

    Args:
        unfold: for a (1, 1, code) output, the side of the map a dense layer
            unfolds the code into (with widths[0] channels) before upsampling.
    """
    layers = keras.layers
    x = encoder.output
    if unfold:
        x = layers.Flatten(name="decode_flat")(x)
        x = layers.Dense(unfold * unfold * widths[0], activation="relu", name="decode_unfold")(x)
        x = layers.Reshape((unfold, unfold, widths[0]), name="decode_map")(x)
    side = unfold or encoder.output_shape[1]
    steps = max(0, round(math.log2(size / side)))
    for i in range(steps):
        width = widths[min(i, len(widths) - 1)]
        x = layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu", name=f"decode{i + 1}_up")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"decode{i + 1}_conv")(x)
    if side * 2**steps != size:
        x = layers.Resizing(size, size, name="decode_resize")(x)
    output = layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")(x)
    model = keras.Model(encoder.input, output, name=f"{arch}_autoencoder")
    ours = {id(v) for v in encoder.trainable_variables}
    decoder_variables = [v for v in model.trainable_variables if id(v) not in ours]
    return Autoencoder(encoder, model, arch, list(encoder.trainable_variables), decoder_variables)


def tied_dense_class():
    """The `TiedDense` layer class (built lazily: defining it imports Keras)."""
    keras = import_keras()
    ops = keras.ops

    class TiedDense(keras.layers.Layer):
        """y = activation(x @ tied.kernel^T + bias): a decoder layer sharing its encoder's kernel.

        The encoder layer is held through a closure, not an attribute, so
        Keras does not track its kernel twice; this layer owns only `bias`.
        """

        def __init__(self, tied, activation=None, **kwargs):
            super().__init__(**kwargs)
            self._tied = lambda: tied
            self.activation = keras.activations.get(activation)

        @property
        def kernel(self):
            """The effective kernel, (tied units, tied inputs): the encoder kernel transposed."""
            return ops.transpose(self._tied().kernel)

        def build(self, input_shape):
            self.bias = self.add_weight(shape=(self._tied().kernel.shape[0],), initializer="zeros", name="bias")

        def call(self, x):
            return self.activation(ops.matmul(x, self.kernel) + self.bias)

    return TiedDense


def mlp_autoencoder(size: int, hidden: tuple[int, ...], code_size: int, seed: int = 0) -> Autoencoder:
    """A deep dense denoising autoencoder with tied weights; the code is a (1, 1, code) map."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs, x = _scaled_input(keras, size)
    x = layers.Flatten(name="flatten")(x)
    dense = []
    for i, units in enumerate((*hidden, code_size), 1):
        dense.append(layers.Dense(units, activation="relu", name="code" if i == len(hidden) + 1 else f"dense{i}"))
        x = dense[-1](x)
    code = layers.Reshape((1, 1, code_size), name="code_map")(x)
    encoder = keras.Model(inputs, code, name="mlp_encoder")

    TiedDense = tied_dense_class()
    tied = [TiedDense(layer, activation="sigmoid" if i == 0 else "relu", name=f"tied_{layer.name}")
            for i, layer in enumerate(dense)]
    y = layers.Flatten(name="code_flat")(encoder.output)
    for layer in reversed(tied):
        y = layer(y)
    output = layers.Reshape((size, size, 3), name="reconstruction")(y)
    model = keras.Model(inputs, output, name="mlp_autoencoder")
    decoder_variables = [layer.bias for layer in tied]
    return Autoencoder(encoder, model, "mlp", list(encoder.trainable_variables), decoder_variables,
                       layers=list(zip(dense, tied)))
