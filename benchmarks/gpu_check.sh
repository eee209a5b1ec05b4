#!/usr/bin/env bash
# The GPU check, for a machine with one GPU (a few minutes): is mixed precision
# worth it there, for the forward pass and for a fine-tuning step? And does
# `train --devices all` (MirroredStrategy over every GPU) train as one device does?
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

# `train --devices all` (every GPU under MirroredStrategy; with one GPU that is the plain path) against
# `--devices 1` on the same small folder: the epochs' losses must agree, and the seconds show the speed-up.
python - <<'PY'
import dataclasses, tempfile
from pathlib import Path
from finetune_cli import api
from finetune_cli.config import TRAIN
from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.runtime.devices import resolve

work = Path(tempfile.mkdtemp(prefix="devices-"))
folder = make_shapes_folder(work / "shapes", per_class=40, size=96, seed=0)
recipe = work / "recipe.toml"
recipe.write_text('name = "devices"\nstrategy = "full"\ndescription = "no randomness"\nunfreeze_stages = 0\n'
                  'top_stages = 2\nlearning_rate = 1e-3\ntop_lr_factor = 0.1\nintermediate_lr_factor = 0.01\n'
                  'optimizer = "adam"\nepochs = 3\nbatch_size = 64\ndropout = 0.0\nl2 = 1e-4\n'
                  'augmentation = "none"\npatience = 3\n')
settings = dataclasses.replace(TRAIN, calibrate=False, keep_better=False)
print("devices all:", resolve("all"))
for devices in ("all", 1):
    metrics = api.train(str(folder), "efficientnet_lite0", out=work / f"run-{devices}", recipe=str(recipe),
                        image_size=96, settings=settings, devices=devices)
    history = (work / f"run-{devices}" / "history.csv").read_text().splitlines()
    print(f"--devices {devices}: replicas {metrics.get('devices', 1)}, fine-tuning "
          f"{metrics['fine_tuning_s']['epochs']:.2f} s;", *history[1:], sep="\n  ")
PY
