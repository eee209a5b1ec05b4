"""Building backbones: a registry name or a `.keras` file -> a Keras model on raw pixels.

Every backbone takes raw RGB in [0, 255], shape (batch, S, S, 3), with its own
preprocessing as layers inside the model (standard Keras layers only, so a
saved model loads in safe mode), and outputs its final feature map
(batch, h, w, C) or, for a file base that pools, (batch, C).

`resolve()` is cheap (no TensorFlow): it names the backbone and its weights
for the feature cache. `build()` imports Keras and constructs the model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from finetune_cli.config import DEFAULT_IMAGE_SIZE, default_models_dir
from finetune_cli.errors import BackboneError, WeightsUnavailableError
from finetune_cli.models import classic, efficientnet_lite, registry
from finetune_cli.models.files import declared_input, input_side, load_model_file
from finetune_cli.runtime.keras import import_keras

#: Layer-name prefix of the preprocessing layers we add; they never train.
PREPROCESS_PREFIX = "preprocess_"


@dataclass(frozen=True)
class BaseRef:
    """A backbone named but not built.

    Attributes:
        label: what users see (`vgg16`, `encoder.keras`).
        spec: the registry spec, or None for a file base.
        path: the model file; for an embedded registry base with ImageNet
            weights, the packaged source weights; else None.
        weights: `imagenet` (pretrained; for a file: the file's own weights),
            `none` (fresh, seeded initialisation) or a weights-file path.
        image_size: input side in pixels.
        seed: initialisation seed used when weights is `none`.
        identity: architecture + weights fingerprint, the feature-cache key.
    """

    label: str
    spec: registry.BackboneSpec | None
    path: Path | None
    weights: str
    image_size: int
    seed: int
    identity: str


@dataclass
class Backbone:
    """A built backbone.

    Attributes:
        ref: what was built.
        model: raw RGB (B, S, S, 3) in [0, 255] -> (B, h, w, C) or (B, C).
        classifier: the same trunk with its ImageNet softmax head, (B, 1000),
            when the base file carried one; else None.
    """

    ref: BaseRef
    model: object
    classifier: object | None = None


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, 32 hex digits."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(base: str, weights: str = "imagenet", image_size: int | None = None, seed: int = 0) -> BaseRef:
    """Name a backbone without building it.

    Args:
        base: a registry name (see `finetune bases`) or a `.keras` file path.
        weights: `imagenet`, `none`, or a weights-file path.
        image_size: input side; None for the native size (a file's own fixed
            size, else 224).

    Raises:
        BackboneError: unknown name, missing file, bad size.
        WeightsUnavailableError: a weights path that does not exist.
    """
    weights = _check_weights(weights)
    if weights == "imagenet" and registry.is_registered(base) and registry.get(base).builtin:
        weights = "none"  # no pretrained weights exist for the built-in classic networks
    keras_version = metadata.version("keras")
    weights_id = weights if weights in ("imagenet", "none") else "file:" + file_digest(Path(weights))
    if weights == "none":
        weights_id += f":seed{seed}"
    if registry.is_registered(base):
        spec = registry.get(base)
        size = input_side(None, image_size, spec.name, spec.input_size)
        if size < spec.min_size:
            raise BackboneError(f"{spec.name} needs images of at least {spec.min_size} px; got --image-size {size}")
        source = None
        if spec.embedded and weights == "imagenet":
            source = efficientnet_lite.source_file()
            weights_id = f"embedded:{file_digest(source)}"
        identity = f"{spec.name}|{weights_id}|keras{keras_version}"
        return BaseRef(spec.name, spec, source, weights, size, seed, identity)
    path = Path(base).expanduser()
    if path.suffix != ".keras" and not path.exists():
        registry.get(base)  # raises with the valid names and the closest match
    if not path.is_file():
        raise BackboneError(f"model file {path} does not exist: give a .keras file or a name from `finetune bases`")
    size = input_side(declared_input(path), image_size, path.name, DEFAULT_IMAGE_SIZE)
    identity = f"file:{file_digest(path)}|{weights_id}|keras{keras_version}"
    return BaseRef(path.name, None, path.absolute(), weights, size, seed, identity)


def _check_weights(weights: str) -> str:
    key = str(weights).strip()
    if key.lower() in ("imagenet", "none"):
        return key.lower()
    if not Path(key).expanduser().is_file():
        raise WeightsUnavailableError(
            f"weights file {key} does not exist: give --weights imagenet, none, or the path of a weights file"
        )
    return str(Path(key).expanduser().absolute())


def build(ref: BaseRef) -> Backbone:
    """Construct the backbone `ref` names.

    Raises:
        WeightsUnavailableError: ImageNet weights cannot be downloaded.
        BackboneError: the model file cannot be loaded safely or has no image input.
    """
    keras = import_keras()
    keras.utils.set_random_seed(ref.seed)
    if ref.spec is not None and ref.spec.embedded:
        return _build_embedded(keras, ref)
    if ref.spec is not None and ref.spec.builtin:
        model = classic.build(keras, ref.spec.constructor, ref.image_size)
        if ref.weights != "none":
            _load_weights_file(model, ref)
        return Backbone(ref, model)
    if ref.spec is not None:
        return Backbone(ref, _build_registered(keras, ref))
    return _build_file(keras, ref)


def _build_embedded(keras, ref: BaseRef) -> Backbone:
    """EfficientNet-Lite0 at the run's size; ImageNet weights from the converted package file."""
    full = efficientnet_lite.build(keras, ref.image_size, include_top=True)
    trunk = keras.Model(full.input, full.get_layer(efficientnet_lite.FEATURE_LAYER).output, name=ref.spec.name)
    if ref.weights == "imagenet":
        _load_converted(full, ref.path)
        return Backbone(ref, trunk, full)
    if ref.weights != "none":
        _load_weights_file(trunk, ref)
    return Backbone(ref, trunk)


def _load_weights_file(model, ref: BaseRef) -> None:
    try:
        model.load_weights(ref.weights)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot load weights {ref.weights} into {ref.label}: {exc}") from None


def _load_converted(model, source: Path) -> None:
    """Load the converted weights into `model`, converting on first use and again if the file is damaged."""
    models_dir, digest = default_models_dir(), file_digest(source)
    converted = efficientnet_lite.ensure_converted(models_dir, source, digest)
    try:
        model.load_weights(converted.path)
    except Exception:  # damaged since (a full disk, a hand edit): convert again, once
        converted = efficientnet_lite.ensure_converted(models_dir, source, digest, again=True)
        try:
            model.load_weights(converted.path)
        except Exception as exc:
            raise WeightsUnavailableError(f"cannot load the converted backbone {converted.path}: {exc}; "
                                          "delete it, or set $FINETUNE_MODELS_DIR to another folder") from None


def _build_registered(keras, ref: BaseRef):
    spec, size = ref.spec, ref.image_size
    inputs = keras.Input((size, size, 3), name="image")
    x = _preprocess(keras, spec.preprocess, inputs)
    constructor = getattr(keras.applications, spec.constructor)
    flat = constructor(include_top=False, weights=None, input_tensor=x, **spec.kwargs)
    model = keras.Model(inputs, flat.output, name=spec.name)
    if ref.weights != "none":
        # Pretrained weights load into the stock application (whose layer order
        # the weight files assume), then copy over layer by layer.
        source = _pretrained_application(keras, ref, constructor)
        _copy_weights(source, model)
    return model


def _pretrained_application(keras, ref: BaseRef, constructor):
    spec, size = ref.spec, ref.image_size
    try:
        return constructor(include_top=False, weights=ref.weights, input_shape=(size, size, 3), **spec.kwargs)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        message = str(exc)
        url = re.search(r"https?://\S+?\.h5", message)
        if ref.weights == "imagenet" and ("URL fetch failure" in message or url):
            wanted = url.group(0).rsplit("/", 1)[-1] if url else "the weights file"
            raise WeightsUnavailableError(
                f"cannot download ImageNet weights for {spec.name} (offline?): Keras wanted "
                f"{wanted}; put that file in ~/.keras/models/, or pass --weights PATH to a "
                "weights file, --base PATH to a .keras model file, or --weights none to start from scratch"
            ) from None
        raise WeightsUnavailableError(f"cannot load weights {ref.weights} into {spec.name}: {message}") from None


def _copy_weights(source, target) -> None:
    """Copy weights between two builds of one architecture, in layer order."""
    ours = [l for l in target.layers if l.weights and not l.name.startswith(PREPROCESS_PREFIX)]
    theirs = [l for l in source.layers if l.weights]
    if len(ours) != len(theirs):
        raise BackboneError(f"weights do not fit {target.name}: {len(theirs)} weighted layers, expected {len(ours)}")
    for mine, other in zip(ours, theirs):
        mine.set_weights(other.get_weights())


def _preprocess(keras, mode: str, x):
    """Append the backbone's pixel preprocessing as standard, non-trainable layers."""
    layers = keras.layers
    if mode == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, name=PREPROCESS_PREFIX + "scale")(x)
    if mode == "torch":
        x = layers.Rescaling(1 / 255.0, name=PREPROCESS_PREFIX + "scale")(x)
        return layers.Normalization(
            mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2],
            name=PREPROCESS_PREFIX + "normalize",
        )(x)
    if mode == "caffe":
        x = layers.Normalization(
            mean=[123.68, 116.779, 103.939], variance=[1.0, 1.0, 1.0], name=PREPROCESS_PREFIX + "center"
        )(x)
        flip = layers.Conv2D(3, 1, use_bias=False, trainable=False, name=PREPROCESS_PREFIX + "rgb_to_bgr")
        out = flip(x)
        flip.set_weights([_permutation_kernel()])
        return out
    return x


