"""`finetune bases`: the backbone registry.
"""

from __future__ import annotations

from finetune_cli.models import registry


def bases() -> list[dict]:
    """The backbone registry: name, input size, parameters (millions), feature dim, where the ImageNet
    weights come from (`installed`: a package, no download; `download`: keras.applications fetches them)."""
    return [
        {
            "name": s.name,
            "input_size": s.input_size,
            "params_m": s.params_m,
            "feature_dim": s.feature_dim,
            "preprocess": s.preprocess,
            "weights": "installed" if s.embedded else "none (random init)" if s.builtin else "download",
        }
        for s in map(registry.get, registry.names())
    ]
