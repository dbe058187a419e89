"""The device-resident data set (`data.cache: device`): loading each rank's slice once, and endless
seeded batches drawn on the device.

The sets are 96 procedural shapes (seed 1) in 6 shards of 16, in both shard formats; the expected
samples come from the shapes generator itself, not from the loader under test. The device is the
CPU, except for the host-sync test, which needs CUDA.
"""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from engine.data import DataError, DeviceCache, build_train_loader, iter_shapes, load_device_cache, read_manifest
from engine.data import device_cache
from engine.data.prepare import prepare
from engine.data.sources import encode_png

SIZE, NUM, SEED = 16, 96, 1


@pytest.fixture(scope="module", params=["png", "array"])
def data_set(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"shapes-{request.param}")
    prepare("shapes", out, shard_size=16, num=NUM, image_size=SIZE, channels=3, seed=SEED,
            shard_format=request.param, progress=False)
    return out


@pytest.fixture(scope="module")
def cache(data_set) -> DeviceCache:
    return load_device_cache(data_set, image_size=SIZE, channels=3, device="cpu", num_workers=0)


def load(path, **kwargs) -> DeviceCache:
    return load_device_cache(path, image_size=SIZE, channels=3, device="cpu", **kwargs)


def samples(images: torch.Tensor, labels: torch.Tensor) -> collections.Counter:
    """The multiset of (pixels, label) of uint8 (N, C, H, W) images."""
    return collections.Counter((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels))


def generated_samples() -> collections.Counter:
    """What the prepared sets hold, straight from the shapes generator."""
    return collections.Counter((image.transpose(2, 0, 1).tobytes(), label)
                               for _, image, label in iter_shapes(NUM, SIZE, 3, seed=SEED))


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


