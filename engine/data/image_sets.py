"""Any image source read as uint8 (B, C, H, W) batches, for evaluation and the FID reference.

`open_images` reads an `.npz` of images (`arr_0`, (N, H, W, C), as `engine.sample --npz` writes it),
a data set prepared by `engine.data.prepare` (a folder with manifest.json, or its URL), a folder of
image files (any layout, sorted by path; which files count is `engine.data.sources.is_image_path`), or
any other source `engine.data.prepare` reads (a .tar/.tar.gz/.zip of an image folder, the CIFAR-10 python
archive, an LMDB, a Hugging Face folder or parquet files, `shapes`). `image_batches` cuts images in memory (numpy or
torch, one array or a stream of batches) into the same batches. Files that do not decode are skipped
with a warning; every other problem is a DataError.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.data import DataError
from engine.data.prepare import MANIFEST_NAME, read_manifest
from engine.data.remote import is_url
from engine.data.sources import IMAGE_EXTENSIONS, decode_image, detect_source_kind, is_image_path, open_source
from engine.images import unit_range_to_uint8

# A prepared set is read by the loader's workers, whose batches interleave: a fixed worker count and
# batch size make the order of the images (hence the KID feature subset) the same on every machine
# and for every --batch-size.
_LOADER_WORKERS = 2
_LOADER_BATCH = 256


def _is_nhwc_uint8(images: np.ndarray) -> bool:
    return images.dtype == np.uint8 and (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3, 4)))


def as_uint8_images(images: np.ndarray | Tensor) -> Tensor:
    """One batch as uint8 (N, C, H, W), the layout the feature network takes. Accepted:

    - numpy uint8 (N, H, W, C) or (N, H, W): the `.npz` layout (`engine.sample --npz`,
      `engine.images.to_uint8`);
    - torch uint8 (N, C, H, W): the loader's layout;
    - torch float (N, C, H, W) in [-1, 1]: model outputs, rounded to uint8 as engine.images.to_uint8 does.
    """
    if isinstance(images, np.ndarray):
        if not _is_nhwc_uint8(images):
            raise DataError(f"numpy images must be uint8 (N, H, W, C) with C = 1, 3 or 4, or (N, H, W), "
                            f"not {images.dtype} {images.shape}")
        images = images[..., None] if images.ndim == 3 else images
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise DataError(f"torch images must be (N, C, H, W) with C = 1, 3 or 4, not {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images
        if images.is_floating_point():
            return unit_range_to_uint8(images)
        raise DataError(f"torch images must be uint8 or float in [-1, 1], not {images.dtype}")
    raise DataError(f"images must be a numpy array or a torch tensor, not {type(images).__name__}")


Batch = np.ndarray | Tensor
ImageInput = Batch | Iterable[Batch] | Iterable[tuple[int, Batch]]


def image_batches(images: ImageInput, batch_size: int) -> Iterator[tuple[int | None, Tensor]]:
    """(index of the first image or None, uint8 (B, C, H, W)) batches of at most `batch_size` from one
    array or tensor, or an iterable of them or of (first index, batch) pairs."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    for item in [images] if isinstance(images, (np.ndarray, Tensor)) else images:
        indexed = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, np.integer))
        first, batch = (int(item[0]), item[1]) if indexed else (None, item)
        batch = as_uint8_images(batch)
        for start in range(0, len(batch), batch_size):
            yield None if first is None else first + start, batch[start:start + batch_size]


class ImageSet(NamedTuple):
    """Images on disk: `total` of them; `read(batch_size, select)` yields uint8 (B, C, H, W) batches
    of the images whose index (0..total-1) is in `select` (all when None), in index order."""

    total: int
    read: Callable[[int, range | None], Iterator[Tensor]]
    where: str


def _stacked(images: Iterable[np.ndarray], batch_size: int) -> Iterator[Tensor]:
    """(H, W, C) arrays -> uint8 (B, C, H, W) batches; a change of image shape starts a new batch."""
    pending: list[np.ndarray] = []
    for image in images:
        if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
            yield as_uint8_images(np.stack(pending))
            pending = []
        pending.append(image)
    if pending:
        yield as_uint8_images(np.stack(pending))


def _decoded(items: Iterable[tuple[bytes, str]]) -> Iterator[np.ndarray]:
    for data, origin in items:
        try:
            yield decode_image(data)
        except Exception as exn:  # Pillow raises many types for broken files
            warnings.warn(f"skipping {origin}: it does not decode as an image ({exn})", stacklevel=2)


