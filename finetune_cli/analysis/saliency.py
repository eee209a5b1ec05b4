"""Heat maps of what a classifier looks at: occlusion, Grad-CAM, and the randomised-head sanity check.

Every function takes a Keras model on raw RGB (B, S, S, 3) in [0, 255] that
outputs probabilities (B, k), the contract of `Run.model`, and returns plain
numpy arrays. Maps are (n, S, S) float32, larger where the pixels matter more.

Grad-CAM needs the last spatial (4-D) activation. When it sits inside a
nested model (a backbone called as a layer), asking the inner layer for its
output on the outer graph fails with "Graph disconnected". `tapped_model`
instead builds one model per level: the outer layers up to the nested model,
the nested model tapped at the inner layer, and the outer layers after it,
chained in one call so a single GradientTape sees the whole path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune_cli.config import EXPLAIN, ExplainConfig
from finetune_cli.errors import SettingsError
from finetune_cli.runtime.keras import import_keras


def call(model, images):
    """`model` on a batch (B, S, S, 3) at inference, the batch wrapped as the model was built (a saved model
    may declare a list of one input, and Keras warns when it gets a bare tensor)."""
    try:
        listed = isinstance(model.input, (list, tuple))
    except (AttributeError, ValueError):  # a Sequential never called has no `input` yet: it takes a tensor
        listed = False
    return model([images] if listed else images, training=False)


# ---------------------------------------------------------------- occlusion

def occlusion_windows(side: int, config: ExplainConfig = EXPLAIN) -> tuple[int, list[int]]:
    """(patch side, top-left offsets along one axis): a patch of `patch_fraction` of the side moved by
    `stride_fraction` of it (both at least 1 px); the last offset touches the far edge."""
    patch = max(1, round(side * config.patch_fraction))
    stride = max(1, round(side * config.stride_fraction))
    offsets = list(range(0, side - patch + 1, stride))
    if offsets[-1] != side - patch:
        offsets.append(side - patch)
    return patch, offsets


def occlusion(model, images: np.ndarray, targets: np.ndarray, config: ExplainConfig = EXPLAIN) -> np.ndarray:
    """Occlusion maps (Zeiler & Fergus 2014): (n, S, S), the mean fall of the target class's log-probability
    when a grey patch covers each pixel (negative: covering it raised the class).

    Args:
        images: (n, S, S, 3) in [0, 255]. targets: (n,) class indices.
    All occluded copies of an image go through the model in batches of `config.batch_size`.
    """
    import tensorflow as tf

    side = images.shape[1]
    patch, offsets = occlusion_windows(side, config)
    windows = [(top, left) for top in offsets for left in offsets]
    forward = tf.function(lambda x: call(model, x), reduce_retracing=True)
    maps = np.zeros(images.shape[:3], np.float32)
    for i, (image, target) in enumerate(zip(images.astype(np.float32), targets)):
        copies = np.repeat(image[None], len(windows) + 1, axis=0)
        for j, (top, left) in enumerate(windows, start=1):
            copies[j, top:top + patch, left:left + patch] = config.patch_value
        probs = np.concatenate([forward(copies[s:s + config.batch_size]).numpy()
                                for s in range(0, len(copies), config.batch_size)])
        logp = np.log(np.maximum(probs[:, target].astype(np.float64), 1e-30))
        total, count = np.zeros((side, side)), np.zeros((side, side))
        for (top, left), drop in zip(windows, logp[0] - logp[1:]):
            total[top:top + patch, left:left + patch] += drop
            count[top:top + patch, left:left + patch] += 1
        maps[i] = total / np.maximum(count, 1)
    return maps


# ---------------------------------------------------------------- Grad-CAM

def _is_model(layer) -> bool:
    return hasattr(layer, "layers") and hasattr(layer, "inputs")


def spatial_path(model) -> list:
    """The layers leading to the last spatial (4-D output) layer: [outer, nested..., target].

    A nested model whose own output is 4-D is the target itself (its output is
    a tensor of the outer graph); one that pools or classifies inside is entered.
    Returns [] when the model has no spatial layer (e.g. a dense net on pixels).
    """
    for layer in reversed(model.layers):
        if _is_model(layer) and len(layer.output.shape) != 4:
            inner = spatial_path(layer)
            if inner:
                return [layer] + inner
        elif len(getattr(layer, "output", np.zeros(0)).shape) == 4 and not _is_input(layer):
            return [layer]
    return []


def _is_input(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def _call_node(model, layer):
    """The node where `layer` is called inside `model`'s graph (a nested model may have several)."""
    for node in layer._inbound_nodes:
        if all(any(t is o for o in _graph_tensors(model)) for t in node.output_tensors):
            return node
    raise SettingsError(f"Grad-CAM cannot follow the layer {layer.name} through {model.name}: use --method occlusion")


def _graph_tensors(model) -> list:
    """Every tensor of `model`'s graph (a Sequential keeps its graph in a Functional of its own)."""
    graph = getattr(model, "_functional", None) or model
    tensors = []
    for node_list in graph._nodes_by_depth.values():
        for node in node_list:
            tensors += list(node.output_tensors)
    return tensors


