"""`finetune layers --base B`: a backbone's stage outputs.
"""

from __future__ import annotations

from finetune_cli.models.backbones import build, resolve
from finetune_cli.models.stages import find_stages


def layers(base: str, *, weights: str = "none", image_size: int | None = None) -> list[dict]:
    """Stage outputs of a backbone: index, layer name, output shape (h, w, c).

    Weights default to `none`: the architecture alone decides the stages.
    """
    backbone = build(resolve(base, weights, image_size))
    return [
        {"stage": s.index, "name": s.name, "shape": list(s.shape)}
        for s in find_stages(backbone.model)
    ]
