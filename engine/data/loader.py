"""The streaming training loader: webdataset shards -> uint8 image batches, built in worker processes.

Per worker the pipeline is, by the manifest's shard format (see engine.data.prepare):

    png:   shard paths -> [split] -> read each tar, group members into samples -> shuffle buffer
           -> decode with PIL -> batch -> DataLoader(batch_size=None)
    array: shard paths -> [split] -> read each tar, group members into blocks -> load each block's
           (N, C, H, W) array and cut it into images -> shuffle buffer -> batch -> DataLoader

The shuffle buffer holds samples in both: encoded ones for png (small, decoded after shuffling),
raw pixels for array. Workers decode and batch, so the main process only receives ready
(B, C, H, W) uint8 tensors: a quarter of the bytes of float32. The training step flips and scales
them on the device, fused into `q_sample_uint8` (kernels/q_sample.py).

Two modes:
- resample=True (training): an endless stream. Every (rank, worker) draws shards with replacement
  from the full list with its own generator, seeded from (seed, rank, worker id); no splitting is
  needed, streams differ and repeat with the seed. A last partial batch never happens.
- resample=False (one pass, e.g. evaluation): shards are shuffled with `seed` (the same order on
  every rank), dealt out to ranks (urls[rank::world_size]) and then to workers, so every sample is
  read exactly once over all ranks x workers. The last partial batch of each worker is kept, so
  ranks may see different numbers of batches. Fewer shards than ranks is an error (a rank without
  data would stall collective ops); fewer shards than ranks x workers only warns (idle workers).

Bad data: a sample whose image does not decode, or that lacks its image or label member, is
skipped with a warning and counted; so are the samples missing from a shard that ends early (the
manifest says how many each shard holds: Python's tarfile reads a shard cut inside a header as
a shorter, valid one, and webdataset's handlers see no error then). In array shards a block that
does not load (corrupt or missing .npy, not uint8 (N, C, H, W) with N integer labels) is skipped
with a warning, and the images a shard delivered short of the manifest's count are counted, so a
bad block counts all its images. Every batch carries in "skipped" the count since its worker's
previous batch; their sum is exactly how many samples were promised but not delivered. An image
(or block) of the wrong size or channel count is a configuration mistake and raises DataError
naming shard and key.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from engine.data import DataError
from engine.data.prepare import read_manifest
from engine.data.remote import ShardOpener, is_url, join
from engine.data.sources import IMAGE_EXTENSIONS, decode_image

_IMAGE_MEMBERS = sorted(set(IMAGE_EXTENSIONS.values()) | {"jpeg"})
_MAX_WARNINGS = 20  # per worker; later skips are still counted
_MAX_SKIPS_IN_A_ROW = 1000  # skip events without a good sample between: the data is broken, not a few files


# ----------------------------------------------------------------------------- model input


def random_flip_mask(batch_size: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Which samples of a batch to flip: one Bernoulli(1/2) draw per sample, as a bool tensor."""
    return torch.rand(batch_size, generator=generator, device=device) < 0.5


# ----------------------------------------------------------------------------- pipeline stages


class _SkipCounter:
    """Counts skipped samples in one worker (each worker holds its own copy) and warns about them."""

    def __init__(self):
        self.pending = 0  # skipped since the last batch
        self.in_a_row = 0  # problems since the last good sample
        self.warned = 0

    def warn(self, message: str) -> None:
        if self.warned < _MAX_WARNINGS:
            self.warned += 1
            more = " (further problems in this worker are counted silently)" if self.warned == _MAX_WARNINGS else ""
            warnings.warn(message + more, stacklevel=3)

    def skip(self, message: str, count: int = 1) -> None:
        self.pending += count
        self.in_a_row += 1
        if self.in_a_row > _MAX_SKIPS_IN_A_ROW:
            raise DataError(f"{self.in_a_row} problems in a row without one good sample (last: {message}); "
                            "the shards look broken: prepare the data set again")
        self.warn(f"skipping {message}")

    def good(self) -> None:
        self.in_a_row = 0

    def take(self) -> int:
        taken, self.pending = self.pending, 0
        return taken


