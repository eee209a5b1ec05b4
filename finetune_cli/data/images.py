"""Decoding one image file into 8-bit RGB, by content, with Pillow.

The same function serves the scan (is this file usable?) and the tf.data
pipeline (pixels for the network), so a file the scan accepts always decodes
the same way at training time. No TensorFlow import here.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own pixel cap (ScanConfig.max_pixels) is checked from the header before
# any decoding, so Pillow's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Pillow exceptions that mean "this file is broken", not "this code is broken".
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UnusableImage(Exception):
    """A file that cannot be used as an image; str(exc) is the reason shown to users."""


def read_image_file(path, max_bytes: int) -> bytes:
    """The bytes of an image file, refusing what cannot be one before reading it.

    Opened without blocking and checked on the open handle, so a FIFO named
    `.jpg` cannot hang the read and a link to `/dev/zero` cannot fill memory.

    Args:
        path: str, bytes or Path; links are followed.
        max_bytes: larger regular files are refused (see `ScanConfig.max_bytes`).

    Raises:
        UnusableImage: a FIFO, device, socket or folder, or a file over `max_bytes`.
        OSError: the file cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))
            kind = next((name for test, name in kinds if test(info.st_mode)), "a device")
            raise UnusableImage(f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise UnusableImage(f"too large: {info.st_size:,} bytes exceeds the cap of {max_bytes:,}")
        return handle.read(max_bytes + 1)


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes, refusing non-images and over-large images from the header.

    Args:
        data: the whole file's bytes.
        max_pixels: largest width * height accepted.

    Returns:
        A lazily-decoded Pillow image (nothing but the header read yet).

    Raises:
        UnusableImage: empty, not an image, or larger than `max_pixels`.
    """
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnusableImage(_describe_non_image(data)) from None
    except Image.DecompressionBombError:
        raise UnusableImage(f"too large: exceeds the cap of {max_pixels:,} pixels") from None
    except DECODE_ERRORS as exc:
        raise UnusableImage(f"corrupt or truncated image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UnusableImage(
            f"too large: {width}x{height} = {width * height:,} pixels "
            f"exceeds the cap of {max_pixels:,}"
        )
    return image


def _describe_non_image(data: bytes) -> str:
    """A reason for bytes Pillow does not recognise: HTML, text, or unknown."""
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image: an HTML page saved under an image name"
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "not an image: unrecognised file format"
    return "not an image: a text file"


def decode_rgb(
    data: bytes,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    size: int | None = None,
) -> np.ndarray:
    """Decode image bytes to an 8-bit RGB array, as the network will see it.

    EXIF orientation is applied; animated images give their first frame;
    grayscale, palette, CMYK and 16-bit images are converted; transparency is
    composited onto `background`.

    Args:
        data: the file's bytes (any format Pillow reads: JPEG, PNG, BMP, GIF,
            WebP, TIFF, ...).
        max_pixels: decoded-size cap, see `ScanConfig.max_pixels`.
        background: RGB, each 0-255, behind transparent pixels.
        size: if given, the image is resized (squashed) to `size` x `size`.

    Returns:
        uint8 array of shape (H, W, 3), values 0-255 (H = W = size if given).

    Raises:
        UnusableImage: with the reason the file cannot be used.
    """
    image = open_checked(data, max_pixels)
    try:
        if size is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12 MP photo
            # bound for 224 px decodes ~10x faster.
            image.draft("RGB", (size, size))
        image.load()
        rgb = to_rgb(image, background)
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except UnusableImage:
        raise
    except DECODE_ERRORS as exc:
        raise UnusableImage(f"corrupt or truncated image: {exc}") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any decoded Pillow image to upright 8-bit RGB (see `decode_rgb`)."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit single-channel image down to 8-bit grayscale."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    if image.mode == "F":
        low, top = float(values.min(initial=0)), float(values.max(initial=1)) or 1.0
        values = values - low
        top = (top - low) or 1.0
    scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
