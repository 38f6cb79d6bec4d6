"""Every image mode becomes upright 8-bit RGB; broken files raise ImageLoadError naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_fixtures import near
from PIL import Image

from vlm_tune.data.images import ImageLoadError, fit_within, load_rgb


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    Image.new("L", (8, 8), 90).save(tmp_path / "gray.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bits.png")
    assert load_rgb(tmp_path / "gray.png").getpixel((1, 1)) == (90, 90, 90)
    assert load_rgb(tmp_path / "bits.png").getpixel((1, 1)) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    image.save(tmp_path / "rgba.png")
    loaded = load_rgb(tmp_path / "rgba.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((4, 4)) == (255, 0, 0)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_rgb(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (0, 255, 0) and loaded.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert near(load_rgb(tmp_path / "cmyk.jpg").getpixel((2, 2)), (255, 0, 0))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert load_rgb(tmp_path / "g16.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_rgb(tmp_path / "rotated.jpg")
    assert loaded.size == (10, 20)
    assert near(loaded.getpixel((5, 2)), (255, 0, 0)) and near(loaded.getpixel((5, 17)), (0, 0, 255))


def test_bytes_and_pil_inputs(tmp_path):
    buffer = io.BytesIO()
    Image.new("LA", (4, 4), (70, 255)).save(buffer, format="PNG")
    assert load_rgb(buffer.getvalue()).getpixel((0, 0)) == (70, 70, 70)
    source = Image.new("RGB", (4, 4), (1, 2, 3))
    copy = load_rgb(source)
    assert copy is not source and copy.getpixel((0, 0)) == (1, 2, 3)


def test_broken_files_raise_naming_the_file(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image at all")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[:200])
    for name in ("text.jpg", "truncated.jpg"):
        with pytest.raises(ImageLoadError, match=f"{name}: unreadable image"):
            load_rgb(tmp_path / name)
    with pytest.raises(ImageLoadError, match="nowhere.png: image file not found"):
        load_rgb(tmp_path / "nowhere.png")


def test_fit_within_only_downscales():
    image = Image.new("RGB", (200, 100))
    assert fit_within(image, 50, None).size == (50, 25)
    assert fit_within(image, None, 5000).size == (100, 50)
    assert fit_within(image, 400, 10**6) is image
