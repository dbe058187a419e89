"""Readers of source data sets: each gives its class names and a stream of encoded, labelled images.

Sources (SOURCE_KINDS; `open_source` detects the kind, or checks the one it is given):
- folder: an image folder `root/<class name>/<image>` (png, jpg, jpeg, bmp, webp); tar: a `.tar`,
  `.tar.gz` or `.tgz` of one; zip: a `.zip` of one. Archives may hold it under one top-level
  folder (`train/<class>/<image>`). An image's class is its parent folder; classes sorted by name
  give the label indices. A flat layout, every image directly in the root, is one class named
  after the folder (or the archive, less its suffix); images both in the root and in folders are an
  error. The images come in a seeded random order, so that every shard holds a mix of classes; an archive is
  indexed first and each image read when its turn comes (memory holds the index, not the images).
- cifar10: the official CIFAR-10 python archive `cifar-10-python.tar.gz`, recognised by its members;
- lmdb, hf, parquet: encoded images as records of a database or table (engine.data.table_sources);
- shapes: the procedural data set of `engine.data.shapes`.

Samples carry the encoded bytes as stored; `prepare` decodes, converts and resizes them.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import re
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from engine.data import DataError
from engine.data.source_sample import Source, SourceSample, safe_key
from engine.data.shapes import SHAPE_CLASSES, iter_shapes

# file suffix -> the extension a sample is stored under
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".bmp": "bmp", ".webp": "webp"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIX = ".zip"
SOURCE_KINDS = ("folder", "tar", "zip", "cifar10", "lmdb", "hf", "parquet", "shapes")
CIFAR10_FOLDER = "cifar-10-batches-py"
DEFAULT_SHAPES = {"num": 10_000, "image_size": 32, "channels": 3}


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


# ----------------------------------------------------------------------------- entry point


_WHAT = {"folder": "an image folder", "tar": "a .tar/.tar.gz/.tgz of an image folder",
         "zip": "a .zip of an image folder", "cifar10": "the CIFAR-10 python archive",
         "lmdb": "an LMDB folder (data.mdb)", "hf": "a Hugging Face save_to_disk folder (*.arrow, state.json)",
         "parquet": "a .parquet file or a folder of them", "shapes": "the word 'shapes'"}
_EXPECTED = "expected " + ", ".join(_WHAT.values())


def _is_hf_folder(path: Path) -> bool:
    return ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()) and any(path.glob("*.arrow"))


def _is_kind(kind: str, path: Path) -> bool:
    """Whether `path` has the layout of `kind` (a cifar10 archive is told from a tar by its members, later)."""
    name = path.name.lower()
    if path.is_dir():
        if kind == "lmdb":
            return (path / "data.mdb").is_file()
        if kind == "hf":
            return _is_hf_folder(path)
        return kind == "folder" or (kind == "parquet" and any(path.glob("*.parquet")))
    if kind in ("tar", "cifar10"):
        return name.endswith(TAR_SUFFIXES)
    return name.endswith({"zip": ZIP_SUFFIX, "parquet": ".parquet"}.get(kind, "/"))


def detect_source_kind(path: Path) -> str:
    """The kind (SOURCE_KINDS) of an existing `path`; a tar that holds CIFAR-10 is reported as tar."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path} holds the splits {', '.join(splits)} of a Hugging Face data set; "
                        f"prepare one of them: {path / (splits[0] if splits else 'train')}")
    for kind in ("lmdb", "hf", "parquet", "folder", "tar", "zip"):
        if _is_kind(kind, path):
            return kind
    raise DataError(f"unknown source format: {path} ({_EXPECTED})")


