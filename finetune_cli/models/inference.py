"""A model's probabilities on a scan of images (with test-time views), and the prediction table the local
and the Ray engine both write.
"""

from __future__ import annotations

import numpy as np

from finetune_cli.config import SCAN, ScanConfig
from finetune_cli.data.scan import Scan


def probabilities(model, scan: Scan, size: int, batch_size: int = 32, config: ScanConfig = SCAN,
                  tta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, k), ok (n,)) for the images of `scan`, in order.

    With `tta` K > 1 (test-time augmentation), the mean of the probabilities
    of views 0..K-1 of each image: view 0 is the image itself, the others the
    deterministic flips and crops of `data.pipeline.augmented_view` (the views
    the feature cache trains on). ok: the image was read in every view.
    """
    import tensorflow as tf

    from finetune_cli.data.pipeline import batched_images, image_spec

    forward = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), input_signature=[image_spec(size)])
    views, oks = [], []
    for view in range(tta):
        batches = [(forward(images).numpy(), ok.numpy())
                   for images, ok in batched_images(scan.paths(), size, batch_size, config, view=view)]
        views.append(np.concatenate([b[0] for b in batches]))
        oks.append(np.concatenate([b[1] for b in batches]))
    return (views[0] if tta == 1 else np.mean(views, axis=0, dtype=np.float64).astype(np.float32)), np.all(oks, 0)


def prediction_frame(paths: list[str], probs: np.ndarray, classes: list[str], top_k: int, tta: int):
    """The frame `predict` returns, from probabilities (n, k) of the images at `paths` (text, row order).

    Shared by the local and the Ray engine (`scale.ray_data`), so both write the same columns and rounding.
    """
    import pandas as pd

    order = np.argsort(-probs, axis=1)
    frame = pd.DataFrame({"path": list(paths)})
    frame["predicted"] = [classes[i] for i in order[:, 0]]
    frame["probability"] = probs[np.arange(len(probs)), order[:, 0]].round(6)
    for k in range(1, min(top_k, len(classes))):
        frame[f"top{k + 1}"] = [classes[i] for i in order[:, k]]
    for j, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, j].round(6)
    frame["tta"] = tta
    return frame
