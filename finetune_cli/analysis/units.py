"""Shared pieces of `patches` and `filters`: naming a layer and its units, picture grids."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from finetune_cli.errors import BackboneError, SettingsError
from finetune_cli.models.stages import select_layer


def layer_name(model, layer: str | int | None, base: str) -> str:
    """The layer `layer` names (stage index or layer name) in `model`; it must have a 4-D output.

    Raises:
        BackboneError: no such layer or stage (saying how to list them), or not a feature map.
    """
    if layer is None or str(layer).strip() == "":
        raise BackboneError(f"--layer is required: a stage index or layer name (see `finetune layers --base {base}`)")
    try:
        name = select_layer(model, layer)
    except BackboneError as exc:
        raise BackboneError(f"{exc}; list them with `finetune layers --base {base}`") from None
    shape = tuple(model.get_layer(name).output.shape)
    if len(shape) != 4:
        raise BackboneError(f"layer {name} outputs {shape}, not a feature map (batch, h, w, units); "
                            f"pick a convolutional layer (see `finetune layers --base {base}`)")
    return name


def pick_units(channels: int, count: int, unit_ids: Sequence[int] | None, ranking=None) -> list[int]:
    """The units to show: `unit_ids` as given (checked), else the first `count` of `ranking` (or 0, 1, ...).

    Raises:
        SettingsError: a unit index outside 0..channels-1, or a count below 1.
    """
    if unit_ids:
        bad = [u for u in unit_ids if not 0 <= int(u) < channels]
        if bad:
            raise SettingsError(f"unit {bad[0]} is out of range: this layer has units 0 to {channels - 1}")
        return [int(u) for u in unit_ids]
    if count < 1:
        raise SettingsError(f"--units must be at least 1. Received: --units {count}")
    order = list(ranking) if ranking is not None else list(range(channels))
    return [int(u) for u in order[: min(count, channels)]]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of a uint8 (h, w, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def resized(pixels: np.ndarray, side: int) -> np.ndarray:
    """A uint8 (h, w, 3) array resized to side x side (nearest for enlarging, so pixels stay visible)."""
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    method = Image.Resampling.NEAREST if image.width < side else Image.Resampling.BILINEAR
    return np.asarray(image.resize((side, side), method))


def grid(cells: Sequence[Sequence[np.ndarray | None]], side: int, gap: int = 2) -> np.ndarray:
    """Rows of uint8 (h, w, 3) pictures as one white-gapped uint8 picture, each cell side x side (None: blank)."""
    rows, cols = len(cells), max(len(r) for r in cells)
    canvas = np.full((rows * (side + gap) + gap, cols * (side + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                top, left = gap + i * (side + gap), gap + j * (side + gap)
                canvas[top : top + side, left : left + side] = resized(cell, side)
    return canvas