def read_npz(path: Path, keys: set[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The names of an .npz's arrays, and those of them in `keys` (an ADM reference file also holds
    all its images: they are not read when only the statistics are wanted). Images and statistics
    files (engine.evaluate) are both read with it; DataError when `path` is not an .npz."""
    try:
        with np.load(path, allow_pickle=False) as data:  # a downloaded file must not run code
            return list(data.files), {key: data[key] for key in data.files if key in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exn:
        raise DataError(f"cannot read {path} as an .npz file: {exn}") from exn


def _npz_images(path: Path, num: int | None) -> ImageSet:
    names, arrays = read_npz(path, {"arr_0"})
    if "arr_0" not in arrays:
        what = "a statistics file (mu, sigma), not images" if "mu" in names else f"keys {', '.join(names) or 'none'}"
        raise DataError(f"{path} holds {what}; expected uint8 images (N, H, W, C) under arr_0")
    images = arrays["arr_0"]
    if not _is_nhwc_uint8(images):
        raise DataError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, C) "
                        "with C = 1, 3 or 4")
    images = images[:num]

    def read(batch_size: int, select: range | None) -> Iterator[Tensor]:
        select = range(len(images)) if select is None else select
        for start in range(select.start, select.stop, batch_size):
            yield as_uint8_images(images[start:min(start + batch_size, select.stop)])

    return ImageSet(len(images), read, str(path))


def _prepared_images(path: str | Path, num: int | None) -> ImageSet:
    from engine.data.loader import build_train_loader  # webdataset and the DataLoader: only when needed

    manifest = read_manifest(path)
    total = manifest["num_samples"] if num is None else min(num, manifest["num_samples"])

    def read(batch_size: int, select: range | None) -> Iterator[Tensor]:
        select = range(total) if select is None else select
        # one unshuffled, unflipped pass over every sample, as the device cache loads a set
        loader = build_train_loader(path, batch_size=_LOADER_BATCH, image_size=manifest["image_size"],
                                    channels=manifest["channels"], shuffle_buffer=0, resample=False,
                                    num_workers=min(_LOADER_WORKERS, len(manifest["shards"])))
        index = skipped = 0
        for batch in loader:
            skipped += batch["skipped"]
            images, start = batch["image"], index
            index += len(images)
            chosen = images[max(select.start - start, 0):max(select.stop - start, 0)]
            yield from chosen.split(batch_size)
            if index >= select.stop:
                break
        if skipped:
            warnings.warn(f"{path}: {skipped} samples did not decode and were left out", stacklevel=2)

    return ImageSet(total, read, str(path))


def _folder_images(path: Path, num: int | None) -> ImageSet:
    found = (p for p in path.rglob("*") if is_image_path(p.relative_to(path).as_posix()) and p.is_file())
    files = sorted(found)[:num]
    if not files:
        raise DataError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def read(batch_size: int, select: range | None) -> Iterator[Tensor]:
        chosen = files if select is None else files[select.start:select.stop]
        yield from _stacked(_decoded((file.read_bytes(), str(file)) for file in chosen), batch_size)

    return ImageSet(len(files), read, str(path))


def _archive_images(source: str | Path, num: int | None) -> ImageSet:
    opened = [open_source(source, num=num)]  # opening indexes an archive (or a table): keep it for the first pass

    def read(batch_size: int, select: range | None) -> Iterator[Tensor]:
        samples = (opened.pop() if opened else open_source(source, num=num)).samples
        select = range(10**18) if select is None else select
        chosen = ((s.data, s.origin) for index, s in enumerate(samples) if index in select)
        yield from _stacked(_decoded(chosen), batch_size)

    return ImageSet(opened[0].total, read, str(source))


def open_images(source: str | Path, *, num: int | None = None) -> ImageSet:
    """The images of `source`: an `.npz` (arr_0), a prepared data set folder (manifest.json) or its URL
    (http(s)://, s3:// and other fsspec schemes, pipe:COMMAND: see engine.data.remote), a folder
    of image files (any layout, sorted by path, `is_image_path` deciding which files count), or any
    other source `engine.data.sources.open_source` reads. `num` keeps the first `num` images."""
    if num is not None and num < 1:
        raise DataError(f"the number of images must be at least 1, not {num}")
    if is_url(source):  # only a prepared set is read from a URL: its shards stream through the loader
        return _prepared_images(source, num)
    path = Path(source)
    if str(source) == "shapes":
        return _archive_images(source, num)
    if not path.exists():
        raise DataError(f"{source} does not exist (expected an .npz of images, a prepared data set, "
                        "an image folder or any source engine.data.prepare reads)")
    if path.suffix.lower() == ".npz" and path.is_file():
        return _npz_images(path, num)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _prepared_images(path, num)
    if detect_source_kind(path) == "folder":  # any layout, sorted by path (a DataError names what it expects)
        return _folder_images(path, num)
    return _archive_images(source, num)  # an archive, an LMDB, a Hugging Face folder or parquet files
