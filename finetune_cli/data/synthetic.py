"""Deterministic synthetic image folders, for the sample data, tests and benchmarks.

Shapes (circle, square, triangle, ...) of random colour, size and position on a
noisy background: easy for a CNN, unlike ImageNet photos. No TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image, `size` x `size`, of `shape` on a noisy background."""
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 40, 3)) % 256)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, size // 12)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        draw.line((cx - r, cy, cx + r, cy), fill=colour, width=width)
        draw.line((cx, cy - r, cx, cy + r), fill=colour, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=width)
    else:
        raise ValueError(f"Expected one of {SHAPES}. Received: shape={shape!r}")
    return image


def make_shapes_folder(
    root: str | Path,
    classes: tuple[str, ...] = SHAPES[:3],
    per_class: int = 30,
    size: int = 64,
    seed: int = 0,
    unlabeled: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """Write `root/<class>/<class>_NNN.jpg` (and `root/unlabeled/` if asked).

    Returns:
        The root path. Same arguments give the same pixels.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    suffix = {"JPEG": ".jpg", "PNG": ".png"}[fmt]
    for shape in classes:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, size, rng).save(folder / f"{shape}_{i:03d}{suffix}", fmt, quality=90)
    if unlabeled:
        folder = root / "unlabeled"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(unlabeled):
            shape = classes[int(rng.integers(len(classes)))]
            draw_shape(shape, size, rng).save(folder / f"img_{i:03d}{suffix}", fmt, quality=90)
    return root
