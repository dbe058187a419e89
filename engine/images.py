"""Model outputs in [-1, 1] to uint8 images, grids and files (Pillow and numpy only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def unit_range_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 levels 0..255, rounding to the nearest level; the layout is kept."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, rounding to the nearest level."""
    return unit_range_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*H, columns*W, C) image with a padding border."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def class_rows(images: np.ndarray, labels: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    """At most `limit` of the images, one row per class (classes in the order they first appear), and the row
    length: the same for every class, as many as the rarest class has (at least one image per class)."""
    classes = list(dict.fromkeys(labels.tolist()))
    columns = max(1, min(limit // len(classes), *((labels == label).sum() for label in classes)))
    return np.concatenate([images[labels == label][:columns] for label in classes]), columns


def save_image(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save an (H, W, C) uint8 array as PNG, optionally enlarged with nearest-neighbour pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """Model outputs in [-1, 1] (or uint8 (N, H, W, C) images) as one grid PNG; small images are enlarged
    so people can see them."""
    array = images if isinstance(images, np.ndarray) else to_uint8(images)
    size = array.shape[2]
    return save_image(make_grid(array, columns), path, scale=max(1, 256 // size) if size < 64 else 1)
