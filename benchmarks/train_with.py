"""`finetune train` with `config.TrainConfig` (and `config.LinearConfig`) fields changed, as one process.

Usage: python benchmarks/train_with.py CHANGES TRAIN_DIR BASE OUT CACHE TEST_DIR

CHANGES is a JSON object of TrainConfig fields, plus optionally "linear" (an
object of LinearConfig fields, e.g. the old 3-point C grid), "scan" (an
object of ScanConfig fields, e.g. imbalance_warn_ratio), "strategy"
(default "partial", as benchmarks/prefix.py uses it), "similarity"
(default "similar"), "val_dir" (a labelled folder to validate on instead of a split),
"seed" (default 0), "lr" (`train --lr`: a head rate or "auto") and "recipe" (`train --recipe`: a shipped
name or a .toml file).
"""

import dataclasses
import json
import sys

from finetune_cli import api, config

changes, train, base, out, cache, test = sys.argv[1:7]
changes = json.loads(changes)
linear = changes.pop("linear", None)
if linear:  # read at call time by the linear head (`train.linear.fit_source`)
    config.LINEAR = dataclasses.replace(config.LINEAR, **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in linear.items()})
scan = dataclasses.replace(config.SCAN, **changes.pop("scan", {}))
strategy, similarity = changes.pop("strategy", "partial"), changes.pop("similarity", "similar")
val_dir, seed, lr = changes.pop("val_dir", None), changes.pop("seed", 0), changes.pop("lr", None)
recipe = changes.pop("recipe", None)
api.train(train, base, out=out, strategy=strategy, similarity=similarity, cache_dir=cache, test_dir=test,
          val_dir=val_dir, seed=seed, lr=lr, recipe=recipe, config=scan, settings=dataclasses.replace(config.TRAIN, **changes))
