"""Readers of source data sets: each gives its class names and a stream of encoded, labelled images.

Sources:
- an image folder `root/<class name>/<image>` (png, jpg, jpeg, bmp, webp), or a `.tar`, `.tar.gz` or
  `.tgz` of one, possibly under one top-level folder (`train/<class>/<image>`). An image's class is
  its parent folder; classes sorted by name give the label indices. The images come in a seeded
  random order, so that every shard holds a mix of classes (the files are sorted by class).
- the official CIFAR-10 python archive `cifar-10-python.tar.gz`, recognised by its member names;
- `shapes`, the procedural data set of `engine.data.shapes`.

Image files keep their original bytes; `prepare` checks that each one decodes.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image

from engine.data import DataError
from engine.data.shapes import SHAPE_CLASSES, iter_shapes

# file suffix -> the extension a sample is stored under
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".bmp": "bmp", ".webp": "webp"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CIFAR10_FOLDER = "cifar-10-batches-py"
DEFAULT_SHAPES = {"num": 10_000, "image_size": 32, "channels": 3}


class SourceSample(NamedTuple):
    key: str  # unique; only [A-Za-z0-9_-], since webdataset cuts member names at the first dot
    data: bytes  # the encoded image
    ext: str  # png, jpg, bmp or webp
    label: int
    origin: str  # where the image came from, for messages


@dataclass
class Source:
    kind: str  # "shapes", "image-folder", "image-folder-tar" or "cifar10-python"
    classes: list[str]
    samples: Iterable[SourceSample]  # yields `total` samples, once
    total: int


# ----------------------------------------------------------------------------- images


# Modes that decode to one of the three layouts training uses: L, RGB or RGBA.
_MODE_CONVERSIONS = {"1": "L", "P": "RGB", "PA": "RGBA", "LA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB",
                     "RGBX": "RGB"}


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C) array, C = 1 (gray), 3 (RGB) or 4 (RGBA).

    Raises whatever Pillow raises for a broken file, and ValueError for modes such as 16-bit gray.
    """
    with Image.open(io.BytesIO(data)) as image:
        mode = image.mode
        if mode == "P" and "transparency" in image.info:
            mode = "RGBA"
        mode = _MODE_CONVERSIONS.get(mode, mode)
        if mode not in ("L", "RGB", "RGBA"):
            raise ValueError(f"unsupported image mode {image.mode}")
        array = np.asarray(image.convert(mode) if mode != image.mode else image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) array -> PNG bytes (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_key(text: str, taken: set[str]) -> str:
    # a leading underscore could read as webdataset metadata (__key__, __url__)
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_") or "sample"
    unique, number = key, 1
    while unique in taken:
        number += 1
        unique = f"{key}_{number}"
    taken.add(unique)
    return unique


# ----------------------------------------------------------------------------- entry point


def open_source(source: str | Path, *, num: int | None = None, image_size: int | None = None,
                channels: int | None = None, seed: int = 0, split: str | None = None) -> Source:
    """The data set at `source`: a folder, a tar(.gz) archive, or the word `shapes`.

    `num` limits how many samples are read (for `shapes`: how many are made); `seed` drives the
    shapes and the order of image-folder samples; `split` (train or test) picks the CIFAR-10 split.
    `image_size` and `channels` configure `shapes`; for files, `prepare` checks them.
    """
    if num is not None and num < 1:
        raise DataError(f"--num must be at least 1, not {num}")
    if str(source) == "shapes":
        if split is not None:
            raise DataError("--split applies to the CIFAR-10 python archive only, not to shapes")
        return _shapes_source(num, image_size, channels, seed)
    path = Path(source)
    if not path.exists():
        raise DataError(f"source {source} does not exist (expected a folder, a .tar/.tar.gz/.tgz archive or 'shapes')")
    if path.is_dir():
        if split is not None:
            raise DataError("--split applies to the CIFAR-10 python archive only, not to an image folder")
        return _folder_source(path, num, seed)
    if path.name.lower().endswith(TAR_SUFFIXES):
        return _tar_source(path, num, seed, split)
    raise DataError(f"unknown source format: {source} (expected a folder, a .tar/.tar.gz/.tgz archive or 'shapes')")


# ----------------------------------------------------------------------------- shapes


def _shapes_source(num: int | None, image_size: int | None, channels: int | None, seed: int) -> Source:
    num = DEFAULT_SHAPES["num"] if num is None else num
    image_size = DEFAULT_SHAPES["image_size"] if image_size is None else image_size
    channels = DEFAULT_SHAPES["channels"] if channels is None else channels
    if channels not in (1, 3) or image_size < 8:
        raise DataError(f"shapes need --channels 1 or 3 and --image-size >= 8, not {channels} and {image_size}")
    samples = (SourceSample(key, encode_png(image), "png", label, f"shapes[{key}]")
               for key, image, label in iter_shapes(num, image_size, channels, seed))
    return Source("shapes", list(SHAPE_CLASSES), samples, num)


# ----------------------------------------------------------------------------- image folders


def is_image_path(path: str) -> bool:
    """Whether a file counts as an image of a folder or archive: `path` is '/'-separated, relative to
    its root. Its suffix must be one of IMAGE_EXTENSIONS, and no part of it hidden: neither a dot
    file or folder nor `__MACOSX` (the resource forks macOS puts into archives)."""
    return (posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") or part == "__MACOSX" for part in path.split("/")))


def _classes_of(images: list[str], source: Path) -> tuple[list[str], list[int]]:
    """Class names (sorted) and each image's label; the class is the image's parent folder."""
    folders = [posixpath.dirname(image) for image in images]  # posixpath: pathlib is slow for 50,000 names
    for image, folder in zip(images, folders):
        if not folder:
            raise DataError(f"{source}: image {image} is not inside a class folder; "
                            "expected <root>/<class name>/<image>")
    roots = sorted({posixpath.dirname(folder) for folder in folders})
    if len(roots) > 1:
        raise DataError(f"{source}: class folders sit under more than one folder ({', '.join(roots[:3])}); "
                        "expected <root>/<class name>/<image>, one split at a time")
    names = [posixpath.basename(folder) for folder in folders]
    classes = sorted(set(names))
    index = {name: label for label, name in enumerate(classes)}
    return classes, [index[name] for name in names]


def _image_folder_source(kind: str, source: Path, files: Iterable[str], read: Callable[[str], bytes],
                         num: int | None, seed: int) -> Source:
    """`files` are '/'-separated paths relative to the folder (or archive) root."""
    images = sorted(f for f in files if is_image_path(f))
    if not images:
        raise DataError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "expected <root>/<class name>/<image>")
    classes, labels = _classes_of(images, source)
    # Files are sorted by class: a seeded permutation gives every shard a mix of classes.
    order = np.random.default_rng(seed).permutation(len(images))[:num]

    def samples() -> Iterator[SourceSample]:
        taken: set[str] = set()
        for i in order:
            stem, suffix = posixpath.splitext(posixpath.basename(images[i]))
            key = _safe_key(f"{classes[labels[i]]}_{stem}", taken)
            yield SourceSample(key, read(images[i]), IMAGE_EXTENSIONS[suffix.lower()], labels[i],
                               f"{source}/{images[i]}")

    return Source(kind, classes, samples(), len(order))


def _folder_source(root: Path, num: int | None, seed: int) -> Source:
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return _image_folder_source("image-folder", root, files, lambda f: (root / f).read_bytes(), num, seed)


# ----------------------------------------------------------------------------- archives


def _read_tar(path: Path) -> dict[str, bytes]:
    """All regular files of a tar(.gz) by normalised name, in memory: one streaming pass, nothing
    extracted to disk."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    members[posixpath.normpath(member.name)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exn:
        raise DataError(f"cannot read {path} as a tar archive: {exn}") from exn
    return members


def _is_cifar10_python(members: dict[str, bytes]) -> bool:
    return any(name.endswith(f"{CIFAR10_FOLDER}/batches.meta") for name in members)


def _tar_source(path: Path, num: int | None, seed: int, split: str | None) -> Source:
    members = _read_tar(path)
    if _is_cifar10_python(members):
        return _cifar10_source(path, members, num, split or "train")
    if split is not None:
        raise DataError("--split applies to the CIFAR-10 python archive only, not to an image-folder archive")
    return _image_folder_source("image-folder-tar", path, members, members.__getitem__, num, seed)


class _ArrayUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only: a downloaded pickle must not run code."""

    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)  # numpy 1 names, as in the 2009 archive
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data set pickle")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # encoding="bytes": the official batches were pickled by Python 2, with byte-string keys
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exn:
        raise DataError(f"cannot read {where}: {exn}") from exn


