"""Data loading throughput, one group to compare within a run: the streaming loader over png shards
(a PIL decode per image) and over array shards (blocks of raw pixels, nothing to decode), with 0
and 2 worker processes, and batches from the device-resident cache (`data.cache: device`).

The same 1024 shapes of 32x32x3 in shards of 256, resampled and shuffled as in training; a round
is 16 batches of 64. extra_info `images_per_sec` (from the median round) when timed, i.e. not
under --benchmark-disable.
"""

import itertools

import pytest

from benchmarks.conftest import synchronized
from engine.data import build_train_loader, load_device_cache
from engine.data.prepare import prepare

SIZE, BATCH, BATCHES_PER_ROUND = 32, 64, 16


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict:
    sets = {}
    for shard_format in ("png", "array"):
        sets[shard_format] = tmp_path_factory.mktemp("bench-data") / shard_format
        prepare("shapes", sets[shard_format], shard_size=256, num=1024, image_size=SIZE, channels=3, seed=0,
                shard_format=shard_format, progress=False)
    return sets


def time_rounds(benchmark, take) -> None:
    benchmark.group = "data_loading"
    benchmark.extra_info["images_per_round"] = BATCH * BATCHES_PER_ROUND
    assert benchmark.pedantic(take, rounds=5, iterations=1) == BATCH * BATCHES_PER_ROUND
    if benchmark.stats is not None:  # --benchmark-disable: one untimed call, no statistics
        benchmark.extra_info["images_per_sec"] = BATCH * BATCHES_PER_ROUND / benchmark.stats.stats.median


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shard_format", ["png", "array"])
def test_loader_throughput(benchmark, shard_sets, shard_format, num_workers):
    loader = iter(build_train_loader(shard_sets[shard_format], batch_size=BATCH, image_size=SIZE, channels=3,
                                     num_workers=num_workers, shuffle_buffer=256, seed=0))
    next(loader)  # start the workers outside the timing

    def take():
        return sum(b["image"].shape[0] for b in itertools.islice(loader, BATCHES_PER_ROUND))

    time_rounds(benchmark, take)


def test_device_cache_throughput(benchmark, shard_sets, device):
    cache = load_device_cache(shard_sets["array"], image_size=SIZE, channels=3, device=device, num_workers=0)
    batches = cache.batches(BATCH, seed=0)
    next(batches)

    def take():
        return sum(b["image"].shape[0] for b in itertools.islice(batches, BATCHES_PER_ROUND))

    assert cache.num_samples == 1024 and cache.device.type == device.type
    time_rounds(benchmark, synchronized(take, device))
