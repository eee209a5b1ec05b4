"""The physical floor: the backbone's forward pass alone on N in-memory images.

Prints the seconds of the forward passes only (batches of 32, compiled), which
no extractor can beat. Usage: python benchmarks/forward_floor.py MODEL.keras N [SIZE]
"""

import sys
import time

import keras
import numpy as np
import tensorflow as tf

model = keras.saving.load_model(sys.argv[1])
n, size = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 224
images = tf.constant(np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype("float32"))
forward = tf.function(lambda x: tf.reduce_mean(model(x, training=False), axis=(1, 2)))
forward(images)  # trace once, not timed
start = time.perf_counter()
for _ in range(0, n, 32):
    forward(images).numpy()
print(f"FLOOR {time.perf_counter() - start:.3f}")
