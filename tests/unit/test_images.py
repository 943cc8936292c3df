"""Input images decode to what they show: 16-bit grayscale scaled (not clipped white), EXIF
orientation applied, and cached by the memory they hold. No torch needed but for the cache's test."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from common.errors import ImageError
from common.images import decode, decoded_bytes

pytestmark = pytest.mark.unit


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_white():
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = png(gradient)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # what Pillow opens such a file as
    pixels = np.asarray(decode("gray16.png", data))
    assert pixels.shape == (64, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_allclose(pixels[..., 0], np.rint(gradient / 257.0), atol=1)
    assert (pixels == 255).mean() < 0.01  # Pillow's convert("RGB") alone made 99.6 % of them 255


def test_exif_orientation_is_applied():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone held upright
    out = io.BytesIO()
    Image.fromarray(wide).save(out, format="JPEG", exif=exif, quality=95)
    shown = decode("phone.jpg", out.getvalue())
    assert shown.size == (20, 40)  # upright, as the phone showed it
    assert np.asarray(shown)[:20].mean() > 200 and np.asarray(shown)[20:].mean() < 50  # white on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L"])
def test_every_8_bit_mode_becomes_rgb(mode):
    image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    assert decode(f"{mode}.png", out.getvalue()).mode == "RGB"


def test_what_is_no_image_is_refused_naming_it():
    with pytest.raises(ImageError, match="image x.png does not decode"):
        decode("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def test_the_image_cache_counts_bytes_not_images():
    pytest.importorskip("torch")
    from workers.lru import LRU
    from workers.renderer import IMAGE_CACHE_BYTES

    cache = LRU(IMAGE_CACHE_BYTES, size=decoded_bytes)
    for number in range(16):  # 16 images of 8192², 201 MB each decoded: 3.2 GB if counted by number
        cache.put(number, SimpleNamespace(width=8192, height=8192, getbands=lambda: "RGB"))
    assert cache.nbytes <= IMAGE_CACHE_BYTES and len(cache.items) == 2 and cache.evictions == 14