class _Position:
    """How many samples one worker has taken from its (seeded, shuffled) stream: where a resume restarts it.

    A worker serves the stream `stream()`: its DataLoader worker id turned by `first_worker`. The DataLoader
    takes batches from its workers in turn, always starting with worker 0; a resumed run whose next batch was
    due from stream k (not 0) turns the ids by k, so that the streams' batches keep their interleaving."""

    def __init__(self, start: list[int] | None, first_worker: int = 0, num_workers: int = 1):
        self.start = start  # per stream: samples to pass over before the first batch
        self.first_worker, self.num_workers = first_worker, max(num_workers, 1)
        self.taken = 0

    def stream(self) -> int:
        return (_worker_id() + self.first_worker) % self.num_workers


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _resume_at(samples, position: _Position):
    """Count the stream's samples, passing over the first start[worker] (taken before a resume).

    It sits after the shuffle buffer and before decoding, so a resume replays the reading and the
    shuffling (cheap) but decodes nothing it skips."""
    skip = position.start[position.stream()] if position.start else 0
    for index, sample in enumerate(samples):
        position.taken = index + 1
        if index >= skip:
            yield sample


def _worker_seed(seed: int, rank: int, purpose: int, position: _Position) -> int:
    """A seed of its own for every (seed, rank, worker's stream, purpose)."""
    return int(np.random.SeedSequence([seed, rank, position.stream(), purpose]).generate_state(1)[0])


def _split_by_rank(urls, rank: int, world_size: int):
    # wds.split_by_node reads the rank from RANK/WORLD_SIZE or an initialised torch.distributed and
    # otherwise gives every rank all shards; an explicit rank cannot go wrong that way.
    yield from islice(urls, rank, None, world_size)


def _shard_members(url: str, opener: ShardOpener, skips: _SkipCounter):
    """The tar members of one shard (a path or URL) grouped by key, via webdataset's tar reader; read
    errors warn (the callers count what a shard failed to deliver)."""

    def tar_error(exn: Exception) -> bool:  # a webdataset handler: warn and go on
        skips.warn(f"shard {url}: {exn.args[0] if exn.args else repr(exn)}")
        return True

    try:
        with opener.open(url) as stream:  # closed as soon as the shard is read
            files = tar_file_expander([{"url": url, "stream": stream}], handler=tar_error)
            yield from group_by_keys(files, handler=tar_error)
    except OSError as exn:  # also a broken download, or curl's or a pipe: command's failing exit status
        skips.warn(f"shard {url}: {exn}")


def _read_encoded_shards(shards, num_samples: dict[str, int], opener: ShardOpener, skips: _SkipCounter):
    """Samples (one image each) of png shards; what a shard lacks is counted as skipped."""
    for shard in shards:
        url, read = shard["url"], 0
        for sample in _shard_members(url, opener, skips):
            read += 1
            yield sample
        if read < num_samples[url]:
            skips.skip(f"{num_samples[url] - read} samples of shard {url}: it ended after {read} of "
                       f"{num_samples[url]} (truncated?)", count=num_samples[url] - read)


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # no pickles: a shard must not run code


def _load_block(block: dict, image_size: int, channels: int, skips: _SkipCounter):
    """A block's uint8 (N, C, H, W) images and int64 (N,) labels, or None (warned) if it does not load."""
    where = f"shard {block.get('__url__')}, block {block.get('__key__')}"
    lacking = [member for member in ("images.npy", "labels.npy") if member not in block]
    if lacking:
        skips.warn(f"skipping {where}: it lacks its .{lacking[0]} member")
        return None
    try:
        images, labels = _load_npy(block["images.npy"]), _load_npy(block["labels.npy"])
    except Exception as exn:  # numpy raises ValueError, EOFError, ... for broken bytes
        skips.warn(f"skipping {where}: {exn}")
        return None
    if (images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or labels.dtype.kind not in "iu"
            or len(labels) != len(images)):
        skips.warn(f"skipping {where}: images {images.dtype} {images.shape} with labels {labels.dtype} "
                   f"{labels.shape} are not uint8 (N, C, H, W) with N integer labels")
        return None
    if images.shape[1:] != (channels, image_size, image_size):
        _, found, height, width = images.shape
        raise DataError(f"{where}: images are {width}x{height}x{found}, expected "
                        f"{image_size}x{image_size}x{channels} (data.image_size, data.channels)")
    return images, labels.astype(np.int64)


