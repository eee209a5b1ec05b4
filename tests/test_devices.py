"""`train --devices N`: MirroredStrategy steps equal single-device steps (2 logical CPU devices, in a child process).

The CPU is split with FINETUNE_CPU_DEVICES=2, which must act before TensorFlow
starts its runtime, so the multi-device runs happen in a fresh `python` child;
the single-device references run in this process (one CPU device).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from finetune_cli import api
from finetune_cli.cli import cli
from finetune_cli.config import TRAIN
from finetune_cli.errors import SettingsError

#: One engine, two trainers on the same start: one device, then 2 replicas. Groups with their own rates,
#: L2 regularisation, per-image weights and a last batch (2 images) that does not split evenly.
#: `workers` (a multi-worker strategy, or None) is made first: it must exist before TensorFlow's runtime starts.
ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from finetune_cli.runtime.keras import import_keras
    keras = import_keras()
    import tensorflow as tf
    workers = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None
    from finetune_cli.runtime import devices as distribute
    from finetune_cli.train.engine import Group, Trainer
    from finetune_cli.train.setup import cross_entropy

    def build():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        reg = keras.regularizers.l2(1e-2)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="classifier",
                                                      kernel_regularizer=reg)(x))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 50).astype("int32")
    w = rng.uniform(0.5, 2, 50).astype("float32")
    data = [(tf.constant(x[i:i + 16]), tf.constant(y[i:i + 16]), tf.constant(w[i:i + 16])) for i in range(0, 50, 16)]
    signature = [tf.TensorSpec((None, 8, 8, 3), tf.float32), tf.TensorSpec((None,), tf.int32),
                 tf.TensorSpec((None,), tf.float32)]

    def one_epoch(model):
        groups = [Group("head", model.get_layer("classifier").trainable_variables, 0.05),
                  Group("top", model.get_layer("conv").trainable_variables, 0.01)]
        trainer = Trainer(model, cross_entropy(model), groups, signature, optimizer=keras.optimizers.Adam)
        state = trainer.fit(data, lambda: {"val_loss": 1.0}, epochs=1)
        replicas = trainer.strategy.num_replicas_in_sync if trainer.strategy else 1
        return {"replicas": replicas, "loss": state.history[0]["loss"], "weights": [v.tolist() for v in model.get_weights()]}

    start = [v.tolist() for v in build().get_weights()]
    single = one_epoch(build())
    with workers.scope() if workers else distribute.scope(2):
        mirrored = one_epoch(build())
    json.dump({"start": start, "single": single, "mirrored": mirrored}, sys.stdout)
""")

RECIPE = """name = "no-randomness"
strategy = "full"
description = "every stage, no dropout, no augmentation"
unfreeze_stages = 0
top_stages = 2
learning_rate = 1e-2
top_lr_factor = 0.1
intermediate_lr_factor = 0.1
optimizer = "adam"
epochs = 2
batch_size = 8
dropout = 0.0
l2 = 1e-4
augmentation = "none"
patience = 3
"""


def child(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh `python` with FINETUNE_CPU_DEVICES=2 (and `env`), few threads; output captured."""
    full = {**os.environ, "FINETUNE_CPU_DEVICES": "2", "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2",
            "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=300)


def check_equal_epochs(result: dict) -> None:
    single, mirrored = result["single"], result["mirrored"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-6)
    moved = max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(single["weights"], result["start"]))
    assert moved > 1e-2  # the epoch trained: a difference of 1e-5 below is not "nothing happened"
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)


def test_one_epoch_on_two_replicas_equals_one_epoch_on_one_device():
    done = child(["-c", ENGINE_SCRIPT])
    assert done.returncode == 0, done.stderr[-3000:]
    check_equal_epochs(json.loads(done.stdout))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_the_engine_trains_under_multi_worker_mirrored_strategy():
    """Two local workers (TF_CONFIG, localhost ports), one CPU replica each: the engine's custom step works
    under MultiWorkerMirroredStrategy with Keras 3 (where Keras' own `fit` fails, keras#20585), both workers
    end with the same weights, and they equal one device's. `train` does not offer several machines."""
    hosts = [f"localhost:{port}" for port in free_ports(2)]
    config = lambda i: json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
    full = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = [subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**full, "TF_CONFIG": config(i)}) for i in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-3000:]
    results = [json.loads(out) for out, _ in outputs]
    for result in results:
        check_equal_epochs(result)
    assert results[0]["mirrored"]["weights"] == results[1]["mirrored"]["weights"]


def history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_devices_2_matches_one_device_end_to_end(shapes, tiny_base, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    common = [str(shapes), "--base", str(tiny_base), "--recipe", str(recipe), "--no-calibrate"]
    done = child(["-m", "finetune_cli", "train", *common, "--devices", "2", "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 devices (CPU:0, CPU:1)" in done.stderr
    one = api.train(str(shapes), str(tiny_base), out=tmp_path / "one", recipe=str(recipe),
                    settings=dataclasses.replace(TRAIN, calibrate=False))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["devices"] == 2 and "devices" not in one
    rows_one, rows_two = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy", "images"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), key


def test_more_devices_than_present_is_a_one_line_error(shapes, tiny_base, tmp_path):
    with pytest.raises(SettingsError, match=r"--devices 64 asks for more devices than present: 1 \(CPU:0\)"):
        api.train(str(shapes), str(tiny_base), out=tmp_path / "run", devices=64)
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(cli, ["train", str(shapes), "--base", str(tiny_base), "--devices", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == \
        "Error: Expected --devices to be a count >= 1 or 'all'. Received: devices='0'"


def test_a_bad_cpu_device_count_in_the_environment_is_a_one_line_error(tiny_base):
    done = child(["-m", "finetune_cli", "layers", "--base", str(tiny_base)], env={"FINETUNE_CPU_DEVICES": "two"})
    assert done.returncode == 2
    assert done.stderr.strip() == "Error: Expected FINETUNE_CPU_DEVICES to be a count >= 1. Received: 'two'"
