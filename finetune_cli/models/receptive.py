"""Receptive fields: which input pixels a unit of a layer can see.

Walked from the input to the layer through the model's graph, composing each
layer's kernel size k, stride s, dilation d and padding per axis (Araujo et
al., "Computing Receptive Fields of Convolutional Neural Networks", Distill
2019), with TensorFlow's `same` padding (pad_total = max((ceil(n/s) - 1) s +
d (k - 1) + 1 - n, 0), the smaller half on the top/left):

    size_out  = size_in + d (k - 1) jump_in
    jump_out  = jump_in s
    start_out = start_in + (d (k - 1) / 2 - pad_left) jump_in

`start` is the centre of output unit 0 in input pixel coordinates (pixel i
spans [i, i + 1)); unit y's centre is start + y * jump.

Supported layers: Conv2D, DepthwiseConv2D, SeparableConv2D, MaxPooling2D,
AveragePooling2D, ZeroPadding2D, Cropping2D; per-pixel layers (activations,
normalisation, Rescaling, Dropout...) and merges (Add, Multiply, Concatenate,
...; of a merge, the inputs of the output's own spatial size are followed: a
squeeze-excitation gate computed from the whole image is not counted). Any
other layer on the path (Lambda, Resizing, a nested model, a shared layer)
raises `BackboneError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_cli.errors import BackboneError

WINDOWED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D")
POINTWISE = frozenset({
    "InputLayer", "BatchNormalization", "LayerNormalization", "GroupNormalization", "Activation", "ReLU",
    "LeakyReLU", "PReLU", "ELU", "Softmax", "Rescaling", "Normalization", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "Identity", "ActivityRegularization",
})
MERGES = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"})


@dataclass(frozen=True)
class Field:
    """The receptive field of a layer's units, per axis (rows, columns).

    Attributes:
        size: pixels each unit sees (before clipping at the image border).
        jump: input pixels between neighbouring units.
        start: centre of unit 0 in input pixel coordinates.
        grid: the layer's output (h, w).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    grid: tuple[int, int]

    def box(self, y: int, x: int, side: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixels (bottom/right exclusive) unit (y, x) sees in a side x side input."""
        edges = []
        for axis, index in ((0, y), (1, x)):
            centre = self.start[axis] + index * self.jump[axis]
            edges.append((max(0, math.floor(centre - self.size[axis] / 2)),
                          min(side, math.ceil(centre + self.size[axis] / 2))))
        (top, bottom), (left, right) = edges
        return top, left, bottom, right


def receptive_field(model, layer_name: str) -> Field:
    """The receptive field of `layer_name`'s units in `model` (a functional Keras model).

    Raises:
        BackboneError: a layer on the path whose geometry is not supported (see the module docstring).
    """
    memo: dict[str, tuple] = {}
    size, jump, start = _walk(model.get_layer(layer_name), memo)
    return Field(size, jump, start, _grid(model.get_layer(layer_name).output))


def _grid(tensor) -> tuple[int, int]:
    shape = tuple(tensor.shape)
    if len(shape) != 4 or None in shape[1:3]:
        raise BackboneError(f"receptive fields need a 4-D output of fixed size; this one is {shape}")
    return int(shape[1]), int(shape[2])


def _parents(layer) -> list:
    nodes = layer._inbound_nodes
    if len(nodes) != 1:
        raise BackboneError(f"layer {layer.name} is used {len(nodes)} times: receptive fields need each layer once")
    return [t._keras_history.operation for t in nodes[0].input_tensors]


def _walk(layer, memo: dict) -> tuple:
    """(size, jump, start) per axis of `layer`'s output, from its inputs' (memoised: graphs share paths)."""
    if layer.name in memo:
        return memo[layer.name]
    kind = type(layer).__name__
    if kind == "InputLayer":
        result = ((1, 1), (1, 1), (0.5, 0.5))
    elif kind in POINTWISE:
        result = _walk(_parents(layer)[0], memo)
    elif kind in MERGES:
        result = _merge(layer, memo)
    elif kind in WINDOWED or kind in ("ZeroPadding2D", "Cropping2D"):
        parent = _parents(layer)[0]
        result = _window(layer, kind, _walk(parent, memo), _grid(parent.output))
    else:
        raise BackboneError(f"cannot compute the receptive field through layer {layer.name} ({kind}): supported are "
                            f"{', '.join(WINDOWED)}, ZeroPadding2D, Cropping2D, per-pixel layers and merges")
    memo[layer.name] = result
    return result


def _merge(layer, memo: dict) -> tuple:
    """The widest field among the merge's inputs of the output's own size (broadcast gates are skipped)."""
    grid = _grid(layer.output)
    same = [p for p in _parents(layer) if len(p.output.shape) == 4 and tuple(p.output.shape[1:3]) == grid]
    fields = [_walk(p, memo) for p in same]
    if not fields or len({f[1] for f in fields}) != 1:
        raise BackboneError(f"cannot compute the receptive field through merge {layer.name}: its inputs differ in stride")
    return max(fields, key=lambda f: f[0])


def _window(layer, kind: str, field: tuple, grid_in: tuple[int, int]) -> tuple:
    """Compose one windowed layer (conv, pooling, padding, cropping) onto its input's field."""
    config = layer.get_config()
    if kind in ("ZeroPadding2D", "Cropping2D"):
        pads = config["padding" if kind == "ZeroPadding2D" else "cropping"]
        shift = [-p[0] if kind == "ZeroPadding2D" else p[0] for p in pads]
        return field[0], field[1], tuple(field[2][a] + shift[a] * field[1][a] for a in (0, 1))
    kernel = config.get("kernel_size") or config.get("pool_size")
    strides = config.get("strides") or kernel
    dilation = config.get("dilation_rate", (1, 1))
    size, jump, start = [], [], []
    for a in (0, 1):
        k, s, d = _pair(kernel)[a], _pair(strides)[a], _pair(dilation)[a]
        span = d * (k - 1) + 1
        pad = 0
        if config.get("padding") == "same":
            pad = max((math.ceil(grid_in[a] / s) - 1) * s + span - grid_in[a], 0) // 2
        elif config.get("padding") not in (None, "valid"):
            raise BackboneError(f"cannot compute the receptive field of {layer.name}: padding {config['padding']!r}")
        size.append(field[0][a] + (span - 1) * field[1][a])
        jump.append(field[1][a] * s)
        start.append(field[2][a] + ((span - 1) / 2 - pad) * field[1][a])
    return tuple(size), tuple(jump), tuple(start)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))