def cat(batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


# ----------------------------------------------------------------------------- loading


def test_a_whole_set_is_held_once_as_one_uint8_tensor(cache):
    assert (cache.num_samples, len(cache), cache.skipped) == (NUM, NUM, 0)
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (NUM, 3, SIZE, SIZE)
    assert cache.images.is_contiguous() and cache.labels.dtype == torch.int64
    assert samples(cache.images, cache.labels) == generated_samples()
    assert f"{NUM} images" in cache.describe() and "0 skipped" in cache.describe()


def test_two_ranks_hold_disjoint_slices_that_together_hold_every_sample_once(data_set):
    slices = [load(data_set, rank=rank, world_size=2, num_workers=2) for rank in range(2)]
    assert [s.num_samples for s in slices] == [NUM // 2, NUM // 2]  # 3 shards of 16 each
    held = [samples(s.images, s.labels) for s in slices]
    assert held[0] + held[1] == generated_samples()  # as multisets: nothing twice, nothing missing
    assert not set(held[0]) & set(held[1])


def test_bad_samples_are_skipped_while_loading_and_counted(tmp_path):
    data = tmp_path / "set"
    prepare("shapes", data, shard_size=16, num=32, image_size=SIZE, channels=3, seed=SEED, progress=False)
    good = encode_png(np.zeros((SIZE, SIZE, 3), np.uint8))
    with open(data / "extra.tar", "wb") as file, wds.TarWriter(file, encoder=False) as writer:
        writer.write({"__key__": "fine", "png": good, "cls": b"1"})
        writer.write({"__key__": "garbage", "png": b"no image", "cls": b"2"})
    manifest = read_manifest(data)
    manifest["shards"].append({"name": "extra.tar", "num_samples": 2, "sha256": ""})
    (data / "manifest.json").write_text(json.dumps(manifest | {"num_samples": 34}))
    with pytest.warns(UserWarning, match="garbage"):
        cache = load(data, num_workers=0)
    assert (cache.num_samples, cache.skipped) == (33, 1)


def test_a_set_that_plainly_does_not_fit_is_refused_naming_set_size_and_free_memory(data_set, monkeypatch):
    monkeypatch.setattr(device_cache, "_free_bytes", lambda device: 50_000)
    # 96 images of 16x16x3 (768 bytes) + an 8-byte label each: 74,496 bytes = 72.8 KiB
    pattern = (rf"^the data set at {data_set} needs 72\.8 KiB on cpu for 96 images of 16x16x3, "
               r"but cpu has 48\.8 KiB free; stream it instead")
    with pytest.raises(DataError, match=pattern):
        load(data_set, num_workers=0)
    monkeypatch.setattr(device_cache, "_free_bytes", lambda device: 40_000)
    load(data_set, rank=1, world_size=2, num_workers=0)  # a rank's half fits


# ----------------------------------------------------------------------------- batches


def test_batches_are_uint8_on_the_cache_device_in_the_loaders_format(cache):
    for batch in take(cache.batches(10, seed=0), 12):  # 120 samples of 96: into the second epoch
        assert set(batch) == {"image", "label", "skipped"} and batch["skipped"] == 0
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (10, 3, SIZE, SIZE)
        assert batch["image"].is_contiguous() and batch["image"].device == cache.device
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (10,)


def test_every_epoch_visits_every_held_sample_exactly_once(cache):
    batches = cache.batches(16, seed=0)  # 16 divides 96: an epoch is 6 batches
    held = samples(cache.images, cache.labels)
    first, second = cat(take(batches, 6)), cat(take(batches, 6))
    assert samples(*first) == held and samples(*second) == held
    assert not torch.equal(first[0], second[0])  # each epoch its own order
    assert not torch.equal(first[0], cache.images)  # shuffled, not the stored order


def test_with_a_remainder_batches_straddle_epochs_and_drop_nothing(cache):
    # batch 40 over 96 samples: batches 0, 1 and the first 16 of batch 2 are epoch 0, the rest of
    # batch 2, batch 3 and 32 of batch 4 are epoch 1
    images, labels = cat(take(cache.batches(40, seed=0), 5))
    held = samples(cache.images, cache.labels)
    assert samples(images[:96], labels[:96]) == held
    assert samples(images[96:192], labels[96:192]) == held


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(cache):
    first = cat(take(cache.batches(24, seed=5), 6))
    again = cat(take(cache.batches(24, seed=5), 6))
    other = cat(take(cache.batches(24, seed=6), 6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_ranks_draw_their_own_permutations(cache):
    # the same samples held by two ranks: the rank is part of every epoch's seed
    other_rank = DeviceCache(cache.images, cache.labels, rank=1)
    assert not torch.equal(cat(take(cache.batches(24, seed=5), 4))[0], cat(take(other_rank.batches(24, seed=5), 4))[0])


@pytest.mark.parametrize("start_batch", [1, 2, 5])
def test_starting_at_batch_k_continues_the_sequence_instead_of_replaying_it(cache, start_batch):
    straight = take(cache.batches(40, seed=3), 7)  # epochs end inside batches 2 and 4
    resumed = take(cache.batches(40, seed=3, start_batch=start_batch), 7 - start_batch)
    for expected, got in zip(straight[start_batch:], resumed):
        assert torch.equal(expected["image"], got["image"]) and torch.equal(expected["label"], got["label"])


def test_a_batch_larger_than_the_set_spans_several_epochs(cache):
    images, labels = cat(take(cache.batches(250, seed=0), 1))
    assert images.shape[0] == 250
    assert samples(images[:96], labels[:96]) == samples(images[96:192], labels[96:192]) == samples(cache.images,
                                                                                                  cache.labels)


# ----------------------------------------------------------------------------- same data as streaming


def test_the_cached_set_has_the_pixel_means_and_labels_of_a_streaming_pass(data_set, cache):
    streamed = list(build_train_loader(data_set, batch_size=32, image_size=SIZE, channels=3, num_workers=0,
                                       resample=False))
    stream_images, stream_labels = cat(streamed)
    # sums of uint8 in float64 are exact: the means agree to the last bit
    assert torch.equal(cache.images.double().mean(0), stream_images.double().mean(0))
    assert torch.equal(torch.bincount(cache.labels, minlength=4), torch.bincount(stream_labels, minlength=4))
    epoch_images, _ = cat(take(cache.batches(32, seed=0), 3))  # so does one epoch of batches
    assert torch.equal(epoch_images.double().mean(0), stream_images.double().mean(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_never_sync_with_the_host(data_set):
    cache = load_device_cache(data_set, image_size=SIZE, channels=3, device="cuda", num_workers=0)
    assert cache.images.is_cuda and cache.labels.is_cuda
    batches = cache.batches(40, seed=0)
    next(batches)  # the first permutation and lazy CUDA initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        images, labels = cat(take(batches, 10))  # across epoch boundaries
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and images.shape == (400, 3, SIZE, SIZE)
    assert samples(images[56:152].cpu(), labels[56:152].cpu()) == samples(cache.images.cpu(), cache.labels.cpu())