def open_source(source: str | Path, *, num: int | None = None, image_size: int | None = None,
                channels: int | None = None, seed: int = 0, split: str | None = None, kind: str | None = None,
                image_column: str | None = None, label_column: str | None = None) -> Source:
    """The data set at `source`: a folder, an archive, a table, an LMDB or the word `shapes`.

    `kind` (one of SOURCE_KINDS) names the source's kind instead of detecting it; a source of another
    kind is then an error. `num` limits how many samples are read (for `shapes`: how many are made);
    `seed` drives the shapes and the order of the samples; `split` (train or test) picks the
    CIFAR-10 split. `image_size` and `channels` configure `shapes`. `image_column` and `label_column`
    pick the columns of a table (engine.data.table_sources).
    """
    if num is not None and num < 1:
        raise DataError(f"--num must be at least 1, not {num}")
    if kind is not None and kind not in SOURCE_KINDS:
        raise DataError(f"--source must be one of {', '.join(SOURCE_KINDS)}, not {kind!r}")
    found = _found_kind(source, kind)
    if split is not None and found not in ("tar", "cifar10"):
        raise DataError(f"--split applies to the CIFAR-10 python archive only, not to {_WHAT[found]}")
    if (image_column or label_column) and found not in ("hf", "parquet"):
        raise DataError(f"--image-column and --label-column apply to hf and parquet sources only, "
                        f"not to {_WHAT[found]}")
    if found == "shapes":
        return _shapes_source(num, image_size, channels, seed)
    path = Path(source)
    if found in ("lmdb", "hf", "parquet"):
        from engine.data import table_sources  # pyarrow and lmdb are optional: only when needed

        if found == "lmdb":
            return table_sources.lmdb_source(path, num, seed)
        return table_sources.table_source(path, found, num, seed, image_column, label_column)
    if found == "folder":
        return _folder_source(path, num, seed)
    if found == "zip":
        return _zip_source(path, num, seed)
    return _tar_source(path, num, seed, split, kind)


def _found_kind(source: str | Path, kind: str | None) -> str:
    """The kind of `source`: `kind` when its layout matches, else the one detected."""
    if str(source) == "shapes" or kind == "shapes":
        if str(source) != "shapes" or kind not in (None, "shapes"):
            raise DataError(f"--source {kind}, but {source} is not {_WHAT[kind]} (leave --source out)")
        return "shapes"
    path = Path(source)
    if not path.exists():
        raise DataError(f"source {source} does not exist ({_EXPECTED})")
    if kind is None:
        return detect_source_kind(path)
    if not _is_kind(kind, path):
        found = detect_source_kind(path)
        raise DataError(f"--source {kind}, but {source} is not {_WHAT[kind]}: it looks like {_WHAT[found]} "
                        f"(pass --source {found} or leave --source out)")
    return kind


# ----------------------------------------------------------------------------- shapes


def _shapes_source(num: int | None, image_size: int | None, channels: int | None, seed: int) -> Source:
    num = DEFAULT_SHAPES["num"] if num is None else num
    image_size = DEFAULT_SHAPES["image_size"] if image_size is None else image_size
    channels = DEFAULT_SHAPES["channels"] if channels is None else channels
    if channels not in (1, 3) or image_size < 8:
        raise DataError(f"shapes need --channels 1 or 3 and --image-size >= 8, not {channels} and {image_size}")
    samples = (SourceSample(key, encode_png(image), "png", label, f"shapes[{key}]")
               for key, image, label in iter_shapes(num, image_size, channels, seed))
    return Source("shapes", list(SHAPE_CLASSES), samples, num, channels=channels)


# ----------------------------------------------------------------------------- image folders


def is_image_path(path: str) -> bool:
    """Whether a file counts as an image of a folder or archive: `path` is '/'-separated, relative to
    its root. Its suffix must be one of IMAGE_EXTENSIONS, and no part of it hidden: neither a dot
    file or folder nor `__MACOSX` (the resource forks macOS puts into archives)."""
    return (posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") or part == "__MACOSX" for part in path.split("/")))


def _classes_of(images: list[str], source: Path, flat_class: str) -> tuple[list[str], list[int]]:
    """Class names (sorted) and each image's label; the class is the image's parent folder, or
    `flat_class` when every image lies directly in the root."""
    folders = [posixpath.dirname(image) for image in images]  # posixpath: pathlib is slow for 50,000 names
    loose = [image for image, folder in zip(images, folders) if not folder]
    if loose and len(loose) == len(images):
        return [flat_class], [0] * len(images)
    if loose:
        raise DataError(f"{source}: image {loose[0]} is not inside a class folder, but others are; "
                        "expected <root>/<class name>/<image>, or every image directly in <root> (one class)")
    roots = sorted({posixpath.dirname(folder) for folder in folders})
    if len(roots) > 1:
        raise DataError(f"{source}: class folders sit under more than one folder ({', '.join(roots[:3])}); "
                        "expected <root>/<class name>/<image>, one split at a time")
    names = [posixpath.basename(folder) for folder in folders]
    classes = sorted(set(names))
    index = {name: label for label, name in enumerate(classes)}
    return classes, [index[name] for name in names]


def _stem(path: Path) -> str:
    """An archive's name less its suffix: the class of a flat archive."""
    name = path.name
    for suffix in (*TAR_SUFFIXES, ZIP_SUFFIX):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _image_folder_source(kind: str, source: Path, files: Iterable[str], read: Callable[[str], bytes],
                         num: int | None, seed: int) -> Source:
    """`files` are '/'-separated paths relative to the folder (or archive) root."""
    images = sorted(f for f in files if is_image_path(f))
    if not images:
        raise DataError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "expected <root>/<class name>/<image>")
    classes, labels = _classes_of(images, source, source.resolve().name if kind == "image-folder" else _stem(source))
    # Files are sorted by class: a seeded permutation gives every shard a mix of classes.
    order = np.random.default_rng(seed).permutation(len(images))[:num]

    def samples() -> Iterator[SourceSample]:
        taken: set[str] = set()
        for i in order:
            stem, suffix = posixpath.splitext(posixpath.basename(images[i]))
            key = safe_key(f"{classes[labels[i]]}_{stem}", taken)
            yield SourceSample(key, read(images[i]), IMAGE_EXTENSIONS[suffix.lower()], labels[i],
                               f"{source}/{images[i]}")

    return Source(kind, classes, samples(), len(order))


