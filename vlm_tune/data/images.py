"""Robust image loading: any file Pillow reads becomes an upright 8-bit RGB image.

Grayscale, bilevel, palette, RGBA/LA (composited on white), CMYK, 16-bit and float images are
converted to RGB; the EXIF orientation tag is applied. The file is closed before returning, so a
long run never accumulates open handles.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageLoadError(OSError):
    """An image that cannot be read or decoded; the message names the file (`image`) and the cause (`reason`)."""

    def __init__(self, image: str, reason: Optional[str] = None):
        super().__init__(image if reason is None else f"{image}: {reason}")
        self.image, self.reason = image, reason


class OutsideImageFolder(ValueError):
    """An annotation's image path that leads out of the set's image folder."""


def image_path(root: Path, entry: str, allow_outside: bool = False) -> str:
    """The absolute path of an annotation's image `entry` (relative to `root`, or absolute).

    `..` and absolute entries are resolved as written (symlinks inside the folder are the folder owner's
    choice and are followed when reading), and the result must lie inside `root`.

    Raises:
        OutsideImageFolder: the path leads out of `root` and `allow_outside` is False.
    """
    folder = os.path.abspath(root)
    path = os.path.abspath(os.path.join(folder, entry))
    if not allow_outside and os.path.commonpath([folder, path]) != folder:
        raise OutsideImageFolder(
            f"image path {entry!r} leads outside the image folder {folder} "
            f"(set data.<train|eval>.allow_outside_paths: true to read it)"
        )
    return path


def _decode_within(opened: Image.Image, max_pixels: Optional[int], label: str) -> None:
    """Decode `opened`, a JPEG over `max_pixels` at a reduced size (1/2 to 1/8, by the decoder itself).

    Raises:
        ImageLoadError: another format over `max_pixels`, or a JPEG that stays over it at 1/8.
    """
    width, height = opened.size
    if max_pixels is not None and width * height > max_pixels:
        if opened.format == "JPEG":  # asked for a quarter of the cap, the decoder returns at most the cap
            scale = (max_pixels / 4 / (width * height)) ** 0.5
            opened.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        if opened.size[0] * opened.size[1] > max_pixels:
            raise ImageLoadError(
                label,
                f"{width}x{height} pixels ({width * height / 1e6:.0f} MP) is over data.max_image_pixels "
                f"({max_pixels / 1e6:.0f} MP), and only JPEG is downscaled while decoding; shrink the file "
                f"or raise data.max_image_pixels",
            )
    opened.load()  # decode now: truncated or corrupt data fails here, inside the caller's try


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


def load_rgb(source: ImageSource, name: str | None = None, max_pixels: Optional[int] = None) -> Image.Image:
    """Load an image from a path, encoded bytes or a Pillow image as upright 8-bit RGB.

    Args:
        source: a file path, the encoded bytes of an image file, or a Pillow image.
        name: how to name the image in errors (default: the path).
        max_pixels: `data.max_image_pixels`: a bigger JPEG is downscaled while it is decoded, a bigger image
            of another format is refused before decoding (None: no cap).
    Returns:
        A fully decoded RGB image not tied to any open file.
    Raises:
        ImageLoadError: the file is missing, not an image, truncated, corrupt, or over `max_pixels`.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<in-memory image>")
    try:
        if isinstance(source, Image.Image):
            image = ImageOps.exif_transpose(source)
            return to_rgb(image).copy() if image is source else to_rgb(image)
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with opened:
            _decode_within(opened, max_pixels, label)
            upright = ImageOps.exif_transpose(opened)
            rgb = to_rgb(upright)
            return rgb.copy() if rgb is opened else rgb
    except FileNotFoundError:
        raise ImageLoadError(label, "image file not found") from None
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(label, f"unreadable image ({type(exc).__name__}: {exc})") from None


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