def _read_array_shards(shards, num_samples: dict[str, int], opener: ShardOpener, image_size: int,
                       channels: int, skips: _SkipCounter):
    """(uint8 (C, H, W) image, label) per image of array shards. Images a shard delivers short of the
    manifest's count (bad blocks, truncation) are counted as skipped when the shard ends."""
    for shard in shards:
        url, delivered = shard["url"], 0
        for block in _shard_members(url, opener, skips):
            loaded = _load_block(block, image_size, channels, skips)
            if loaded is None:
                continue
            images, labels = loaded
            delivered += len(labels)
            skips.good()
            # a copy per image: views would keep a whole block alive while any of its images waits
            # in the shuffle buffer, many times the buffer's own size for blocks of few, large images
            yield from ((image.copy(), label) for image, label in zip(images, labels.tolist()))
        if delivered < num_samples[url]:
            skips.skip(f"{num_samples[url] - delivered} images of shard {url}: it delivered {delivered} of "
                       f"{num_samples[url]} (bad blocks or truncated)", count=num_samples[url] - delivered)


def _seeded_shuffle(samples, size: int, seed: int, rank: int, position: _Position):
    # the worker id is only known inside the worker, so the seed is made here rather than up front
    yield from wds.shuffle(size, seed=_worker_seed(seed, rank, 1, position))(samples)


def _decode_one(sample: dict, image_size: int, channels: int, skips: _SkipCounter):
    where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')}"
    image_member = next((name for name in _IMAGE_MEMBERS if name in sample), None)
    if image_member is None or "cls" not in sample:
        skips.skip(f"{where}: it lacks its {'image' if image_member is None else '.cls label'} member")
        return None
    try:
        label = int(sample["cls"])
        image = decode_image(sample[image_member])
    except Exception as exn:  # Pillow raises many types for broken files
        skips.skip(f"{where}: {exn}")
        return None
    if image.shape != (image_size, image_size, channels):
        height, width, found = image.shape
        raise DataError(f"{where}: image is {width}x{height}x{found}, expected "
                        f"{image_size}x{image_size}x{channels} (data.image_size, data.channels)")
    skips.good()
    return image.transpose(2, 0, 1), label  # a (C, H, W) view; the batch's np.stack makes it contiguous


def _decode_samples(samples, image_size: int, channels: int, skips: _SkipCounter):
    for sample in samples:
        decoded = _decode_one(sample, image_size, channels, skips)
        if decoded is not None:
            yield decoded


def _batch_dict(images: np.ndarray, labels: list[int], skipped: int, position: _Position) -> dict:
    # worker and position: the main process keeps the latest per worker for the checkpoint
    return {"image": torch.from_numpy(images), "label": torch.tensor(labels, dtype=torch.int64), "skipped": skipped,
            "worker": position.stream(), "position": position.taken}


class _Collate:
    """Stacks (C, H, W) samples into a batch that carries the skip count since the previous batch."""

    def __init__(self, skips: _SkipCounter, position: _Position):
        self.skips, self.position = skips, position

    def __call__(self, samples: list) -> dict:
        # numpy copies into one contiguous (B, C, H, W) array, also from the png path's transposed
        # views (out= keeps it C-contiguous): torch's multi-threaded uint8 permute was 50x slower on 2 cores
        images = np.empty((len(samples), *samples[0][0].shape), np.uint8)
        np.stack([image for image, _ in samples], out=images)
        return _batch_dict(images, [label for _, label in samples], self.skips.take(), self.position)


def _batched(samples, batch_size: int, collate, partial: bool):
    """Batches of `batch_size`, collated as soon as the last one arrives. (wds.batched pulls the next
    sample before collating, which would put a batch's stream position one sample too far.)"""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


