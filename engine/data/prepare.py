"""Write a data set as webdataset shards plus a manifest, once, before training.

    python -m engine.data.prepare SOURCE OUT_DIR [--source folder|tar|zip|cifar10|lmdb|hf|parquet|shapes]
                                  [--image-size S] [--crop center|random] [--channels 1|3|4]
                                  [--background white|black] [--workers K] [--num N] [--seed S]
                                  [--split train|test] [--image-column NAME] [--label-column NAME]
                                  [--format png|array] [--shard-size N] [--images-per-member N]
                                  [--overwrite]

SOURCE is an image folder `root/<class>/<image>` (or flat, all images in `root`: one class), a
.tar/.tar.gz/.tgz or .zip of one, the official CIFAR-10 python archive, an LMDB folder of encoded
images (LSUN), a Hugging Face `save_to_disk` folder or parquet file(s), or the word `shapes` (see
engine.data.sources and engine.data.table_sources; `--source` names the kind instead of detecting
it). OUT_DIR receives `shard-000000.tar, ...` and `manifest.json`, which the loader reads.

Every image is made to fit (engine.data.transforms): EXIF rotation applied; converted to
`--channels` (default 1 when the first image is gray, else 3; RGBA only when asked for, other
transparent images composited on `--background`, white by default; 16-bit gray scaled to 8 bit);
with `--image-size S`, the shorter side resized to S (box-filter halvings, then bicubic) and an
S x S square cropped, `--crop center` or `random` (seeded by `--seed` and the sample's index).
Without `--image-size`, every image must already be square and of the first image's size. Smaller
images are upsampled, and counted in one warning. `--workers K` processes do this (default
min(8, CPUs); 1 for sources under 500 images); the shards are the same for any K. The shards
come in two formats:

- png (default): one sample per key, `<key>.png|jpg` (the encoded image: PNG and JPEG files that
  needed no change keep their bytes, others are stored as PNG) plus `<key>.cls` (the label as
  ASCII text). Small on disk; the loader decodes every image.
- array: decode-free. Each key holds a block of up to `images_per_member` images as one numpy
  array, `<key>.images.npy` uint8 (N, C, H, W), and their labels, `<key>.labels.npy` int64 (N,).
  Raw pixels (CIFAR-10: 150 MB), but loading is a memory copy instead of a PNG decode per image.

    {"format": 1, "shard_format": "png"|"array", "source", "kind", "num_samples", "image_size",
     "channels", "classes", "resize": {"image_size", "crop", "background"}, "skipped", "upsampled",
     "shards": [{"name", "num_samples", "sha256"}]}
    (+ "images_per_member" for array shards; a manifest without "shard_format" is png)

"num_samples" counts images in both formats; "resize.image_size" is null when sizes were kept.

A shard gets its final name only when complete and the manifest is written last, so a crash never
leaves a manifest that points at half-written shards. Files that do not decode are skipped with a
warning each and counted in "skipped"; without --image-size, images of another size than the rest
are an error, since training needs one shape.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from engine import cli
from engine.atomic_files import atomic_write
from engine.data import DataError
from engine.data.remote import is_url, join, read_bytes
from engine.data.sources import SOURCE_KINDS, Source, SourceSample, open_source
from engine.data.transforms import (BACKGROUNDS, CHANNEL_MODES, CROPS, FitSpec, FittedImage, fit_sample,
                                    natural_channels)
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
_CHUNK_SIZE = 16  # images a worker process fits per task
_CHANNEL_PEEK = 32  # without --channels: a set is gray when this many first images that decode are all gray
_POOL_MIN_IMAGES = 500  # sources smaller than this are fitted in this process unless --workers says otherwise


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of a prepared data set; `path` is its folder or its manifest.json, or a URL of
    either (see engine.data.remote: http(s)://, s3:// and other fsspec schemes, pipe:COMMAND)."""
    if is_url(path):
        file = join(path, MANIFEST_NAME)
        text = read_bytes(file)  # DataError naming the URL when it cannot be read
    else:
        path = Path(path)
        file = path if path.suffix == ".json" else path / MANIFEST_NAME
        if not file.is_file():
            raise DataError(f"no prepared data set at {path} ({file} is missing); write one with "
                            f"`python -m engine.data.prepare SOURCE {path}` (SOURCE: shapes, a folder or a tar.gz)")
        text = file.read_bytes()
    try:
        manifest = json.loads(text)
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
            # imported here: webdataset imports torch (seconds), which the worker processes, that import
            # this module as their main, need not pay for
            import webdataset as wds

            self._file = open(self._path().with_suffix(".tar" + _PARTIAL_SUFFIX), "wb")
            # encoder=False: store our bytes as they are; a fixed mtime makes shards reproducible
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._tar.write(members)

    def _add(self, sample: SourceSample, fitted: FittedImage) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """Writes out what the current shard still buffers."""

    def write(self, sample: SourceSample, fitted: FittedImage) -> None:
        """Adds one checked sample, fitted to the data set's shape."""
        self._add(sample, fitted)
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

    def _add(self, sample: SourceSample, fitted: FittedImage) -> None:
        self._write_member({"__key__": sample.key, fitted.ext: fitted.data, "cls": str(sample.label).encode("ascii")})


