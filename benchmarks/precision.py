"""float32 vs mixed precision on this machine: the forward pass and a fine-tuning step.

Usage: python benchmarks/precision.py [--rounds N] [--batch B] [--size S] [--policies float32,mixed_bfloat16]
       python benchmarks/precision.py --one POLICY forward|step   (one measurement, internal)

EfficientNet-Lite0 from ../shared/backbones (or a Keras MobileNetV2 with random
weights when that file is absent). Each measurement is a fresh process that
builds the model under the dtype policy (by rewriting every layer's `dtype` in
the saved config), warms up, then times `--steps` batches of random pixels:
- forward: inference on (B, S, S, 3) batches, images/s;
- step: forward + backward + Adam on the top two stages (the rest frozen,
  BatchNorm in inference mode), images/s, and the mean absolute difference of
  the outputs against float32 on the same batch.
The policies alternate, `--rounds` times; medians, and ratios against float32
paired round by round. On a GPU, add mixed_float16 (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import BACKBONE


def build(policy: str):
    import keras

    if BACKBONE.exists():
        base = keras.saving.load_model(BACKBONE)
    else:
        base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))
    config = base.get_config()
    for layer in config["layers"]:
        if "dtype" in layer["config"]:
            layer["config"]["dtype"] = policy if layer["class_name"] != "InputLayer" else "float32"
    model = base.__class__.from_config(config)
    model.set_weights(base.get_weights())
    return model


def one(policy: str, what: str, batch: int, size: int, steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    model = build(policy)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    if what == "forward":
        run = tf.function(lambda x: model(x, training=False))
    else:
        for layer in model.layers[: int(len(model.layers) * 0.6)]:
            layer.trainable = False
        variables = model.trainable_variables
        optimizer = __import__("keras").optimizers.Adam(1e-4)
        optimizer.build(variables)

        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                out = tf.cast(model(x, training=False), tf.float32)
                loss = tf.reduce_mean(tf.square(out))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return out
    first = run(x)
    start = time.perf_counter()
    for _ in range(steps):
        run(x)
    seconds = time.perf_counter() - start
    reference = build("float32")(x, training=False).numpy() if policy != "float32" else first.numpy()
    return {"images_per_s": batch * steps / seconds,
            "mean_abs_diff": float(np.abs(np.asarray(first, dtype=np.float32) - reference).mean()) if what == "forward" else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "WHAT"))
    args = parser.parse_args()
    policies = args.policies.split(",")
    if args.one:
        print("RESULT", json.dumps(one(*args.one, args.batch, args.size, args.steps)))
        return
    for what in ("forward", "step"):
        rates = {p: [] for p in policies}
        diffs = {p: [] for p in policies}
        for _ in range(args.rounds):
            for policy in policies:
                cmd = [sys.executable, str(Path(__file__)), "--one", policy, what, "--batch", str(args.batch),
                       "--size", str(args.size), "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                result = json.loads(out.split("RESULT", 1)[1])
                rates[policy].append(result["images_per_s"])
                if policy != "float32" and result["mean_abs_diff"] is not None:
                    diffs[policy].append(result["mean_abs_diff"])
        print(f"{what}: float32 {statistics.median(rates['float32']):.1f} images/s", flush=True)
        for policy in policies[1:]:
            ratios = [b / f for f, b in zip(rates["float32"], rates[policy])]
            print(f"  {policy}: {statistics.median(rates[policy]):.1f} images/s; speed vs float32 median "
                  f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) over "
                  f"{args.rounds} pairs" + (f"; mean |difference| of the features {statistics.median(diffs[policy]):.4f}"
                                            if diffs[policy] else ""), flush=True)


if __name__ == "__main__":
    main()
