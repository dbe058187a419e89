"""Device-resident data (`data.cache: device`): the whole data set as one uint8 tensor on the GPU.

CIFAR-10 is 150 MB as uint8, a fraction of a GPU's memory; holding it there removes the loader from
the training step: no worker processes, no host-to-device copy, no host sync per batch.

    cache = load_device_cache("data/cifar10", image_size=32, channels=3, device="cuda", rank=r, world_size=w)
    batches = cache.batches(batch_size=128, seed=0, start_batch=0)
    batch = next(batches)  # {"image": uint8 (128, 3, 32, 32) on the device, "label": int64 (128,), "skipped": 0}

Loading streams the prepared shards once through `build_train_loader` (a finite pass, any shard
format): each rank reads and holds only its own shards, so the ranks' slices are disjoint and
together hold every sample once. Batches then come from an endless sequence of seeded random
permutations of the held samples, drawn on the device; the flips and the scaling to [-1, 1] stay
in the training step (`kernels.q_sample_uint8`), as with the streaming loader.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.data import DataError
from engine.data.loader import build_train_loader
from engine.data.prepare import read_manifest

_LOAD_BATCH = 1024  # images per batch while loading: large, since nothing is shuffled or trained on
_LABEL_BYTES = 8  # int64


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for the cache on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:  # Linux: what the kernel can hand out without swapping
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:,.0f} {unit}" if unit == "bytes" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024


def _check_fits(path, manifest: dict, device: torch.device, world_size: int) -> None:
    # The rank's share is estimated as an even split: shards are dealt out whole, so one rank may
    # hold a shard more; this refuses only what plainly cannot fit.
    size, channels = manifest["image_size"], manifest["channels"]
    share = math.ceil(manifest["num_samples"] / world_size)
    needed = share * (channels * size * size + _LABEL_BYTES)
    free = _free_bytes(device)
    if free is not None and needed > free:
        of_it = f" ({share:,} of {world_size} ranks' {manifest['num_samples']:,})" if world_size > 1 else ""
        raise DataError(f"the data set at {path} needs {_size(needed)} on {device} for {share:,} images of "
                        f"{size}x{size}x{channels}{of_it}, but {device} has {_size(free)} free; "
                        "stream it instead (drop data.cache: device)")


def load_device_cache(path: str | Path, *, image_size: int, channels: int, device: torch.device | str,
                      rank: int = 0, world_size: int = 1, num_workers: int = 2,
                      shard_slice: slice | None = None, cache_dir: str = "") -> "DeviceCache":
    """Reads this rank's shards of the prepared data set at `path` once and holds them on `device`.

    Rank `rank` of `world_size` gets the shards a finite pass of the streaming loader deals it (no
    process group needed); samples that do not decode are skipped and counted in `skipped`, as the
    loader counts them. Raises DataError before reading anything if the set plainly does not fit
    into the device's free memory, and if this rank receives no images. `path` may be a URL, whose
    shards are streamed; `shard_slice` and `cache_dir`: as the loader's.
    """
    device = torch.device(device)
    manifest = read_manifest(path)
    _check_fits(path, manifest, device, world_size)
    loader = build_train_loader(path, batch_size=_LOAD_BATCH, image_size=image_size, channels=channels,
                                num_workers=num_workers, shuffle_buffer=0, resample=False, rank=rank,
                                world_size=world_size, shard_slice=shard_slice, cache_dir=cache_dir)
    images, labels, skipped = [], [], 0
    for batch in loader:
        # clone: a worker's batch lives in shared memory, and holding thousands of them would
        # hold as many file descriptors
        images.append(batch["image"].clone())
        labels.append(batch["label"])
        skipped += batch["skipped"]
    held = sum(len(chunk) for chunk in labels)
    if held == 0:
        raise DataError(f"rank {rank} of {world_size} received no readable images from {path} "
                        f"({skipped} skipped); prepare the data set again")
    return DeviceCache(torch.cat(images).to(device), torch.cat(labels).to(device), skipped=skipped, rank=rank,
                       source=str(path))


class DeviceCache:
    """One rank's samples on one device: `images` uint8 (N, C, H, W), `labels` int64 (N,).

    `num_samples` is N, `skipped` how many samples were promised by the manifest but skipped while
    loading (they are not held).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, skipped: int = 0, rank: int = 0,
                 source: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (len(images),):
            raise DataError(f"a device cache needs uint8 (N, C, H, W) images and (N,) labels, "
                            f"not {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels = images.contiguous(), labels
        self.skipped, self.rank, self.source = skipped, rank, source

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def describe(self) -> str:
        """One line for the training log."""
        return (f"{self.num_samples:,} images ({_size(self.nbytes)}) held on {self.device} by rank "
                f"{self.rank}, {self.skipped} skipped while loading")

    def batches(self, batch_size: int, *, seed: int, start_batch: int = 0) -> "DeviceBatches":
        """The endless batches of `batch_size` from the seeded sequence of permutations; see DeviceBatches."""
        return DeviceBatches(self, batch_size, seed=seed, start_batch=start_batch)


class DeviceBatches:
    """Endless training batches {"image": uint8 (B, C, H, W), "label": int64 (B,), "skipped": 0} on the
    cache's device, with no DataLoader and no host sync.

    The stream is the concatenation of permutations of the N held samples, one per epoch, each drawn
    on the device with a generator seeded from (seed, rank, epoch); batch k takes positions
    [k B, (k + 1) B) of it. So every epoch visits every held sample exactly once, and nothing is
    dropped: when B does not divide N, a batch straddles two epochs (the tail of one permutation and
    the head of the next, so such a batch may hold a sample twice).

    Resuming: start_batch=k yields exactly batches k, k+1, ... of the sequence started at 0 with the
    same held samples (data set, rank and world size), batch size and seed, on the same kind of device
    (CPU and CUDA draw different permutations). Pass the number of batches already trained on (steps
    x micro-batches per step) and a resumed run continues the uninterrupted run's sequence instead of
    replaying its first batches; reaching batch k costs one permutation, not k batches.
    """

    def __init__(self, cache: DeviceCache, batch_size: int, *, seed: int, start_batch: int = 0):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, not {batch_size}")
        if start_batch < 0:
            raise DataError(f"start_batch must be at least 0, not {start_batch}")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.epoch, self._offset = divmod(start_batch * batch_size, cache.num_samples)
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.cache.rank, epoch]).generate_state(1)[0])
        generator = torch.Generator(device=self.cache.device).manual_seed(epoch_seed)
        return torch.randperm(self.cache.num_samples, generator=generator, device=self.cache.device)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        pieces, wanted, held = [], self.batch_size, self.cache.num_samples
        while wanted:  # Python ints only: slicing and indexing on the device never wait for it
            take = min(wanted, held - self._offset)
            pieces.append(self._order[self._offset:self._offset + take])
            self._offset += take
            wanted -= take
            if self._offset == held:
                self.epoch, self._offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return {"image": self.cache.images.index_select(0, index), "label": self.cache.labels.index_select(0, index),
                "skipped": 0}
