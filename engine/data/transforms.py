"""Images made to fit a data set: any mode to its channel count, any size to its square.

`fit_image` is what `engine.data.prepare` does to every image, in worker processes:

- EXIF orientation is applied (phone photos are stored sideways with a rotation tag);
- the mode becomes the data set's channels: 1 (gray, L), 3 (RGB) or 4 (RGBA, kept only when asked
  for). Transparent images (RGBA, LA, PA, palette with transparency) are composited on a
  background, white or black; 16-bit gray (I;16, I) is scaled to 8 bit (65535 -> 255), not clipped;
  CMYK, YCbCr and the rest go through Pillow's conversion;
- with an image size N, the shorter side becomes N the way ADM's `center_crop_arr` does it (halve
  with a box filter while the shorter side is at least 2N, then bicubic), so that downscaling
  averages instead of aliasing; then an N x N crop, centred or at a seeded random place.

An image that needs none of this keeps its original PNG/JPEG bytes; any other is stored as PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from engine.data.sources import encode_png

CROPS = ("center", "random")
BACKGROUNDS = {"white": 255, "black": 0}
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Modes that hold one gray channel: a source whose first image has one of them defaults to --channels 1.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # the formats the loader reads as they are


@dataclass(frozen=True)
class FitSpec:
    """What every image of a data set becomes (pickled once per chunk to the worker processes)."""

    channels: int  # 1, 3 or 4
    image_size: int | None = None  # None: sizes are kept, and prepare checks that they agree
    crop: str = "center"  # or "random": seeded by (seed, the sample's index)
    background: str = "white"  # under transparent pixels
    seed: int = 0


class FittedImage(NamedTuple):
    pixels: np.ndarray  # uint8 (H, W, C)
    data: bytes  # what the shard stores: the original bytes when nothing changed, else PNG
    ext: str  # png or jpg
    upsampled: bool  # the shorter side was below image_size


def natural_channels(data: bytes) -> int | None:
    """1 for a gray image, 3 for any other; None when the header does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return 1 if image.mode in GRAY_MODES else 3
    except Exception:  # Pillow raises many types for broken files
        return None


def _sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    # Pillow's own I -> L conversion clips at 255, which turns most 16-bit images white
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def to_channels(image: Image.Image, channels: int, background: str = "white") -> Image.Image:
    """`image` in the mode of `channels` (L, RGB or RGBA); transparency composited on `background`
    unless RGBA is asked for."""
    target = CHANNEL_MODES[channels]
    if image.mode == target:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_gray(image)
    if channels != 4 and _has_alpha(image):
        level = BACKGROUNDS[background]
        backdrop = Image.new("RGBA", image.size, (level, level, level, 255))
        image = Image.alpha_composite(backdrop, image.convert("RGBA")).convert("RGB")
    return image.convert(target)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled so that its shorter side is `size`: box-filter halvings while that side is at
    least 2 * size (each output pixel the mean of a 2x2 block: no aliasing), then one bicubic step."""
    while min(image.size) >= 2 * size:
        image = image.reduce(2)
    shorter = min(image.size)
    if shorter != size:
        new_size = tuple(max(size, round(side * size / shorter)) for side in image.size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    return image


def crop_square(image: Image.Image, size: int, crop: str, seed: int, index: int) -> Image.Image:
    """A `size` x `size` crop: centred, or at a random place drawn from (seed, index) alone, so that it
    does not depend on which worker handles the image."""
    width, height = image.size
    if crop == "random":
        rng = np.random.default_rng([seed, index])
        left, top = (int(rng.integers(0, extent - size + 1)) for extent in (width, height))
    else:
        left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode(data: bytes) -> tuple[Image.Image, str | None, bool]:
    """The decoded image upright, its format, and whether an EXIF rotation was applied; raises what
    Pillow raises for a broken file."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image_format = opened.format
        if opened.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return ImageOps.exif_transpose(opened), image_format, True
        return opened.copy(), image_format, False


def fit_image(data: bytes, spec: FitSpec, index: int) -> FittedImage:
    """Encoded image -> the data set's mode and size (see the module doc); `index` seeds a random crop.
    Raises what Pillow raises for a broken file or a mode it cannot convert."""
    return _fit_decoded(*_decode(data), data, spec, index)


def _fit_decoded(image: Image.Image, image_format: str | None, rotated: bool, data: bytes, spec: FitSpec,
                 index: int) -> FittedImage:
    original_mode, original_size = image.mode, image.size
    image = to_channels(image, spec.channels, spec.background)
    upsampled = False
    if spec.image_size is not None and image.size != (spec.image_size, spec.image_size):
        upsampled = min(image.size) < spec.image_size
        image = resize_shorter_side(image, spec.image_size)
        image = crop_square(image, spec.image_size, spec.crop, spec.seed, index)
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    unchanged = not rotated and original_mode == image.mode and original_size == image.size
    if unchanged and image_format in _KEPT_FORMATS:
        return FittedImage(pixels, data, _KEPT_FORMATS[image_format], upsampled)
    return FittedImage(pixels, encode_png(pixels), "png", upsampled)


def fit_sample(spec: FitSpec, item: tuple[int, bytes]) -> FittedImage | str:
    """`fit_image` for a worker process: (index, encoded image) -> the fitted image, or why it could
    not be read (a broken file must not stop the whole run)."""
    index, data = item
    try:
        decoded = _decode(data)
    except Exception as exn:  # Pillow raises many types for broken files
        return f"it does not decode as an image ({exn or type(exn).__name__})"
    try:
        return _fit_decoded(*decoded, data, spec, index)
    except ValueError as exn:  # a mode Pillow cannot convert (LAB without a colour profile, say)
        return f"its mode {decoded[0].mode} does not convert ({exn})"