class _ArrayShardWriter(_ShardWriter):
    """Blocks of images per key: `<key>.images.npy` uint8 (N, C, H, W) and `<key>.labels.npy` int64 (N,).
    Keys are `<shard number>_<block number>`; a block never spans two shards."""

    def __init__(self, out_dir: Path, shard_size: int, images_per_member: int | None):
        super().__init__(out_dir, shard_size)
        self.images_per_member = images_per_member  # None: chosen from the first image's size
        self._images: list[np.ndarray] = []
        self._labels: list[int] = []
        self._blocks_in_shard = 0

    def _add(self, sample: SourceSample, fitted: FittedImage) -> None:
        image = fitted.pixels
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


def _check_shape(image: np.ndarray, origin: str, expected: dict) -> None:
    height, width, channels = image.shape
    if height != width:
        raise DataError(f"{origin}: image is {width}x{height}; training needs square images of one size: "
                        "pass --image-size N to resize and crop every image to N x N")
    if (height, channels) != (expected["image_size"], expected["channels"]):
        raise DataError(f"{origin}: image is {width}x{height}x{channels}, but {expected['set_by']} "
                        f"{expected['image_size']}x{expected['image_size']}x{expected['channels']}; "
                        "all images of a data set must share size and channel count: pass --image-size N "
                        "to resize them all")