def _permutation_kernel():
    import numpy as np

    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for i in range(3):
        kernel[0, 0, i, 2 - i] = 1.0
    return kernel


def _build_file(keras, ref: BaseRef) -> Backbone:
    model = _load_file(keras, ref.path)
    classifier = None
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and last.get_config().get("activation") == "softmax":
        classifier = model
        model = keras.Model(model.input, last.input, name=model.name + "_features")
    fresh = ref.weights == "none"
    needs_size = any(d is None for d in model.input_shape[1:3])
    if fresh or needs_size:
        fixed = keras.models.clone_model(model, input_tensors=keras.Input((ref.image_size,) * 2 + (3,)))
        if not fresh:
            fixed.set_weights(model.get_weights())
        model = fixed
    if ref.weights not in ("imagenet", "none"):
        try:
            model.load_weights(ref.weights)
        except Exception as exc:
            raise WeightsUnavailableError(f"cannot load weights {ref.weights} into {ref.label}: {exc}") from None
    return Backbone(ref, model, None if fresh else classifier)


def _load_file(keras, path: Path):
    model = load_model_file(path)
    shape = getattr(model, "input_shape", None)
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[-1] != 3:
        raise BackboneError(f"model file {path} must take images (batch, H, W, 3); its input is {shape}")
    if len(model.output_shape) not in (2, 4):
        raise BackboneError(f"model file {path} must output features (batch, C) or maps (batch, h, w, C)")
    return model
