"""finetune: transfer learning for a folder of labelled images.

The pipeline reads top to bottom, one plain value handed to the next step:

    data.scan -> data.profile -> strategy.decide -> models -> train -> runs

`finetune_cli.api` is the library entry point; `finetune_cli.cli` is a thin
Click layer over it.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features, CUDA probing) is
# noise to users; set before any module imports TensorFlow.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
