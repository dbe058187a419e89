"""Write a data set as webdataset shards plus a manifest, once, before training.

    python -m engine.data.prepare SOURCE OUT_DIR [--shard-size N] [--num N] [--image-size S]
                                  [--channels C] [--seed S] [--split train|test] [--overwrite]

SOURCE is an image folder `root/<class>/<image>`, a .tar/.tar.gz/.tgz of one, the official CIFAR-10
python archive, or the word `shapes` (see engine.data.sources). OUT_DIR receives
`shard-000000.tar, ...`, each sample stored as `<key>.png|jpg` plus `<key>.cls` (the label as ASCII
text), and `manifest.json`, which the loader reads:

    {"format": 1, "source", "kind", "num_samples", "image_size", "channels", "classes", "skipped",
     "shards": [{"name", "num_samples", "sha256"}]}

A shard gets its final name only when complete and the manifest is written last, so a crash never
leaves a manifest that points at half-written shards. Files that do not decode are skipped with a
warning and counted in "skipped"; images of another size or channel count than the rest are an
error, since training needs one shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import webdataset as wds

from engine.checkpoint import atomic_write
from engine.data import DataError
from engine.data.sources import Source, decode_image, encode_png, open_source
from engine.progress import progress_bar

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000
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
    return manifest


# ----------------------------------------------------------------------------- shards


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class _ShardWriter:
    """Numbered shards of at most `shard_size` samples. A shard is written under a partial name and
    renamed when complete; `shards` lists the completed ones for the manifest."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self._file = self._tar = None
        self._count = 0

    def _path(self) -> Path:
        return self.out_dir / SHARD_PATTERN.format(len(self.shards))

    def write(self, key: str, data: bytes, ext: str, label: int) -> None:
        if self._tar is None:
            self._file = open(self._path().with_suffix(".tar" + _PARTIAL_SUFFIX), "wb")
            # encoder=False: store our bytes as they are; a fixed mtime makes shards reproducible
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._tar.write({"__key__": key, ext: data, "cls": str(label).encode("ascii")})
        self._count += 1
        if self._count == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is None:
            return
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


def _write_sample(sample, writer: _ShardWriter, expected: dict) -> int:
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
    data, ext = (sample.data, sample.ext) if sample.ext in _STORED_EXTENSIONS else (encode_png(image), "png")
    writer.write(sample.key, data, ext, sample.label)
    return 0


def prepare(source: str | Path, out_dir: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, *,
            num: int | None = None, image_size: int | None = None, channels: int | None = None,
            seed: int = 0, split: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `source` as shards plus manifest.json into `out_dir` and return the manifest.

    `num` limits the samples (for `shapes`: how many to make); `image_size` and `channels` configure
    `shapes` and, for other sources, are checked against the images; `seed` drives the shapes and
    the sample order of image folders; `split` picks the CIFAR-10 split (default train).
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, not {shard_size}")
    opened = open_source(source, num=num, image_size=image_size, channels=channels, seed=seed, split=split)
    out_dir = Path(out_dir)
    _make_room(out_dir, overwrite)
    expected = {"image_size": image_size, "channels": channels, "set_by": "--image-size and --channels say"}
    writer = _ShardWriter(out_dir, shard_size)
    try:
        skipped = _write_samples(opened, writer, expected, progress)
        if not writer.shards:
            raise DataError(f"{source}: none of its {opened.total} images decode")
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(source),
        "kind": opened.kind,
        "num_samples": sum(shard["num_samples"] for shard in writer.shards),
        "image_size": expected["image_size"],
        "channels": expected["channels"],
        "classes": opened.classes,
        "skipped": skipped,
        "shards": writer.shards,
    }
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
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
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
                               channels=args.channels, seed=args.seed, split=args.split, overwrite=args.overwrite)
        except DataError as exn:
            print(f"prepare: error: {exn}".replace("\n", " "), file=sys.stderr)
            return 2
    size, channels = manifest["image_size"], manifest["channels"]
    print(f"wrote {manifest['num_samples']} samples ({size}x{size}x{channels}, {len(manifest['classes'])} classes) "
          f"in {len(manifest['shards'])} shards to {args.out_dir}; skipped {manifest['skipped']} undecodable files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
