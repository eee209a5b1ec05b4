"""`finetune train` with `config.TrainConfig` fields changed, as one process (for benchmarks/prefix.py).

Usage: python benchmarks/train_with.py '{"cache_prefix": false}' TRAIN_DIR BASE OUT CACHE TEST_DIR
"""

import dataclasses
import json
import sys

from finetune_cli import api
from finetune_cli.config import TRAIN

changes, train, base, out, cache, test = sys.argv[1:7]
api.train(train, base, out=out, strategy="partial", similarity="similar", cache_dir=cache, test_dir=test,
          settings=dataclasses.replace(TRAIN, **json.loads(changes)))
