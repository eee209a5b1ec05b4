"""Stage boundaries, found generically for any convolutional backbone.

A stage ends at the last layer before the spatial resolution drops; the last
stage ends at the model's last 4-D layer. Only stages holding learned
weights count, so a stem of preprocessing layers is not a stage. This works
the same for registry backbones and users' own model files, and is what
"features from stage k" and "unfreeze the top k stages" mean.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_cli.errors import BackboneError


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone.

    Attributes:
        index: 1 for the earliest stage, n for the last.
        name: the layer whose output is the stage's output.
        shape: that output's (h, w, channels).
        first, last: indices into `model.layers` of the stage's first and last layer.
    """

    index: int
    name: str
    shape: tuple[int, int, int]
    first: int
    last: int


def _spatial(layer):
    """(h, w, c) of a layer's single 4-D output, else None."""
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return None
    return tuple(shape[1:]) if len(shape) == 4 else None


def _learns(layer) -> bool:
    """True for a layer with learned weights (frozen or not); input normalisation does not count."""
    return bool(layer.weights) and not layer.name.startswith("preprocess_") and type(layer).__name__ != "Normalization"


def find_stages(model) -> list[Stage]:
    """The stages of `model` (a functional Keras model with a fixed input size)."""
    spans, start, current, last_4d = [], 0, None, None
    for i, layer in enumerate(model.layers):
        shape = _spatial(layer)
        if shape is None:
            continue
        if current is not None and shape[0] is not None and current[0] is not None and shape[0] < current[0]:
            spans.append((start, last_4d))
            start = last_4d + 1
        current, last_4d = shape, i
    if last_4d is None:
        raise BackboneError(f"{model.name} has no 4-D feature maps: it is not a convolutional image backbone")
    spans.append((start, last_4d))
    stages = []
    for first, last in spans:
        if any(_learns(l) for l in model.layers[first : last + 1]):
            layer = model.layers[last]
            stages.append(Stage(len(stages) + 1, layer.name, _spatial(layer), first, last))
    return stages


def select_layer(model, layer: str | int | None) -> str:
    """Name of the layer to take features from.

    Args:
        layer: None for the model's output; a stage index (1..n, or negative
            from the end, as an int or a digit string); or a layer name.

    Raises:
        BackboneError: no such stage or layer, listing the stages.
    """
    if layer is None or layer == "":
        return model.layers[-1].name
    stages = find_stages(model)
    text = str(layer).strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if 1 <= k <= len(stages) or -len(stages) <= k <= -1:
            return stages[k - 1 if k > 0 else k].name
        raise BackboneError(f"stage {k} does not exist: {model.name} has stages 1 to {len(stages)} (see `finetune layers`)")
    names = {l.name for l in model.layers}
    if text not in names:
        listed = ", ".join(s.name for s in stages)
        raise BackboneError(f"no layer named '{text}' in {model.name}; its stage outputs are: {listed}")
    return text
