"""A job's input image (image-to-video models): found like an adapter, read under the same policy,
bounded, decoded once to check it is an image, and known by its content hash (the job key holds
the hash, not the path)."""

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from common.errors import AdapterError, ImageError
from common.reading import ReadPolicy, read_first, read_unchanged

MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 8192 * 8192  # PIL refuses more: a decompression bomb is not decoded
FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageFile:
    """An image a job names: where it was read, its content hash and its size in pixels."""

    url: str
    sha256: str
    width: int
    height: int


def read_image(uri: str, policy: ReadPolicy) -> tuple[ImageFile, bytes]:
    """Find an image where the policy allows, read it (bounded) and check that it decodes;
    returns it with its bytes."""
    try:
        url, data = read_first(uri, policy, "image", max_bytes=max_image_bytes(policy))
    except ImageError:
        raise
    except AdapterError as exc:
        raise ImageError(str(exc)) from None
    width, height = decode(url, data).size
    return ImageFile(url, hashlib.sha256(data).hexdigest(), width, height), data


def decode(url: str, data: bytes) -> Image.Image:
    """The image in `data` as RGB; raises ImageError for anything that is not a whole PNG, JPEG or
    WebP image of at most MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image {url} is {image.width}×{image.height}: more pixels than {MAX_IMAGE_PIXELS:,}")
            image.load()
            image = ImageOps.exif_transpose(image)  # a phone photo stands as it was taken, not sideways
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"image {url} does not decode as a PNG, JPEG or WebP image ({type(exc).__name__})") from None
    return to_rgb8(image, url)


def decoded_bytes(image: Image.Image) -> int:
    """The memory a decoded image holds (what an image cache counts)."""
    return image.width * image.height * len(image.getbands())


def to_rgb8(image: Image.Image, url: str) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB, scaled, never clipped: Pillow's own convert("RGB")
    clips 16-bit grayscale (`I;16`, and `I`, which among PNG, JPEG and WebP only a 16-bit PNG
    opens as) at 255, so such a picture turns white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ImageError(f"image {url} holds floating-point pixels: save it as 8- or 16-bit PNG, JPEG or WebP")
    return image.convert("RGB")


def read_image_url(url: str, sha256: str, policy: ReadPolicy) -> Image.Image:
    """The image a finished job names, read from its resolved URL and checked against its content
    hash (a worker never trusts a path to hold what was submitted)."""
    try:
        data = read_unchanged(url, sha256, policy, "image", max_image_bytes(policy))
    except ImageError:
        raise
    except AdapterError as exc:
        raise ImageError(str(exc)) from None
    return decode(url, data)


def max_image_bytes(policy: ReadPolicy) -> int:
    """The most an image read may take: the policy's limit, and never more than MAX_IMAGE_BYTES."""
    return min(policy.max_bytes, MAX_IMAGE_BYTES)
