"""Shared fixtures: tiny generated image folders, written fresh into tmp_path."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image

from finetune_cli.data.synthetic import make_shapes_folder
from finetune_cli.progress import Reporter


class Recorder(Reporter):
    """A reporter that records what it is told, and can interrupt at an epoch (like Ctrl-C)."""

    def __init__(self, stop_at_epoch: int | None = None):
        self.stop_at_epoch, self.notes, self.phases, self.epochs = stop_at_epoch, [], [], []

    def on_note(self, text):
        self.notes.append(text)

    def on_phase(self, name):
        self.phases.append(name)

    def on_epoch(self, logs, epochs):
        self.epochs.append(dict(logs))
        if logs["epoch"] == self.stop_at_epoch:
            raise KeyboardInterrupt


def jpeg_bytes(size=(40, 30), colour=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", **save)
    return buffer.getvalue()


@pytest.fixture
def shapes(tmp_path):
    """3 classes x 8 JPEGs, 32 px."""
    return make_shapes_folder(tmp_path / "shapes", per_class=8, size=32, seed=1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One converted-backbone folder for the session: the embedded default is converted at most once."""
    return tmp_path_factory.mktemp("converted-backbones")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, models_dir):
    """Every test gets its own feature cache folder; converted backbones stay out of the user's cache."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "feature-cache"))
    monkeypatch.setenv("FINETUNE_MODELS_DIR", str(models_dir))


@pytest.fixture
def messy(tmp_path):
    """A labelled folder holding every file fault of RELIABILITY.md.

    Returns (root, expected) where expected maps relative path -> "keep" or
    a word the skip reason must contain.
    """
    root = tmp_path / "messy"
    good, odd = root / "good", root / "odd ünïcode"
    good.mkdir(parents=True)
    odd.mkdir()
    expected = {}

    def put(rel, data, outcome):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = outcome

    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        put(f"good/photo {i}.jpg", buffer.getvalue(), "keep")
    whole = jpeg_bytes((64, 64))
    put("good/truncated.jpg", whole[: len(whole) // 2], "truncated")
    put("good/empty.jpg", b"", "empty")
    put("good/notes.jpg", b"just some text\nnot a picture\n", "text")
    put("good/page.png", b"<!DOCTYPE html><html><body>404</body></html>", "HTML")
    put("good/random.jpg", rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "not an image")
    put("good/readme.txt", b"hello", "text")

    def encoded(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        return buffer.getvalue()

    put("odd ünïcode/png named.jpg", encoded(Image.new("RGB", (20, 20), "blue"), "PNG"), "keep")
    put("odd ünïcode/cmyk.jpg", encoded(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "keep")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    put("odd ünïcode/rgba.png", encoded(rgba, "PNG"), "keep")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    put("odd ünïcode/palette.png", encoded(palette, "PNG", transparency=0), "keep")
    deep = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    put("odd ünïcode/16bit.png", encoded(deep, "PNG"), "keep")
    put("odd ünïcode/gray.bmp", encoded(Image.new("L", (20, 20), 128), "BMP"), "keep")
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    put("odd ünïcode/anim.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "keep")
    put("odd ünïcode/pic.webp", encoded(Image.new("RGB", (20, 20), "green"), "WEBP"), "keep")
    put("odd ünïcode/pic.tiff", encoded(Image.new("RGB", (20, 20), "green"), "TIFF"), "keep")
    put("odd ünïcode/nested/deeper.jpg", jpeg_bytes((24, 24), (1, 2, 3)), "keep")
    put("odd ünïcode/rotated.jpg", _exif_rotated(), "keep")
    put("odd ünïcode/huge.png", _huge_png_header(), "too large")
    # litter: never counted, never reported
    (good / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (good / "._photo 0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (good / ".ipynb_checkpoints").mkdir()
    (good / ".ipynb_checkpoints" / "x.jpg").write_bytes(whole)
    return root, expected


def _exif_rotated() -> bytes:
    """A 40 wide x 20 tall JPEG whose EXIF says 'rotate 90': upright it is 20 x 40."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def _huge_png_header() -> bytes:
    """A valid PNG header declaring 100,000 x 100,000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def save_tiny_backbone(path, size=None, lam=False, stages=3):
    """A real conv backbone file on raw [0, 255] pixels: (B, S, S, 3) -> (B, S/4, S/4, 16) with 3 stages,
    (B, S/8, S/8, 16) with 4."""
    from finetune_cli.runtime.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(7)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    if lam:
        x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="s1_conv")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="s2_conv")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="s3_conv")(x)
    if stages == 4:
        x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="s4_conv")(x)
    model = keras.Model(inputs, x, name="tiny")
    model.save(path)
    return path


@pytest.fixture
def tiny_base(tmp_path):
    return save_tiny_backbone(tmp_path / "tiny.keras")
