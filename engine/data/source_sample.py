"""What every source reader yields: `Source`, a stream of `SourceSample`s (encoded, labelled images), and the
webdataset-safe keys they carry. Its own module so that the readers (engine.data.sources, which dispatches,
and engine.data.table_sources, loaded only when pyarrow or lmdb is needed) share it without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple


class SourceSample(NamedTuple):
    key: str  # unique; only [A-Za-z0-9_-], since webdataset cuts member names at the first dot
    data: bytes  # the encoded image
    ext: str  # the file's extension (png, jpg, bmp or webp); "" for records of a table or database
    label: int
    origin: str  # where the image came from, for messages


@dataclass
class Source:
    kind: str  # "shapes", "image-folder", "image-folder-tar", "image-folder-zip", "cifar10-python", "lmdb",
    # "hf-arrow" or "parquet"
    classes: list[str]
    samples: Iterable[SourceSample]  # yields `total` samples, once
    total: int
    channels: int | None = None  # what the images are made as (shapes, CIFAR-10); None: found by prepare


def safe_key(text: str, taken: set[str]) -> str:
    # a leading underscore could read as webdataset metadata (__key__, __url__)
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_") or "sample"
    unique, number = key, 1
    while unique in taken:
        number += 1
        unique = f"{key}_{number}"
    taken.add(unique)
    return unique