def _as_text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _cifar10_batch(batch: dict, where: str) -> tuple[np.ndarray, list[int]]:
    """A batch's images as (N, 32, 32, 3) and its labels; b'data' rows hold planar (CHW) pixels."""
    try:
        pixels, labels = np.asarray(batch[b"data"], dtype=np.uint8), [int(label) for label in batch[b"labels"]]
    except (KeyError, TypeError, ValueError) as exn:
        raise DataError(f"{where} is not a CIFAR-10 batch (no usable {exn})") from exn
    if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(pixels) != len(labels):
        raise DataError(f"{where}: data is {pixels.shape} for {len(labels)} labels, expected (N, 3072)")
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar10_source(path: Path, members: dict[str, bytes], num: int | None, split: str) -> Source:
    folder = posixpath.dirname(next(name for name in members if name.endswith(f"{CIFAR10_FOLDER}/batches.meta")))
    in_folder = {posixpath.basename(name): name for name in members if posixpath.dirname(name) == folder}
    if split == "train":
        names = sorted((n for n in in_folder if n.startswith("data_batch_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    elif split == "test":
        names = [n for n in in_folder if n == "test_batch"]
    else:
        raise DataError(f"--split must be train or test, not {split}")
    if not names:
        raise DataError(f"{path} holds no {split} batches of CIFAR-10")
    meta_where = f"{path}/{in_folder['batches.meta']}"
    meta = _unpickle(members[in_folder["batches.meta"]], meta_where)
    if not isinstance(meta, dict) or b"label_names" not in meta:
        raise DataError(f"{meta_where} lacks label_names")
    classes = [_as_text(name) for name in meta[b"label_names"]]
    batches = []
    for name in names:
        where = f"{path}/{in_folder[name]}"
        batches.append((name, *_cifar10_batch(_unpickle(members[in_folder[name]], where), where)))
    total = sum(len(labels) for _, _, labels in batches)
    total = total if num is None else min(num, total)

    def samples() -> Iterator[SourceSample]:
        count = 0
        for name, images, labels in batches:
            for index, (image, label) in enumerate(zip(images, labels)):
                if count == total:
                    return
                yield SourceSample(f"{name}_{index:05d}", encode_png(image), "png", label, f"{path}:{name}[{index}]")
                count += 1

    return Source("cifar10-python", classes, samples(), total)
