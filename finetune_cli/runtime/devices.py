"""Training on several devices: `train --devices N|all` with `tf.distribute.MirroredStrategy`.

    --devices -> device names (`resolve`) -> the strategy's scope around the whole run (`scope`)
              -> the engine (`engine.Trainer`) finds the strategy and runs each step on every replica

Inside the scope every variable the run creates (backbone, head, optimizer
slots) is mirrored: one copy per device, kept equal. The engine splits each
global batch into one contiguous slice per replica (sizes differ by at most
one image), each replica computes its slice's summed loss, the gradients are
summed across replicas and every copy takes the same optimizer step. The loss
is divided by the global batch's weight, so one epoch on N replicas is the
same computation as on one device with the same global batch, up to float
rounding (`tests/test_devices.py` checks it).

One device (the default) builds no strategy and enters no scope: the
single-device path is unchanged.

Devices: `all` is every GPU, or every logical CPU device when there is no GPU;
N is the first N of them. CPU-only machines have one logical CPU device unless
`FINETUNE_CPU_DEVICES=N` splits it (read once, before TensorFlow starts its
runtime, by `runtime.keras.import_keras`): for testing the multi-device path, not a
speed-up (the replicas share the same cores).

Several machines (`MultiWorkerMirroredStrategy`) are not supported: see the
README (with Keras 3 on TF 2.21 a two-worker custom-step run was tried).
"""

from __future__ import annotations

import contextlib

from finetune_cli.errors import SettingsError
from finetune_cli.runtime.keras import import_keras


def parse(devices: int | str) -> int | str:
    """`devices` as a count >= 1 or "all"; text accepted ("2", "all").

    Raises:
        SettingsError: anything else.
    """
    if isinstance(devices, str) and devices.strip().lower() == "all":
        return "all"
    try:
        count = None if isinstance(devices, (bool, float)) else int(devices)
    except (TypeError, ValueError):
        count = None
    if count is None or count < 1:
        raise SettingsError(f"Expected --devices to be a count >= 1 or 'all'. Received: devices={devices!r}")
    return count


def available() -> list[str]:
    """Names of the devices `--devices` picks from: the GPUs, or the logical CPU devices when there is none."""
    import_keras()  # first, so that FINETUNE_CPU_DEVICES applies before the device list starts the runtime
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def resolve(devices: int | str) -> list[str]:
    """The device names `devices` (see `parse`) asks for: all of `available()`, or its first N.

    Raises:
        SettingsError: not a count or "all", or more devices than present.
    """
    wanted, present = parse(devices), available()
    if wanted == "all":
        return present
    if wanted > len(present):
        raise SettingsError(f"--devices {wanted} asks for more devices than present: {len(present)} "
                            f"({', '.join(_short(d) for d in present)}). Received: devices={devices!r}")
    return present[:wanted]


def strategy_for(names: list[str]):
    """A `MirroredStrategy` over `names` (two or more), or None for one device."""
    if len(names) < 2:
        return None
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(names)


@contextlib.contextmanager
def scope(devices: int | str = 1, note=None):
    """Run the body in the scope of a `MirroredStrategy` over `resolve(devices)`; nothing for one device.

    Args:
        note: called with one line saying which devices train (several only).

    Raises:
        SettingsError: see `resolve`; raised before the body runs.
    """
    if parse(devices) == 1:
        yield None
        return
    strategy = strategy_for(resolve(devices))
    if strategy is None:
        yield None
        return
    if note is not None:
        names = ", ".join(_short(d) for d in strategy.extended.worker_devices)
        note(f"{strategy.num_replicas_in_sync} devices ({names}): each fine-tuning step splits the batch "
             "across them (MirroredStrategy)")
    with strategy.scope():
        yield strategy


def active():
    """The strategy whose scope the caller is in, or None outside any (the default strategy)."""
    import tensorflow as tf

    return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None


def replicas() -> int:
    """How many replicas a step runs on here: 1 outside any strategy's scope."""
    strategy = active()
    return strategy.num_replicas_in_sync if strategy is not None else 1


def _short(name: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' -> 'CPU:1'."""
    return name.rsplit("device:", 1)[-1]