def _folder_source(root: Path, num: int | None, seed: int) -> Source:
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return _image_folder_source("image-folder", root, files, lambda f: (root / f).read_bytes(), num, seed)


def _zip_source(path: Path, num: int | None, seed: int) -> Source:
    try:
        archive = zipfile.ZipFile(path)  # random access: members are read one at a time, as samples go
    except (zipfile.BadZipFile, OSError) as exn:
        raise DataError(f"cannot read {path} as a zip archive: {exn}") from exn
    members = {posixpath.normpath(info.filename): info for info in archive.infolist() if not info.is_dir()}

    def read(name: str) -> bytes:
        try:
            return archive.read(members[name])
        except (zipfile.BadZipFile, OSError) as exn:
            raise DataError(f"cannot read {name} from {path}: {exn}") from exn

    return _image_folder_source("image-folder-zip", path, members, read, num, seed)


# ----------------------------------------------------------------------------- archives


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


class _TarMembers(Mapping):
    """A tar(.gz)'s regular files by normalised name, each read when asked for: memory holds the index, not the
    images (an archive may be far larger than memory). An uncompressed tar is read in place; a compressed one is
    decompressed once, in one streaming pass, into a temporary file (random access into a compressed stream would
    decompress it again for every image taken in shuffled order)."""

    def __init__(self, path: Path):
        self.path, self._where = path, {}  # name -> (offset, size) in self._file
        with open(path, "rb") as probe:
            compressed = probe.read(6).startswith(_COMPRESSED_MAGIC)
        self._file = tempfile.TemporaryFile() if compressed else open(path, "rb")
        weakref.finalize(self, self._file.close)  # closed with the index (a source holds it as long as it reads)
        try:
            with tarfile.open(path, "r|*" if compressed else "r:") as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # the index is ours: TarFile's own list would keep every header
                    if member.isfile():
                        self._where[posixpath.normpath(member.name)] = self._locate(tar, member, compressed)
            self._file.flush()  # what was spooled, visible to pread
        except (tarfile.TarError, OSError, EOFError) as exn:
            self._file.close()
            raise DataError(f"cannot read {path} as a tar archive: {exn}") from exn

    def _locate(self, tar: tarfile.TarFile, member: tarfile.TarInfo, compressed: bool) -> tuple[int, int]:
        if not compressed:
            return member.offset_data, member.size
        offset = self._file.tell()
        shutil.copyfileobj(tar.extractfile(member), self._file)
        return offset, member.size

    def __getitem__(self, name: str) -> bytes:
        offset, size = self._where[name]
        try:
            data = os.pread(self._file.fileno(), size, offset)
        except OSError as exn:
            raise DataError(f"cannot read {name} from {self.path}: {exn}") from exn
        if len(data) != size:
            raise DataError(f"cannot read {name} from {self.path}: the archive ends inside it (changed since opened?)")
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _is_cifar10_python(members: Mapping) -> bool:
    return any(name.endswith(f"{CIFAR10_FOLDER}/batches.meta") for name in members)


def _tar_source(path: Path, num: int | None, seed: int, split: str | None, kind: str | None) -> Source:
    members = _TarMembers(path)
    is_cifar10 = _is_cifar10_python(members)
    if kind is not None and is_cifar10 != (kind == "cifar10"):
        found = "cifar10" if is_cifar10 else "tar"
        raise DataError(f"--source {kind}, but {path} is {_WHAT[found]} (pass --source {found} or leave --source out)")
    if is_cifar10:
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


def _cifar10_source(path: Path, members: Mapping, num: int | None, split: str) -> Source:
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

    return Source("cifar10-python", classes, samples(), total, channels=3)
