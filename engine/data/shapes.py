"""A procedural data set of big, crisp shapes, for a fresh machine with no downloads.

Each image is one shape (circle, square, triangle or cross) spanning 40-70% of the image, in one
of a few saturated colours on one of a few plain, contrasting backgrounds. The variety is kept
modest on purpose: a small diffusion model on a CPU should learn the set in minutes.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]

_MIN_SIZE_FRACTION, _MAX_SIZE_FRACTION = 0.4, 0.7

_RGB_BACKGROUNDS = [(0, 0, 0), (255, 255, 255), (35, 35, 70), (225, 225, 205)]
_RGB_SHAPES = [(230, 25, 25), (30, 180, 40), (30, 70, 230), (250, 210, 0), (200, 30, 200), (0, 190, 210),
               (255, 120, 0)]
_GRAY_BACKGROUNDS = [(0,), (40,), (215,), (255,)]
_GRAY_SHAPES = [(0,), (70,), (185,), (255,)]


def _luma(colour: tuple[int, ...]) -> float:
    if len(colour) == 1:
        return colour[0]
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


def _contrasting_pairs(backgrounds, shapes, min_contrast: float) -> list[tuple[tuple, tuple]]:
    # Only pairs far apart in brightness: yellow on white would be hard to see, and hard to learn.
    return [(bg, fg) for bg in backgrounds for fg in shapes if abs(_luma(bg) - _luma(fg)) >= min_contrast]


_COLOUR_PAIRS = {3: _contrasting_pairs(_RGB_BACKGROUNDS, _RGB_SHAPES, 80),
                 1: _contrasting_pairs(_GRAY_BACKGROUNDS, _GRAY_SHAPES, 120)}


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, left: int, top: int, size: int, fill) -> None:
    # PIL boxes include both corners, so a shape of `size` pixels ends at left + size - 1.
    right, bottom = left + size - 1, top + size - 1
    name = SHAPE_CLASSES[label]
    if name == "circle":
        draw.ellipse([left, top, right, bottom], fill=fill)
    elif name == "square":
        draw.rectangle([left, top, right, bottom], fill=fill)
    elif name == "triangle":
        draw.polygon([(left + (size - 1) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:  # cross: two bars a third of the size wide, centred
        bar = max(1, round(size / 3))
        start = left + (size - bar) // 2
        draw.rectangle([start, top, start + bar - 1, bottom], fill=fill)
        start = top + (size - bar) // 2
        draw.rectangle([left, start, right, start + bar - 1], fill=fill)


def make_shape_image(rng: np.random.Generator, image_size: int, channels: int) -> tuple[np.ndarray, int]:
    """One random shape image, as a uint8 (image_size, image_size, channels) array and its label."""
    if channels not in _COLOUR_PAIRS:
        raise ValueError(f"shapes come in 1 (grayscale) or 3 (RGB) channels, not {channels}")
    if image_size < 8:
        raise ValueError(f"shapes need an image size of at least 8 pixels, not {image_size}")
    label = int(rng.integers(len(SHAPE_CLASSES)))
    size = round(rng.uniform(_MIN_SIZE_FRACTION, _MAX_SIZE_FRACTION) * image_size)
    left, top = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
    pairs = _COLOUR_PAIRS[channels]
    background, colour = pairs[int(rng.integers(len(pairs)))]
    mode = "RGB" if channels == 3 else "L"
    image = Image.new(mode, (image_size, image_size), background if channels == 3 else background[0])
    _draw_shape(ImageDraw.Draw(image), label, left, top, size, colour if channels == 3 else colour[0])
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels), label


def iter_shapes(num: int, image_size: int, channels: int, seed: int) -> Iterator[tuple[str, np.ndarray, int]]:
    """`num` shape images as (key, uint8 HxWxC array, label), the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    for index in range(num):
        image, label = make_shape_image(rng, image_size, channels)
        yield f"shape_{index:07d}", image, label
