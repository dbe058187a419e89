"""Data sets as webdataset shards: procedural shapes, source readers, `prepare`, the streaming loader
and the device-resident cache; and any image source read as batches for evaluation (`image_sets`).

A data set is prepared once (`python -m engine.data.prepare SOURCE OUT_DIR [--format png|array]`)
into tar shards plus a `manifest.json`; training streams the shards with `build_train_loader`, or
holds them on the GPU with `load_device_cache` (`data.cache: device`). Both yield uint8 batches that
the training step flips and scales on the device (`kernels.q_sample_uint8`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


class DataError(ValueError):
    """A problem with a data set or its configuration, reported to the user as one line (exit status 2)."""


# Public names and the submodule holding each. They load on first use, so that
# `python -m engine.data.prepare` neither imports torch nor finds itself imported twice by runpy.
# `prepare` is not listed: a function re-exported under its own submodule's name would be shadowed
# by the submodule on import; call `engine.data.prepare.prepare`.
_EXPORTS = {
    "SHAPE_CLASSES": "shapes",
    "make_shape_image": "shapes",
    "iter_shapes": "shapes",
    "Source": "sources",
    "SourceSample": "sources",
    "open_source": "sources",
    "decode_image": "sources",
    "is_image_path": "sources",
    "read_manifest": "prepare",
    "ImageSet": "image_sets",
    "open_images": "image_sets",
    "as_uint8_images": "image_sets",
    "image_batches": "image_sets",
    "read_npz": "image_sets",
    "build_train_loader": "loader",
    "random_flip_mask": "loader",
    "load_device_cache": "device_cache",
    "DeviceCache": "device_cache",
    "DeviceBatches": "device_cache",
}

# Written out (tests/test_data.py checks it against _EXPORTS) so that linters see the re-exports below.
__all__ = ["DataError", "SHAPE_CLASSES", "make_shape_image", "iter_shapes", "Source", "SourceSample", "open_source",
           "decode_image", "is_image_path", "read_manifest", "ImageSet", "open_images", "as_uint8_images",
           "image_batches", "read_npz", "build_train_loader", "random_flip_mask", "load_device_cache", "DeviceCache",
           "DeviceBatches"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__
    from engine.data.device_cache import DeviceBatches, DeviceCache, load_device_cache
    from engine.data.image_sets import ImageSet, as_uint8_images, image_batches, open_images, read_npz
    from engine.data.loader import build_train_loader, random_flip_mask
    from engine.data.prepare import read_manifest
    from engine.data.shapes import SHAPE_CLASSES, iter_shapes, make_shape_image
    from engine.data.sources import Source, SourceSample, decode_image, is_image_path, open_source
