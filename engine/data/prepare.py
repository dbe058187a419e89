"""Write a data set as webdataset shards plus a manifest, once, before training.

    python -m engine.data.prepare SOURCE OUT_DIR [--format png|array] [--shard-size N] [--num N]
                                  [--image-size S] [--channels C] [--seed S] [--split train|test]
                                  [--images-per-member N] [--overwrite]

SOURCE is an image folder `root/<class>/<image>`, a .tar/.tar.gz/.tgz of one, the official CIFAR-10
python archive, or the word `shapes` (see engine.data.sources). OUT_DIR receives
`shard-000000.tar, ...` and `manifest.json`, which the loader reads. The shards come in two formats:

- png (default): one sample per key, `<key>.png|jpg` (the encoded image; JPEG files keep their
  bytes) plus `<key>.cls` (the label as ASCII text). Small on disk; the loader decodes every image.
- array: decode-free. Each key holds a block of up to `images_per_member` images as one numpy
  array, `<key>.images.npy` uint8 (N, C, H, W), and their labels, `<key>.labels.npy` int64 (N,).
  Raw pixels (CIFAR-10: 150 MB), but loading is a memory copy instead of a PNG decode per image.

    {"format": 1, "shard_format": "png"|"array", "source", "kind", "num_samples", "image_size",
     "channels", "classes", "skipped", "shards": [{"name", "num_samples", "sha256"}]}
    (+ "images_per_member" for array shards; a manifest without "shard_format" is png)

"num_samples" counts images in both formats.

A shard gets its final name only when complete and the manifest is written last, so a crash never
leaves a manifest that points at half-written shards. Files that do not decode are skipped with a
warning and counted in "skipped"; images of another size or channel count than the rest are an
error, since training needs one shape.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import webdataset as wds

import numpy as np

from engine.atomic_files import atomic_write
from engine.data import DataError
from engine.data.sources import Source, SourceSample, decode_image, encode_png, open_source
from engine.progress import progress_bar

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000
SHARD_FORMATS = ("png", "array")
# Array members: at most this many images, and about this many bytes when images are large (a
# member is read into memory whole). CIFAR-10: 1000 images, 3 MB.
MAX_IMAGES_PER_MEMBER = 1000
_TARGET_MEMBER_BYTES = 4 << 20
_PARTIAL_SUFFIX = ".partial"
_STORED_EXTENSIONS = ("png", "jpg")  # other formats are re-encoded as PNG (lossless)


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of a prepared data set; `path` is its folder or its manifest.json."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / MANIFEST_NAME
    if not file.is_file():
        raise DataError(f"no prepared data set at {path} ({file} is missing); write one with "
                        f"`python -m engine.data.prepare SOURCE {path}` (SOURCE: shapes, a folder or a tar.gz)")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exn:
        raise DataError(f"{file} is not valid JSON ({exn}); prepare the data set again") from exn
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{file} is not a format-{MANIFEST_FORMAT} manifest; prepare the data set again")
    missing = [k for k in ("num_samples", "image_size", "channels", "classes", "shards") if k not in manifest]
    if missing:
        raise DataError(f"{file} lacks {', '.join(missing)}; prepare the data set again")
    manifest.setdefault("shard_format", "png")  # data sets prepared before array shards existed
    if manifest["shard_format"] not in SHARD_FORMATS:
        raise DataError(f"{file} has shard_format {manifest['shard_format']!r}, which this version does not read "
                        f"(it reads {', '.join(SHARD_FORMATS)})")
    return manifest


# ----------------------------------------------------------------------------- shards


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class _ShardWriter:
    """Numbered shards of at most `shard_size` images. A shard is written under a partial name and
    renamed when complete; `shards` lists the completed ones for the manifest. Subclasses decide
    how images become tar members (`_add`, and `_flush` at the end of a shard)."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self._file = self._tar = None
        self._count = 0

    def _path(self) -> Path:
        return self.out_dir / SHARD_PATTERN.format(len(self.shards))

    def _write_member(self, members: dict) -> None:
        if self._tar is None:
            self._file = open(self._path().with_suffix(".tar" + _PARTIAL_SUFFIX), "wb")
            # encoder=False: store our bytes as they are; a fixed mtime makes shards reproducible
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._tar.write(members)

    def _add(self, sample: SourceSample, image: np.ndarray) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """Writes out what the current shard still buffers."""

    def write(self, sample: SourceSample, image: np.ndarray) -> None:
        """Adds one checked sample; `image` is its decoded uint8 (H, W, C) pixels."""
        self._add(sample, image)
        self._count += 1
        if self._count == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._count == 0:
            return
        self._flush()
        self._tar.close()
        self._file.close()
        path = self._path()
        os.replace(path.with_suffix(".tar" + _PARTIAL_SUFFIX), path)
        self.shards.append({"name": path.name, "num_samples": self._count, "sha256": _sha256(path)})
        self._file = self._tar = None
        self._count = 0

    def abort(self) -> None:
        """Remove everything this writer wrote (used when preparing fails half-way)."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._path().with_suffix(".tar" + _PARTIAL_SUFFIX).unlink(missing_ok=True)
        for shard in self.shards:
            (self.out_dir / shard["name"]).unlink(missing_ok=True)


class _PngShardWriter(_ShardWriter):
    """One sample per key: the encoded image (original PNG/JPEG bytes, others as PNG) and its label."""

    def _add(self, sample: SourceSample, image: np.ndarray) -> None:
        data, ext = (sample.data, sample.ext) if sample.ext in _STORED_EXTENSIONS else (encode_png(image), "png")
        self._write_member({"__key__": sample.key, ext: data, "cls": str(sample.label).encode("ascii")})


class _ArrayShardWriter(_ShardWriter):
    """Blocks of images per key: `<key>.images.npy` uint8 (N, C, H, W) and `<key>.labels.npy` int64 (N,).
    Keys are `<shard number>_<block number>`; a block never spans two shards."""

    def __init__(self, out_dir: Path, shard_size: int, images_per_member: int | None):
        super().__init__(out_dir, shard_size)
        self.images_per_member = images_per_member  # None: chosen from the first image's size
        self._images: list[np.ndarray] = []
        self._labels: list[int] = []
        self._blocks_in_shard = 0

    def _add(self, sample: SourceSample, image: np.ndarray) -> None:
        if self.images_per_member is None:
            self.images_per_member = max(1, min(MAX_IMAGES_PER_MEMBER, _TARGET_MEMBER_BYTES // image.nbytes))
        self._images.append(image)
        self._labels.append(sample.label)
        if len(self._images) == self.images_per_member:
            self._flush()

    def _flush(self) -> None:
        if not self._images:
            return
        images = np.ascontiguousarray(np.stack(self._images).transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
        key = f"{len(self.shards):06d}_{self._blocks_in_shard:04d}"
        self._write_member({"__key__": key, "images.npy": _npy_bytes(images),
                            "labels.npy": _npy_bytes(np.asarray(self._labels, dtype=np.int64))})
        self._images, self._labels = [], []
        self._blocks_in_shard += 1

    def finish_shard(self) -> None:
        super().finish_shard()
        self._blocks_in_shard = 0


def _make_room(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder")
    manifest = out_dir / MANIFEST_NAME
    shards = sorted(out_dir.glob("shard-*.tar")) if out_dir.is_dir() else []
    if (shards or manifest.exists()) and not overwrite:
        raise DataError(f"{out_dir} already holds a prepared data set; pass --overwrite to replace it")
    manifest.unlink(missing_ok=True)  # first, so that no manifest ever lists a removed shard
    for stale in shards + sorted(out_dir.glob(f"*{_PARTIAL_SUFFIX}")):
        stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- preparing


def _check_shape(image, origin: str, expected: dict) -> None:
    height, width, channels = image.shape
    if height != width:
        raise DataError(f"{origin}: image is {width}x{height}; training needs square images (resize the source)")
    if (height, channels) != (expected["image_size"], expected["channels"]):
        raise DataError(f"{origin}: image is {width}x{height}x{channels}, but {expected['set_by']} "
                        f"{expected['image_size']}x{expected['image_size']}x{expected['channels']}; "
                        "all images of a data set must share size and channel count")


def _write_samples(source: Source, writer: _ShardWriter, expected: dict, progress: bool) -> int:
    """Checks and writes every sample; returns how many were skipped as undecodable."""
    skipped = 0
    with progress_bar(total=source.total, unit="img", desc=f"prepare {source.kind}", disable=not progress) as bar:
        for sample in source.samples:
            bar.update()
            skipped += _write_sample(sample, writer, expected)
    writer.finish_shard()
    return skipped


def _write_sample(sample: SourceSample, writer: _ShardWriter, expected: dict) -> int:
    """Checks and writes one sample; returns 1 if it was skipped as undecodable, else 0."""
    try:
        image = decode_image(sample.data)
    except Exception as exn:  # Pillow raises many types for broken files
        warnings.warn(f"skipping {sample.origin}: it does not decode as an image ({exn})", stacklevel=3)
        return 1
    if expected["image_size"] is None or expected["channels"] is None:
        # the first image that decodes sets the shape for the rest
        expected["image_size"] = expected["image_size"] or image.shape[0]
        expected["channels"] = expected["channels"] or image.shape[2]
        expected["set_by"] = f"the first image ({sample.origin}) is"
    _check_shape(image, sample.origin, expected)
    writer.write(sample, image)
    return 0


def prepare(source: str | Path, out_dir: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, *,
            num: int | None = None, image_size: int | None = None, channels: int | None = None,
            seed: int = 0, split: str | None = None, shard_format: str = "png",
            images_per_member: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `source` as shards plus manifest.json into `out_dir` and return the manifest.

    `num` limits the samples (for `shapes`: how many to make); `image_size` and `channels` configure
    `shapes` and, for other sources, are checked against the images; `seed` drives the shapes and
    the sample order of image folders; `split` picks the CIFAR-10 split (default train).
    `shard_format` is "png" (encoded images) or "array" (blocks of raw pixels, see the module doc);
    `images_per_member` sizes the array blocks (default: up to 1000 images, about 4 MB).
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, not {shard_size}")
    if shard_format not in SHARD_FORMATS:
        raise DataError(f"--format must be one of {', '.join(SHARD_FORMATS)}, not {shard_format!r}")
    if images_per_member is not None and shard_format != "array":
        raise DataError("--images-per-member applies to --format array only")
    if images_per_member is not None and images_per_member < 1:
        raise DataError(f"--images-per-member must be at least 1, not {images_per_member}")
    opened = open_source(source, num=num, image_size=image_size, channels=channels, seed=seed, split=split)
    out_dir = Path(out_dir)
    _make_room(out_dir, overwrite)
    expected = {"image_size": image_size, "channels": channels, "set_by": "--image-size and --channels say"}
    writer = (_ArrayShardWriter(out_dir, shard_size, images_per_member) if shard_format == "array"
              else _PngShardWriter(out_dir, shard_size))
    try:
        skipped = _write_samples(opened, writer, expected, progress)
        if not writer.shards:
            raise DataError(f"{source}: none of its {opened.total} images decode")
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "format": MANIFEST_FORMAT,
        "shard_format": shard_format,
        "source": str(source),
        "kind": opened.kind,
        "num_samples": sum(shard["num_samples"] for shard in writer.shards),
        "image_size": expected["image_size"],
        "channels": expected["channels"],
        "classes": opened.classes,
        "skipped": skipped,
        "shards": writer.shards,
    }
    if shard_format == "array":
        manifest["images_per_member"] = writer.images_per_member
    atomic_write(out_dir / MANIFEST_NAME, lambda file: file.write((json.dumps(manifest, indent=1) + "\n").encode()))
    return manifest


# ----------------------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m engine.data.prepare",
                            description="Write a data set as webdataset shards plus manifest.json.")
    parser.add_argument("source", help="an image folder root/<class>/<image>, a .tar/.tar.gz/.tgz of one, "
                                       "the CIFAR-10 python archive, or 'shapes'")
    parser.add_argument("out_dir", help="folder for shard-*.tar and manifest.json")
    parser.add_argument("--format", choices=SHARD_FORMATS, default="png", dest="shard_format",
                        help="png: encoded images, decoded by the loader (default); array: blocks of raw "
                             "uint8 pixels, nothing to decode (larger on disk, far faster to load)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--images-per-member", type=int,
                        help=f"--format array: images per tar member (default: up to {MAX_IMAGES_PER_MEMBER}, "
                             "about 4 MB)")
    parser.add_argument("--num", type=int, help="at most this many samples (shapes: how many to make)")
    parser.add_argument("--image-size", type=int, help="shapes: image size (32); others: expected size")
    parser.add_argument("--channels", type=int, help="shapes: 1 or 3 (3); others: expected channels")
    parser.add_argument("--seed", type=int, default=0, help="shapes and sample order (0)")
    parser.add_argument("--split", choices=["train", "test"], help="CIFAR-10 python archive split (train)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT_DIR")
    return parser.parse_args(argv)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"prepare: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            manifest = prepare(args.source, args.out_dir, args.shard_size, num=args.num, image_size=args.image_size,
                               channels=args.channels, seed=args.seed, split=args.split,
                               shard_format=args.shard_format, images_per_member=args.images_per_member,
                               overwrite=args.overwrite)
        except DataError as exn:
            print(f"prepare: error: {exn}".replace("\n", " "), file=sys.stderr)
            return 2
    size, channels = manifest["image_size"], manifest["channels"]
    print(f"wrote {manifest['num_samples']} samples ({size}x{size}x{channels}, {len(manifest['classes'])} classes) "
          f"in {len(manifest['shards'])} {manifest['shard_format']} shards to {args.out_dir}; "
          f"skipped {manifest['skipped']} undecodable files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