def _flush_skips(batches, skips: _SkipCounter, position: _Position, image_size: int, channels: int):
    yield from batches
    if skips.pending:  # skips after the last sample of a finite pass: an empty batch reports them
        yield _batch_dict(np.zeros((0, channels, image_size, image_size), np.uint8), [], skips.take(), position)


def _hand_over_errors(batches):
    # A DataError leaves the worker as a batch and is raised again by _Batches in the main process:
    # torch would re-raise it with the worker's traceback folded into the message, and keep the
    # DataLoader alive in a reference cycle whose collection waits 5 s per worker.
    try:
        yield from batches
    except DataError as exn:
        yield {"error": str(exn)}


class _Batches:
    """The DataLoader's batches, raising here the DataErrors that its workers handed over."""

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader

    def __iter__(self) -> Iterator[dict]:
        for batch in self.dataloader:
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch


# ----------------------------------------------------------------------------- building


def _shard_paths(path: str | Path, manifest: dict) -> dict[str, dict]:
    """{shard location (absolute path, or URL): its manifest entry}. A URL's shards are not looked for
    here: one that cannot be read counts its samples as skipped when the loader gets to it."""
    if not manifest["shards"]:
        raise DataError(f"the manifest of {path} lists no shards; prepare the data set again")
    if is_url(path):
        return {join(path, shard["name"]): shard for shard in manifest["shards"]}
    directory = Path(path)
    directory = directory.parent if directory.suffix == ".json" else directory
    shards = {os.path.abspath(directory / shard["name"]): shard for shard in manifest["shards"]}
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise DataError(f"{len(missing)} shards listed in the manifest of {directory} are missing, "
                        f"e.g. {missing[0]}; prepare the data set again")
    return shards


def _check_request(manifest: dict, path, *, image_size: int, channels: int, batch_size: int, rank: int,
                   world_size: int) -> None:
    if (manifest["image_size"], manifest["channels"]) != (image_size, channels):
        size, found = manifest["image_size"], manifest["channels"]
        raise DataError(f"the data set at {path} holds {size}x{size}x{found} images, but the config asks for "
                        f"{image_size}x{image_size}x{channels} (data.image_size, data.channels)")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")


def _check_finite_split(num_shards: int, world_size: int, num_workers: int) -> None:
    if num_shards < world_size:
        raise DataError(f"{num_shards} shards cannot give each of {world_size} ranks shards of its own; "
                        "prepare the data set with a smaller --shard-size")
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        warnings.warn(f"{num_shards} shards for {readers} readers (ranks x workers): some workers will idle; "
                      "a smaller --shard-size gives more shards", stacklevel=3)


def _shard_stages(urls: list[str], *, resample: bool, seed: int, rank: int, world_size: int,
                  position: _Position) -> list:
    if resample:
        worker_seed = functools.partial(_worker_seed, seed, rank, 0, position)
        return [wds.ResampledShards(urls, worker_seed=worker_seed, deterministic=True)]
    return [wds.SimpleShardList(urls, seed=seed),  # the same shuffled order on every rank and worker
            functools.partial(_split_by_rank, rank=rank, world_size=world_size),
            wds.split_by_worker]


