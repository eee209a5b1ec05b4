"""The library API: every command of the CLI is one function here, re-exported from its task module.

    from finetune_cli import api
    metrics = api.train("photos/", "efficientnet_lite0")

Each function is written once, in `finetune_cli.tasks.<command>`, with its signature and docstring; this
module only names them (`help(api.train)` shows the task's). Functions take plain arguments, return data
and never print; progress goes to an optional `Reporter` or callback; errors are `finetune_cli.errors`
types. The task modules load on first use, so importing `api` (and `finetune --help`) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: Public name -> the task module that defines it.
EXPORTS = {
    "inspect": "inspect", "plan": "plan", "bases": "bases", "layers": "layers",
    "extract_features": "extract", "cache_info": "cache", "cache_clear": "cache",
    "train": "train", "lr_find": "lr_find", "pretrain": "pretrain", "pretrain_config": "pretrain",
    "predict": "predict", "evaluate": "predict", "diagnose": "diagnose", "tune": "tune.linear", "distill": "distill",
    "export": "export", "report": "report", "audit": "audit", "patches": "patches", "filters": "filters",
    "explain": "explain", "attack": "attack", "compare": "compare", "suggest": "suggest",
    "curve": "curve",
}
__all__ = sorted(EXPORTS)

if TYPE_CHECKING:  # for readers and type checkers: the same names, imported eagerly
    from finetune_cli.tasks.attack import attack  # noqa: F401
    from finetune_cli.tasks.audit import audit  # noqa: F401
    from finetune_cli.tasks.bases import bases  # noqa: F401
    from finetune_cli.tasks.cache import cache_clear, cache_info  # noqa: F401
    from finetune_cli.tasks.compare import compare  # noqa: F401
    from finetune_cli.tasks.curve import curve  # noqa: F401
    from finetune_cli.tasks.diagnose import diagnose  # noqa: F401
    from finetune_cli.tasks.distill import distill  # noqa: F401
    from finetune_cli.tasks.explain import explain  # noqa: F401
    from finetune_cli.tasks.export import export  # noqa: F401
    from finetune_cli.tasks.extract import extract_features  # noqa: F401
    from finetune_cli.tasks.filters import filters  # noqa: F401
    from finetune_cli.tasks.inspect import inspect  # noqa: F401
    from finetune_cli.tasks.layers import layers  # noqa: F401
    from finetune_cli.tasks.lr_find import lr_find  # noqa: F401
    from finetune_cli.tasks.patches import patches  # noqa: F401
    from finetune_cli.tasks.plan import plan  # noqa: F401
    from finetune_cli.tasks.predict import evaluate, predict  # noqa: F401
    from finetune_cli.tasks.pretrain import pretrain, pretrain_config  # noqa: F401
    from finetune_cli.tasks.report import report  # noqa: F401
    from finetune_cli.tasks.suggest import suggest  # noqa: F401
    from finetune_cli.tasks.train import train  # noqa: F401
    from finetune_cli.tasks.tune.linear import tune  # noqa: F401


def __getattr__(name: str):
    """`api.NAME`: the task function, imported on first use and then kept as a module attribute."""
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"finetune_cli.tasks.{EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
