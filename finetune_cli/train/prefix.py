"""The frozen prefix: run the stages that do not train once per image and view, not once per epoch.

When a fine-tuning plan leaves the lower stages frozen (their weights and their
BatchNorm statistics never change), their output for a given image never
changes either. So:

1. the model is cut where the frozen part ends, at its narrowest single tensor
   (`split`): `prefix` (raw pixels -> activations) and `top` (activations ->
   probabilities), both sharing their layers with the whole model, so training
   `top` trains the whole model and `model.keras` stays raw pixels in;
2. the prefix runs once over every training image and each of its cached
   augmented views (`Plan.feature_views`: flip and crop, `augmented_view`),
   and over the validation images; the activations go into the feature cache
   under the images' content keys, as float16 by default (`TrainConfig`);
3. each epoch draws one (image, view) pair per image slot from the pool,
   shuffled, and the top trains on the cached activations: held in memory when
   they fit `TrainConfig.activation_budget_mb`, else read from the cache on
   disk batch by batch, so memory stays flat;
4. each training batch is augmented again in activation space
   (`TrainConfig.activation_shift`, `shift_maps`): a random translation of
   each feature map by up to that many cells, edges repeated, the
   activation-space twin of the image pipeline's random shifts (a conv
   prefix is translation-equivariant up to its padding), so the few cached
   views do not become a few memorised inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune_cli.config import TRAIN
from finetune_cli.features import FeatureCache
from finetune_cli.models.stages import find_stages
from finetune_cli.train.flips import view_ids
from finetune_cli.runtime.keras import import_keras


@dataclass
class Split:
    """A model cut in two at `layer`'s output: activations of shape `shape` feed `top`."""

    layer: str
    shape: tuple
    top: object


def split(model, plan, steps_back: int = TRAIN.max_steps_back) -> Split | None:
    """Cut `model` below the first stage that trains, or None when every stage trains or no cut is clean.

    Candidates are the outputs of the frozen prefix's last layers, walking back
    along a single-input chain; the smallest one that alone connects the two
    parts wins (a skip connection across a cut makes it unclean).
    """
    if not plan.train_stages or min(plan.train_stages) <= 1:
        return None
    keras = import_keras()
    end = find_stages(model)[min(plan.train_stages) - 2].name
    for layer in sorted(_chain(model, end, steps_back), key=lambda l: int(np.prod(l.output.shape[1:]))):
        try:
            top = keras.Model(layer.output, model.output, name="finetune_top")
        except Exception:  # a graph that needs another tensor from below the cut
            continue
        return Split(layer.name, tuple(layer.output.shape[1:]), top)
    return None


def _chain(model, name: str, steps: int) -> list:
    """`name`'s layer and the layers feeding it one by one (single input), at most `steps`."""
    layer, chain = model.get_layer(name), []
    for _ in range(steps):
        chain.append(layer)
        source = layer.input
        if isinstance(source, (list, tuple)) or not hasattr(source, "_keras_history"):
            break
        layer = source._keras_history.operation
        if type(layer).__name__ == "InputLayer":
            break
    return chain


def fill(ctx, cut: Split, views: int, dtype: str, flips: bool = True) -> None:
    """Cache the prefix's activations for the training images (view 0 and `views` augmented ones,
    `train.flips.view_ids`) and the validation images."""
    for k, view in enumerate(view_ids(views, flips)):
        ctx.reporter.on_phase(f"frozen stages: activations at '{cut.layer}' {cut.shape}, "
                              f"view {k} of {views} ({len(ctx.train.images)} images)")
        ctx.features(ctx.train, [cut.layer], view, pooling="none", dtype=dtype, keep=False)
    ctx.reporter.on_phase(f"frozen stages: activations of {len(ctx.val.images)} validation images")
    ctx.features(ctx.val, [cut.layer], 0, pooling="none", dtype=dtype, keep=False)