def _build_pipeline(shards: dict[str, int], *, shard_format: str, batch_size: int, image_size: int, channels: int,
                    shuffle_buffer: int, seed: int, resample: bool, rank: int, world_size: int,
                    opener: ShardOpener, start: list[int] | None = None, first_worker: int = 0,
                    num_workers: int = 1) -> wds.DataPipeline:
    """The per-worker pipeline over {shard location: number of samples} in `shard_format` ("png" or
    "array"), yielding batch dicts (see build_train_loader); `opener` opens the shards."""
    skips, position = _SkipCounter(), _Position(start, first_worker, num_workers)
    stages = _shard_stages(list(shards), resample=resample, seed=seed, rank=rank, world_size=world_size,
                           position=position)
    shuffle = functools.partial(_seeded_shuffle, size=shuffle_buffer, seed=seed, rank=rank, position=position)
    if shard_format == "array":
        stages.append(functools.partial(_read_array_shards, num_samples=shards, opener=opener,
                                        image_size=image_size, channels=channels, skips=skips))
        if shuffle_buffer > 1:
            stages.append(shuffle)
        stages.append(functools.partial(_resume_at, position=position))
    else:
        stages.append(functools.partial(_read_encoded_shards, num_samples=shards, opener=opener, skips=skips))
        if shuffle_buffer > 1:  # shuffle before decoding: the buffer then holds small encoded images
            stages.append(shuffle)
        stages.append(functools.partial(_resume_at, position=position))
        stages.append(functools.partial(_decode_samples, image_size=image_size, channels=channels, skips=skips))
    stages += [
        functools.partial(_batched, batch_size=batch_size, collate=_Collate(skips, position), partial=not resample),
        functools.partial(_flush_skips, skips=skips, position=position, image_size=image_size, channels=channels),
        _hand_over_errors,
    ]
    return wds.DataPipeline(*stages)


def build_train_loader(path: str | Path, *, batch_size: int, image_size: int, channels: int, num_workers: int = 2,
                       shuffle_buffer: int = 1000, seed: int = 0, resample: bool = True, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False, start: list[int] | None = None,
                       shard_slice: slice | None = None, cache_dir: str = "", first_worker: int = 0) -> Iterable[dict]:
    """Batches {"image": uint8 (B, C, H, W), "label": int64 (B,), "skipped": int} from a prepared data set.

    `path` is the folder written by `python -m engine.data.prepare`, in either shard format (the
    manifest says which), or its URL (engine.data.remote: http(s)://, s3:// and other fsspec schemes,
    pipe:COMMAND), whose shards are streamed and, with `cache_dir`, also kept there for later reads.
    `batch_size` is per rank. resample=True streams forever (training); resample=False reads every
    sample once over all ranks.

    Every batch also names its `worker` and that worker's `position` (samples taken from its stream
    so far). `start`, one position per worker (as a checkpoint recorded them), resumes each worker's
    stream there, and `first_worker` (the `worker` due after the last batch taken) keeps the workers'
    batches in their turn: with the same seed, rank, world size and worker count the batches continue
    exactly. `shard_slice` selects some of the manifest's shards, in its order (training leaves eval.val_shards out).
    """
    if start is not None and len(start) != max(num_workers, 1):
        raise DataError(f"a resume position needs one entry per loader worker ({max(num_workers, 1)}), got {len(start)}")
    if not 0 <= first_worker < max(num_workers, 1) or (first_worker and not resample):
        raise DataError(f"first_worker {first_worker} must be a worker of {max(num_workers, 1)} of a resampled stream")
    manifest = read_manifest(path)
    _check_request(manifest, path, image_size=image_size, channels=channels, batch_size=batch_size, rank=rank,
                   world_size=world_size)
    shards = _shard_paths(path, manifest)
    if shard_slice is not None:
        shards = dict(list(shards.items())[shard_slice])
        if not shards:
            raise DataError(f"no shards of {path} remain in {shard_slice} of its {len(manifest['shards'])}")
    if not resample:
        _check_finite_split(len(shards), world_size, num_workers)
    num_samples = {location: shard["num_samples"] for location, shard in shards.items()}
    dataset = _build_pipeline(num_samples, shard_format=manifest["shard_format"], batch_size=batch_size,
                              image_size=image_size, channels=channels, shuffle_buffer=shuffle_buffer, seed=seed,
                              resample=resample, rank=rank, world_size=world_size,
                              opener=ShardOpener(shards, cache_dir), start=start, first_worker=first_worker,
                              num_workers=num_workers)
    # batch_size=None: the workers already batch; collating single samples here would be far slower
    # Its own generator: the DataLoader's per-iterator seed must not come from (and move) the global
    # generator that dropout draws from, or a resumed run's dropout would drift from the original's.
    return _Batches(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                               generator=torch.Generator().manual_seed(seed),
                               # pinned batches let the step's non_blocking copy to the GPU overlap, not wait
                               persistent_workers=num_workers > 0, pin_memory=pin_memory))