def tapped_model(model, path: list):
    """A callable images -> (activation (B, h, w, c) of `path[-1]`, probabilities (B, k)), on the trained layers.

    Raises:
        SettingsError: a graph that cannot be cut at the nested model (a second path around it).
    """
    keras = import_keras()
    if not path:
        raise SettingsError(f"{model.name} has no spatial (4-D) layer for Grad-CAM: use --method occlusion")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    node = _call_node(model, path[0])
    if len(path) == 1:
        return keras.Model(inputs, [node.output_tensors[0], model.outputs[0]])
    inner = tapped_model(path[0], path[1:])
    try:
        before = keras.Model(inputs, node.input_tensors[0] if len(node.input_tensors) == 1 else node.input_tensors)
        after = keras.Model(node.output_tensors[0], model.outputs[0])
    except ValueError as exc:
        raise SettingsError(f"Grad-CAM cannot cut {model.name} at {path[0].name} ({str(exc)[:120]}): "
                            "use --method occlusion") from None

    def chained(images, training=False):
        activation, inner_out = inner(before(images, training=training), training=training)
        return activation, after(inner_out, training=training)

    return chained


def gradcam(model, images: np.ndarray, targets: np.ndarray, batch_size: int = EXPLAIN.batch_size) -> np.ndarray:
    """Grad-CAM maps (Selvaraju et al. 2017): (n, S, S) in [0, 1] (1: the image's peak; all 0 when no
    channel speaks for the class), upsampled bilinearly from the last spatial layer.

    Args:
        images: (n, S, S, 3) in [0, 255]. targets: (n,) class indices.
    The class score is its log-probability, so a confident prediction still has gradients.
    """
    import tensorflow as tf

    tapped = tapped_model(model, spatial_path(model))
    side = images.shape[1]

    # eager: tracing the tape through a large backbone costs more than the few batches it would save
    def maps_of(x, target):
        with tf.GradientTape() as tape:
            activation, probs = tapped(x, training=False)
            score = tf.math.log(tf.maximum(tf.gather(probs, target, batch_dims=1), 1e-30))
        grads = tape.gradient(score, activation)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1, keepdims=True))
        return tf.image.resize(cam, (side, side), method="bilinear")[..., 0]

    out = [maps_of(tf.constant(images[s:s + batch_size], tf.float32),
                   tf.constant(targets[s:s + batch_size], tf.int32)).numpy()
           for s in range(0, len(images), batch_size)]
    maps = np.concatenate(out).astype(np.float32)
    peak = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0).astype(np.float32)


METHODS = {"occlusion": occlusion, "gradcam": gradcam}


def heat_maps(model, images: np.ndarray, targets: np.ndarray, method: str,
              config: ExplainConfig = EXPLAIN) -> np.ndarray:
    """(n, S, S) maps of `method` (occlusion or gradcam).

    Raises:
        SettingsError: an unknown method.
    """
    if method not in METHODS:
        raise SettingsError(f"--method must be one of {', '.join(METHODS)}. Received: method={method!r}")
    if method == "occlusion":
        return occlusion(model, images, targets, config)
    return gradcam(model, images, targets, config.batch_size)


# ---------------------------------------------------------------- sanity check

@dataclass(frozen=True)
class Sanity:
    """The randomised-head check of one image (Adebayo et al. 2018).

    Attributes:
        rho: Spearman rank correlation of the trained and randomised maps, -1..1 (nan: a constant map).
        flagged: rho above the threshold: the map barely depends on the head's weights, so it does
            not explain this model's decision; or the trained map is flat.
    """

    rho: float
    flagged: bool


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of one shape (nan when either is constant)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def verdict(trained: np.ndarray, randomised: np.ndarray, threshold: float = EXPLAIN.sanity_threshold) -> Sanity:
    """Sanity of one map from its rank correlation with the randomised-head map: flagged above `threshold`,
    or when the trained map is flat (it shows nothing); a flat randomised map (nan) means the map changed."""
    rho = spearman(trained, randomised)
    flat = np.ptp(trained) == 0
    return Sanity(rho, bool(flat or (not np.isnan(rho) and rho > threshold)))


def head_layers(model) -> list:
    """The layers with weights after the last spatial layer, at every nesting level (the head);
    without a spatial layer, the last layer with weights."""
    path, found, level = spatial_path(model), [], model
    for step in path:
        names = [layer.name for layer in level.layers]
        found += [layer for layer in level.layers[names.index(step.name) + 1:] if layer.weights]
        level = step
    if not found:
        found = [layer for layer in model.layers if layer.weights][-1:]
    return found


def randomised_head(model, seed: int = EXPLAIN.sanity_seed):
    """A clone of `model` with the trained weights, except the head's: drawn anew (normal, each tensor's
    own standard deviation, or 0.05 for a constant one). The model itself is untouched."""
    keras = import_keras()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    for layer in head_layers(clone):
        fresh = [rng.normal(0.0, float(np.std(w)) or 0.05, w.shape).astype(w.dtype) for w in layer.get_weights()]
        layer.set_weights(fresh)
    return clone


def sanity(model, images: np.ndarray, targets: np.ndarray, maps: np.ndarray, method: str,
           config: ExplainConfig = EXPLAIN) -> list[Sanity]:
    """Each image's map recomputed on `randomised_head(model)`, compared with `maps` (n, S, S)."""
    random_maps = heat_maps(randomised_head(model, config.sanity_seed), images, targets, method, config)
    return [verdict(a, b, config.sanity_threshold) for a, b in zip(maps, random_maps)]
