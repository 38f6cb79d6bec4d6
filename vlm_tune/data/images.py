"""Robust image loading: any file Pillow reads becomes an upright 8-bit RGB image.

Grayscale, bilevel, palette, RGBA/LA (composited on white), CMYK, 16-bit and float images are
converted to RGB; the EXIF orientation tag is applied. The file is closed before returning, so a
long run never accumulates open handles.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageLoadError(OSError):
    """An image that cannot be read or decoded; the message names the file and the cause."""


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit 'L' by scaling, not clipping."""
    values = np.asarray(image)
    if values.dtype.kind == "f":  # float images: assume [0, 1] when small, else [0, 255]
        scale = 255.0 if float(values.max(initial=0.0)) <= 1.0 else 1.0
        eight_bit = np.clip(values * scale, 0, 255)
    else:  # integer images deeper than 8 bits: keep the top 8 of 16 bits
        eight_bit = np.clip(values.astype(np.int64) >> 8, 0, 255) if values.max(initial=0) > 255 else values
    return Image.fromarray(eight_bit.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB.

    Args:
        image: a loaded Pillow image.
    Returns:
        A new RGB image (transparent areas become white).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":  # palette: keep its transparency, if any, as alpha
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_bit_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: ImageSource, name: str | None = None) -> Image.Image:
    """Load an image from a path, encoded bytes or a Pillow image as upright 8-bit RGB.

    Args:
        source: a file path, the encoded bytes of an image file, or a Pillow image.
        name: how to name the image in errors (default: the path).
    Returns:
        A fully decoded RGB image not tied to any open file.
    Raises:
        ImageLoadError: the file is missing, not an image, truncated or corrupt.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<in-memory image>")
    try:
        if isinstance(source, Image.Image):
            image = ImageOps.exif_transpose(source)
            return to_rgb(image).copy() if image is source else to_rgb(image)
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened:
            opened.load()  # decode now: truncated or corrupt data fails here, inside the try
            upright = ImageOps.exif_transpose(opened)
            rgb = to_rgb(upright)
            return rgb.copy() if rgb is opened else rgb
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: image file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{label}: unreadable image ({type(exc).__name__}: {exc})") from None


def fit_within(image: Image.Image, longest_edge: int | None, max_pixels: int | None) -> Image.Image:
    """Downscale (never upscale) so the longest edge <= longest_edge and width*height <= max_pixels.

    Args:
        image: an RGB image.
        longest_edge: bound on max(width, height), or None.
        max_pixels: bound on width * height, or None.
    Returns:
        The image itself when it already fits, else a resized copy (aspect ratio kept).
    """
    width, height = image.size
    scale = 1.0
    if longest_edge is not None:
        scale = min(scale, longest_edge / max(width, height))
    if max_pixels is not None:
        scale = min(scale, (max_pixels / (width * height)) ** 0.5)
    if scale >= 1.0:
        return image
    new_size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)
