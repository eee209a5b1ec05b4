#!/usr/bin/env bash
# The GPU check, for a machine with one GPU (a few minutes): is mixed precision
# worth it there, for the forward pass and for a fine-tuning step?
# Run from the repository root with the project installed:  bash benchmarks/gpu_check.sh
# Without ../shared/backbones it measures a randomly initialised MobileNetV2 instead.
set -euo pipefail
cd "$(dirname "$0")"
python - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("GPUs:", gpus or "none (the figures below are the CPU's)")
PY
python precision.py --rounds 3 --batch 64 --steps 20 --policies float32,mixed_float16,mixed_bfloat16
