"""Importing TensorFlow and Keras without their C++ start-up chatter.

TensorFlow's native logger prints oneDNN/CUDA notices to file descriptor 2
before Python can configure it (TF_CPP_MIN_LOG_LEVEL no longer silences
them), so stderr is pointed at /dev/null for the import alone. Import errors
still raise as usual.
"""

from __future__ import annotations

import os
import sys


def import_keras():
    """`keras`, imported (with TensorFlow) quietly; interactive logging off."""
    if "keras" not in sys.modules:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    keras = sys.modules["keras"]
    keras.config.disable_interactive_logging()
    sys.modules["tensorflow"].get_logger().setLevel("ERROR")
    return keras