def _windows(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while window := list(itertools.islice(iterator, size)):
        yield window


def _fitted(samples: Iterable[SourceSample], spec: FitSpec, workers: int
            ) -> Iterator[tuple[SourceSample, FittedImage | str]]:
    """Each sample with its fitted image, or why it was skipped, in the source's order. With several
    workers, windows of samples go to a process pool: one window is fitted while the previous one's
    results are written, and no more than two are ever held (a pool's imap alone would read the
    whole source ahead into memory). A sample's result depends on its index alone, not on the
    worker that made it, so the shards are the same for any number of workers."""
    fit = functools.partial(fit_sample, spec)
    indexed = enumerate(samples)
    if workers == 1:
        yield from ((sample, fit((index, sample.data))) for index, sample in indexed)
        return
    # forkserver: a fork of a process holding threads (torch, a progress bar) can deadlock
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for window in _windows(indexed, workers * _CHUNK_SIZE * 4):
            results = pool.imap(fit, [(index, sample.data) for index, sample in window], _CHUNK_SIZE)
            pending.append(([sample for _, sample in window], results))
            if len(pending) == 2:
                yield from zip(*pending.popleft())
        while pending:
            yield from zip(*pending.popleft())


def _write_samples(source: Source, samples: Iterable[SourceSample], spec: FitSpec, writer: _ShardWriter,
                   workers: int, progress: bool) -> tuple[int, int, int]:
    """Fits, checks and writes every sample; returns how many were skipped as unreadable, how many
    were upsampled, and the image size."""
    expected = {"image_size": spec.image_size, "channels": spec.channels, "set_by": "--image-size says"}
    skipped = upsampled = 0
    with progress_bar(total=source.total, unit="img", desc=f"prepare {source.kind}", disable=not progress) as bar:
        for sample, fitted in _fitted(samples, spec, workers):
            bar.update()
            if isinstance(fitted, str):
                warnings.warn(f"skipping {sample.origin}: {fitted}", stacklevel=3)
                skipped += 1
                continue
            if expected["image_size"] is None:  # the first image that decodes sets the size for the rest
                expected["image_size"] = fitted.pixels.shape[0]
                expected["set_by"] = f"the first image ({sample.origin}) is"
            _check_shape(fitted.pixels, sample.origin, expected)
            writer.write(sample, fitted)
            upsampled += fitted.upsampled
    writer.finish_shard()
    return skipped, upsampled, expected["image_size"]


def _channels(source: Source, channels: int | None) -> tuple[int, Iterable[SourceSample]]:
    """The channel count (asked for; made by the source; else 1 if the first images that decode are
    all gray, 3 if not) and the samples, none lost to looking at the first."""
    if channels is not None or source.channels is not None:
        return channels or source.channels, source.samples
    samples, looked, found = iter(source.samples), [], []
    for sample in samples:
        looked.append(sample)
        channels = natural_channels(sample.data)
        found += [channels] if channels else []
        if len(found) == _CHANNEL_PEEK or 3 in found:  # one colour image makes the set colour
            break
    return (1 if found and set(found) == {1} else 3), itertools.chain(looked, samples)


def _check_options(shard_size: int, shard_format: str, images_per_member: int | None, image_size: int | None,
                   channels: int | None, crop: str, background: str, workers: int | None) -> None:
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, not {shard_size}")
    if shard_format not in SHARD_FORMATS:
        raise DataError(f"--format must be one of {', '.join(SHARD_FORMATS)}, not {shard_format!r}")
    if images_per_member is not None and shard_format != "array":
        raise DataError("--images-per-member applies to --format array only")
    if images_per_member is not None and images_per_member < 1:
        raise DataError(f"--images-per-member must be at least 1, not {images_per_member}")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size must be at least 1, not {image_size}")
    if channels is not None and channels not in CHANNEL_MODES:
        raise DataError(f"--channels must be 1, 3 or 4, not {channels}")
    if crop not in CROPS or background not in BACKGROUNDS:
        raise DataError(f"--crop must be one of {', '.join(CROPS)} and --background one of "
                        f"{', '.join(BACKGROUNDS)}, not {crop!r} and {background!r}")
    if crop == "random" and image_size is None:
        raise DataError("--crop random needs --image-size (without it, images are not cropped)")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, not {workers}")


def _default_workers(total: int) -> int:
    # below a few hundred images, starting processes costs more than it saves
    return 1 if total < _POOL_MIN_IMAGES else min(8, os.cpu_count() or 1)


def prepare(source: str | Path, out_dir: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, *,
            num: int | None = None, image_size: int | None = None, channels: int | None = None,
            seed: int = 0, split: str | None = None, shard_format: str = "png",
            images_per_member: int | None = None, overwrite: bool = False, progress: bool = True,
            crop: str = "center", background: str = "white", workers: int | None = None,
            source_kind: str | None = None, image_column: str | None = None,
            label_column: str | None = None) -> dict:
    """Write `source` as shards plus manifest.json into `out_dir` and return the manifest.

    `num` limits the samples (for `shapes`: how many to make); `image_size` configures `shapes` and
    resizes and crops (`crop`: center or random) every other image to image_size x image_size;
    without it the first image sets the size. `channels` (1, 3 or 4) is what every image is
    converted to, transparency composited on `background` (white or black). `seed` drives the
    shapes, the sample order and random crops; `split` picks the CIFAR-10 split (default train).
    `workers` processes decode and resize (default: min(8, CPUs); 1 for small sources).
    `source_kind` names the kind of source (engine.data.sources.SOURCE_KINDS) instead of detecting
    it; `image_column` and `label_column` pick a table's columns. `shard_format` is "png" (encoded
    images) or "array" (blocks of raw pixels, see the module doc); `images_per_member` sizes the
    array blocks (default: up to 1000 images, about 4 MB).
    """
    _check_options(shard_size, shard_format, images_per_member, image_size, channels, crop, background, workers)
    opened = open_source(source, num=num, image_size=image_size, channels=channels, seed=seed, split=split,
                         kind=source_kind, image_column=image_column, label_column=label_column)
    out_dir = Path(out_dir)
    _make_room(out_dir, overwrite)
    channels, samples = _channels(opened, channels)
    spec = FitSpec(channels, image_size, crop, background, seed)
    writer = (_ArrayShardWriter(out_dir, shard_size, images_per_member) if shard_format == "array"
              else _PngShardWriter(out_dir, shard_size))
    workers = _default_workers(opened.total) if workers is None else workers
    try:
        skipped, upsampled, size = _write_samples(opened, samples, spec, writer, workers, progress)
        if not writer.shards:
            raise DataError(f"{source}: none of its {opened.total} images decode")
    except BaseException:
        writer.abort()
        raise
    if upsampled:
        warnings.warn(f"{upsampled} images were smaller than {image_size}x{image_size} and were upsampled "
                      "(bicubic): expect them blurred", stacklevel=2)
    manifest = {
        "format": MANIFEST_FORMAT,
        "shard_format": shard_format,
        "source": str(source),
        "kind": opened.kind,
        "num_samples": sum(shard["num_samples"] for shard in writer.shards),
        "image_size": size,
        "channels": channels,
        "classes": opened.classes,
        "resize": {"image_size": image_size, "crop": crop if image_size else None, "background": background},
        "skipped": skipped,
        "upsampled": upsampled,
        "shards": writer.shards,
    }
    if shard_format == "array":
        manifest["images_per_member"] = writer.images_per_member
    atomic_write(out_dir / MANIFEST_NAME, lambda file: file.write((json.dumps(manifest, indent=1) + "\n").encode()))
    return manifest


# ----------------------------------------------------------------------------- command line


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an image folder (root/<class>/<image>, or flat: one class), a .tar/.tar.gz/"
                                       ".tgz or .zip of one, the CIFAR-10 python archive, an LMDB folder, a Hugging "
                                       "Face save_to_disk folder, a .parquet file or folder of them, or 'shapes'")
    parser.add_argument("out_dir", help="folder for shard-*.tar and manifest.json")
    parser.add_argument("--source", choices=SOURCE_KINDS, dest="source_kind",
                        help="the kind of SOURCE, instead of detecting it (an error if SOURCE is not of that kind)")
    parser.add_argument("--num", type=int, help="at most this many samples (shapes: how many to make)")
    parser.add_argument("--seed", type=int, default=0, help="shapes, sample order and random crops (0)")
    parser.add_argument("--split", choices=["train", "test"], help="CIFAR-10 python archive split (train)")
    parser.add_argument("--image-column", help="hf/parquet: the column of encoded images (image, or the only "
                                               "binary column)")
    parser.add_argument("--label-column", help="hf/parquet: the column of labels, integers or strings (label "
                                               "when it holds integers; else one class)")


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int,
                        help="resize (shorter side, antialiased) and crop every image to SxS (shapes: their "
                             "size, 32); without it every image must already be square and of one size")
    parser.add_argument("--crop", choices=CROPS, default="center",
                        help="with --image-size: which square to keep (center; random: seeded by --seed)")
    parser.add_argument("--channels", type=int, choices=sorted(CHANNEL_MODES),
                        help="convert every image to 1 (gray), 3 (RGB) or 4 (RGBA) channels (default: 1 if the "
                             "first image is gray, else 3; shapes: 3)")
    parser.add_argument("--background", choices=list(BACKGROUNDS), default="white",
                        help="what transparent pixels are composited on, unless --channels 4 (white)")
    parser.add_argument("--workers", type=int,
                        help=f"processes that decode and resize (min(8, CPUs); 1 below {_POOL_MIN_IMAGES} images)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.data.prepare", "Write a data set as webdataset shards plus manifest.json.")
    _add_source_options(parser)
    _add_image_options(parser)
    parser.add_argument("--format", choices=SHARD_FORMATS, default="png", dest="shard_format",
                        help="png: encoded images, decoded by the loader (default); array: blocks of raw "
                             "uint8 pixels, nothing to decode (larger on disk, far faster to load)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--images-per-member", type=int,
                        help=f"--format array: images per tar member (default: up to {MAX_IMAGES_PER_MEMBER}, "
                             "about 4 MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT_DIR")
    return parser.parse_args(argv)


def _prepare_command(args: argparse.Namespace) -> None:
    with cli.one_line_warnings("prepare"):
        manifest = prepare(args.source, args.out_dir, args.shard_size, num=args.num, image_size=args.image_size,
                           channels=args.channels, seed=args.seed, split=args.split,
                           shard_format=args.shard_format, images_per_member=args.images_per_member,
                           overwrite=args.overwrite, crop=args.crop, background=args.background,
                           workers=args.workers, source_kind=args.source_kind,
                           image_column=args.image_column, label_column=args.label_column)
    size, channels = manifest["image_size"], manifest["channels"]
    print(f"wrote {manifest['num_samples']} samples ({size}x{size}x{channels}, {len(manifest['classes'])} classes) "
          f"in {len(manifest['shards'])} {manifest['shard_format']} shards to {args.out_dir}; "
          f"skipped {manifest['skipped']} unreadable files, upsampled {manifest['upsampled']} smaller images")


def main(argv: list[str] | None = None) -> int:
    return cli.run(_prepare_command, parse_args(argv), mistakes=(DataError,), label="prepare")


if __name__ == "__main__":
    sys.exit(main())