def datasets(ctx, cut: Split, views: int, labels: np.ndarray, weights: np.ndarray, batch_size: int,
             dtype: str, budget_mb: int, shift: int = 0, flips: bool = True):
    """(train batches, validation batches) of (activations float32 (B, *shape), labels int32, weights float32).

    Training: each epoch, `len(train)` (image, view) pairs drawn from the
    pool of all pairs without replacement, reshuffled each epoch with the
    run's seed; with `views` = 0 that is a plain shuffle, in the same order as
    the end-to-end image pipeline. Without `flips`, the views are crops alone. Validation: view 0, in order.
    """
    fill(ctx, cut, views, dtype, flips)
    size = int(np.prod(cut.shape)) * np.dtype(dtype).itemsize
    total_mb = size * (len(ctx.train.images) * (views + 1) + len(ctx.val.images)) / 1e6
    in_memory = total_mb <= budget_mb
    ctx.reporter.on_note(f"training the top stages on cached activations ({total_mb:,.0f} MB, "
                         + ("held in memory)" if in_memory else f"over the {budget_mb} MB budget: read from disk)"))
    train = _source(ctx, ctx.train, cut, view_ids(views, flips), dtype, in_memory)
    val = _source(ctx, ctx.val, cut, [0], dtype, in_memory)
    y_val = ctx.labels(ctx.val.images)
    n_train, n_val = len(ctx.train.images), len(ctx.val.images)
    return (_Batches(train, labels, weights, n_train, views, batch_size, ctx.seed, shift),
            _Batches(val, y_val, np.ones(n_val), n_val, 0, batch_size, None))


def _source(ctx, scan, cut: Split, views: list[int], dtype: str, in_memory: bool):
    """pair index (k * n + i) -> (activation (*shape) float32 of image i's view views[k], found bool)."""
    cache: FeatureCache = ctx.cache
    ref, n = ctx.backbone.ref, len(scan.images)
    spaces = [cache.namespace(ref, cut.layer, "none", v, dtype) for v in views]
    zeros = np.zeros(cut.shape, np.float32)

    def read(pair: int):
        vector = cache.get(spaces[pair // n], scan.images[pair % n].digest, dtype)
        return (zeros, False) if vector is None else (vector.reshape(cut.shape).astype(np.float32), True)

    if not in_memory:
        return read
    held = [read(pair) for pair in range(n * len(views))]
    stacked = np.stack([a.astype(dtype) for a, _ in held]) if held else np.zeros((0, *cut.shape), dtype)
    found = np.array([ok for _, ok in held])
    return lambda pair: (stacked[pair].astype(np.float32), bool(found[pair]))


class _Batches:
    """An iterable of (activations, labels, weights) batches, re-drawn each time it is iterated.

    A plain Python iterable, not tf.data: batches are gathers from memory or
    small cache reads, and tf.data's py-function threads stalled whole epochs
    here (16-19 s out of 40, in every other epoch, with the step itself 22 s).
    The order comes from tf.data's own seeded shuffle, so it is the image
    pipeline's order; a reader thread fetches the next batch during a step.
    """

    def __init__(self, source, labels, weights, n: int, views: int, batch_size: int, seed: int | None,
                 shift: int = 0):
        import tensorflow as tf

        self.source, self.labels, self.weights, self.n, self.batch_size = source, labels, weights, n, batch_size
        self.shift, self.rng = shift, np.random.default_rng(seed)
        pool = n * (views + 1)
        order = tf.data.Dataset.range(pool)
        if seed is not None:
            order = order.shuffle(pool, seed=seed, reshuffle_each_iteration=True)
        self.order = order.take(n)

    def _load(self, pairs: np.ndarray):
        import tensorflow as tf

        loaded = [self.source(int(p)) for p in pairs]
        ok = np.array([found for _, found in loaded], np.float32)
        i = pairs % self.n
        maps = np.stack([a for a, _ in loaded])
        if self.shift and maps.ndim == 4:
            maps = shift_maps(maps, self.shift, self.rng)
        return (tf.constant(maps), tf.constant(self.labels[i].astype(np.int32)),
                tf.constant((self.weights[i] * ok).astype(np.float32)))

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        pairs = np.fromiter(self.order.as_numpy_iterator(), np.int64, count=self.n)
        chunks = [pairs[s : s + self.batch_size] for s in range(0, len(pairs), self.batch_size)]
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(self._load, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                batch = pending.result()
                pending = reader.submit(self._load, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield batch


def shift_maps(maps: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Each map of `maps` (B, H, W, C) translated by its own random (dy, dx) in [-cells, cells], edges repeated.

    At EfficientNet-Lite0's `partial` cut (14 x 14) one cell is 16 pixels of a
    224 px image, so 1 cell is the image pipeline's light shift (up to 10 %).
    """
    b, h, w, _ = maps.shape
    padded = np.pad(maps, ((0, 0), (cells, cells), (cells, cells), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * cells + 1, (2, b))
    return np.stack([padded[k, dy[k] : dy[k] + h, dx[k] : dx[k] + w] for k in range(b)])
