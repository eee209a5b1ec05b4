"""Importing TensorFlow and Keras without their C++ start-up chatter.

TensorFlow's native logger prints oneDNN/CUDA notices to file descriptor 2
before Python can configure it (TF_CPP_MIN_LOG_LEVEL no longer silences
them), so stderr is pointed at /dev/null for the import alone. Import errors
still raise as usual.

`FINETUNE_CPU_DEVICES=N` in the environment splits the CPU into N logical
devices right after TensorFlow's import, before anything starts its runtime
(`runtime.devices`: the multi-device path on a CPU-only machine, for tests).
"""

from __future__ import annotations

import os
import sys

from finetune_cli.errors import SettingsError

#: The environment variable that splits the CPU into N logical devices (tests, CPU-only machines).
CPU_DEVICES_ENV = "FINETUNE_CPU_DEVICES"


def import_keras():
    """`keras`, imported (with TensorFlow) quietly; interactive logging off."""
    if "keras" not in sys.modules:
        cpus = _cpu_devices()
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            import tensorflow  # noqa: F401

            if cpus:
                split_cpu(cpus)
            import keras  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    keras = sys.modules["keras"]
    keras.config.disable_interactive_logging()
    sys.modules["tensorflow"].get_logger().setLevel("ERROR")
    return keras


def _cpu_devices() -> int | None:
    """FINETUNE_CPU_DEVICES (see the module docstring) as a count, or None when unset; checked before the import.

    Raises:
        SettingsError: not a count >= 1.
    """
    value = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"Expected {CPU_DEVICES_ENV} to be a count >= 1. Received: {value!r}")
    return int(value)


def split_cpu(count: int) -> None:
    """Split the (first) CPU into `count` >= 1 logical devices; before TensorFlow starts its runtime.

    Raises:
        SettingsError: TensorFlow's runtime already started.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise SettingsError(f"{CPU_DEVICES_ENV} must be set before TensorFlow starts (set it in the environment "
                            "of the process)") from None
