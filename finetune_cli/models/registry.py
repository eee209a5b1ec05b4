"""The backbone registry: one `BackboneSpec` per named Keras application.

Nothing here imports TensorFlow; `models.backbones` builds from these specs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from finetune_cli.errors import BackboneError

#: Pixel preprocessing a backbone expects, applied by layers inside the model:
#: tf: x / 127.5 - 1; torch: x / 255 then ImageNet mean/std; caffe: RGB->BGR
#: minus ImageNet channel means; none: the application normalises internally.
PREPROCESS_MODES = ("tf", "torch", "caffe", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    Attributes:
        name: the registry name users type (`--base vgg16`).
        constructor: attribute of `keras.applications` that builds it.
        input_size: native square input side in pixels (ImageNet training size).
        preprocess: one of `PREPROCESS_MODES`.
        feature_dim: channels of the final feature map = pooled feature length.
        params_m: parameters without the classifier, in millions.
        min_size: smallest input side the architecture accepts.
        kwargs: extra constructor arguments.
        embedded: True for a backbone built in `models/` whose ImageNet
            weights ship in an installed package (no download); `constructor`
            then names nothing in keras.applications.
        builtin: True for a small classic network built in `models/classic.py`
            (`constructor` names its builder there): random initialisation
            only, since no pretrained weights exist; `--weights imagenet`
            (the default) means a fresh, seeded initialisation for it.
    """

    name: str
    constructor: str
    input_size: int
    preprocess: str
    feature_dim: int
    params_m: float
    min_size: int = 32
    kwargs: dict = field(default_factory=dict)
    embedded: bool = False
    builtin: bool = False


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec; names are unique and lower-case."""
    if spec.preprocess not in PREPROCESS_MODES:
        raise ValueError(f"Expected preprocess in {PREPROCESS_MODES}. Received: {spec.preprocess!r}")
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> BackboneSpec:
    """The spec for `name` (case-insensitive).

    Raises:
        BackboneError: unknown name, listing the valid ones and the closest match.
    """
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise BackboneError(
        f"unknown backbone '{name}'.{hint} Valid names: {', '.join(names())}; "
        "or give the path of a .keras model file"
    )


def names() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def is_registered(name: str) -> bool:
    return name.strip().lower() in _REGISTRY


for _spec in (
    BackboneSpec("efficientnet_lite0", "EfficientNetLite0", 224, "none", 1280, 3.4, embedded=True),
    BackboneSpec("vgg16", "VGG16", 224, "caffe", 512, 14.7),
    BackboneSpec("vgg19", "VGG19", 224, "caffe", 512, 20.0),
    BackboneSpec("resnet50", "ResNet50", 224, "caffe", 2048, 23.6),
    BackboneSpec("resnet50v2", "ResNet50V2", 224, "tf", 2048, 23.6),
    BackboneSpec("mobilenetv2", "MobileNetV2", 224, "tf", 1280, 2.3),
    BackboneSpec("mobilenetv3small", "MobileNetV3Small", 224, "none", 576, 0.9),
    BackboneSpec("mobilenetv3large", "MobileNetV3Large", 224, "none", 960, 3.0),
    BackboneSpec("efficientnetb0", "EfficientNetB0", 224, "none", 1280, 4.0),
    BackboneSpec("efficientnetb1", "EfficientNetB1", 240, "none", 1280, 6.6),
    BackboneSpec("efficientnetb2", "EfficientNetB2", 260, "none", 1408, 7.8),
    BackboneSpec("efficientnetb3", "EfficientNetB3", 300, "none", 1536, 10.8),
    BackboneSpec("efficientnetv2b0", "EfficientNetV2B0", 224, "none", 1280, 5.9),
    BackboneSpec("densenet121", "DenseNet121", 224, "torch", 1024, 7.0),
    BackboneSpec("inceptionv3", "InceptionV3", 299, "tf", 2048, 21.8, min_size=75),
    BackboneSpec("xception", "Xception", 299, "tf", 2048, 20.9, min_size=71),
    BackboneSpec("convnexttiny", "ConvNeXtTiny", 224, "none", 768, 27.8),
    BackboneSpec("lenet", "lenet", 32, "none", 84, 0.06, min_size=28, builtin=True),
    BackboneSpec("alexnet", "alexnet", 64, "none", 64, 0.25, min_size=32, builtin=True),
    BackboneSpec("vgg", "vgg", 64, "none", 128, 0.29, min_size=32, builtin=True),
):
    register(_spec)
