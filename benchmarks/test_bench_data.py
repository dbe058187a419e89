"""Data loading throughput: webdataset shards -> decoded uint8 batches, with 0 and 2 worker processes."""

import itertools

import pytest

from engine.data import build_train_loader
from engine.data.prepare import prepare


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-data") / "shapes"
    prepare("shapes", out, shard_size=256, num=1024, image_size=32, channels=3, seed=0, progress=False)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_throughput(benchmark, shards, num_workers):
    batch, batches_per_round = 64, 16
    loader = iter(build_train_loader(shards, batch_size=batch, image_size=32, channels=3, num_workers=num_workers,
                                     shuffle_buffer=256, seed=0))
    next(loader)  # start the workers outside the timing

    def take():
        return sum(b["image"].shape[0] for b in itertools.islice(loader, batches_per_round))

    benchmark.group = "data_loading"
    benchmark.extra_info["images_per_round"] = batch * batches_per_round
    assert benchmark.pedantic(take, rounds=3, iterations=1) == batch * batches_per_round
