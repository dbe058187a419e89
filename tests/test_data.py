"""The data package: procedural shapes, source readers, shard preparation and the streaming loader.

Every data set here is tiny and written by the test itself, except the real CIFAR-10 archive in
../shared/data, which is read in place (only 200 samples) and skipped when absent.
"""

import collections
import contextlib
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import tarfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from engine.data import (SHAPE_CLASSES, DataError, build_train_loader, is_image_path, iter_shapes, make_shape_image,
                         open_images, open_source, random_flip_mask, read_manifest)
from engine.data.prepare import prepare
from kernels.q_sample import images_to_unit_range
from forked_cli import run_module

REPO = Path(__file__).resolve().parents[1]
REAL_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
SIZE = 16  # image size of the test data sets


# ----------------------------------------------------------------------------- helpers


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(rng, size=SIZE, channels=3) -> np.ndarray:
    return rng.integers(0, 256, (size, size, channels), dtype=np.uint8)


def shard_contents(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over all shards of a prepared data set."""
    samples = collections.defaultdict(dict)
    for shard in read_manifest(out_dir)["shards"]:
        with tarfile.open(out_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def add_shard(data_dir: Path, name: str, samples: list[tuple[str, dict]], num_samples: int | None = None) -> None:
    """Appends a hand-made shard ({extension: bytes} per key) to a prepared data set's manifest, as
    holding `num_samples` images (default: one per key, as in png shards)."""
    with open(data_dir / name, "wb") as file, wds.TarWriter(file, encoder=False) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    num_samples = len(samples) if num_samples is None else num_samples
    manifest = read_manifest(data_dir)
    manifest["shards"].append({"name": name, "num_samples": num_samples, "sha256": ""})
    manifest["num_samples"] += num_samples
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def array_block(rng, count: int, size=SIZE, channels=3) -> dict[str, bytes]:
    """The members of one array-shard block of `count` random images."""
    images = rng.integers(0, 256, (count, channels, size, size), dtype=np.uint8)
    return {"images.npy": npy_bytes(images), "labels.npy": npy_bytes(np.arange(count, dtype=np.int64) % 4)}


def npy_member(tar: tarfile.TarFile, name: str) -> np.ndarray:
    return np.load(io.BytesIO(tar.extractfile(name).read()))


def png_set_contents(out_dir: Path) -> tuple[list[np.ndarray], list[int]]:
    """Every image of a png data set as uint8 (C, H, W), and its label, in shard order."""
    images, labels = [], []
    for members in shard_contents(out_dir).values():
        images.append(np.asarray(Image.open(io.BytesIO(members["png"]))).transpose(2, 0, 1))
        labels.append(int(members["cls"]))
    return images, labels


def collect(loader) -> tuple[list[torch.Tensor], int]:
    """All batches of a finite loader, and the total of their skip counts."""
    batches = list(loader)
    return batches, sum(batch["skipped"] for batch in batches)


def as_multiset(images: list[np.ndarray], labels: list[int]) -> collections.Counter:
    return collections.Counter((image.tobytes(), label) for image, label in zip(images, labels))


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    """96 shapes of 16x16x3 in 6 shards of 16."""
    out = tmp_path_factory.mktemp("shapes")
    prepare("shapes", out, shard_size=16, num=96, image_size=SIZE, channels=3, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def array_set(tmp_path_factory) -> Path:
    """The same 96 shapes as shapes_set in array shards of 16, blocks of 6 (6 + 6 + 4 per shard)."""
    out = tmp_path_factory.mktemp("shapes-array")
    prepare("shapes", out, shard_size=16, num=96, image_size=SIZE, channels=3, seed=1, shard_format="array",
            images_per_member=6, progress=False)
    return out


@pytest.fixture(params=["png", "array"])
def either_set(request, shapes_set, array_set) -> Path:
    """The 96 shapes in each shard format."""
    return shapes_set if request.param == "png" else array_set


@pytest.fixture
def shapes_copy(shapes_set, tmp_path) -> Path:
    """A copy of the shapes set that a test may change."""
    return Path(shutil.copytree(shapes_set, tmp_path / "set"))


@pytest.fixture
def array_copy(array_set, tmp_path) -> Path:
    """A copy of the array set that a test may change."""
    return Path(shutil.copytree(array_set, tmp_path / "set"))


# ----------------------------------------------------------------------------- shapes


def test_shapes_are_deterministic_per_seed():
    first = list(iter_shapes(20, 32, 3, seed=7))
    again = list(iter_shapes(20, 32, 3, seed=7))
    other = list(iter_shapes(20, 32, 3, seed=8))
    assert [(k, im.tobytes(), l) for k, im, l in first] == [(k, im.tobytes(), l) for k, im, l in again]
    assert [im.tobytes() for _, im, _ in first] != [im.tobytes() for _, im, _ in other]
    assert len({key for key, _, _ in first}) == 20


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_images_are_uint8_of_the_requested_shape(channels):
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label = make_shape_image(rng, 24, channels)
        assert image.dtype == np.uint8 and image.shape == (24, 24, channels)
        assert 0 <= label < len(SHAPE_CLASSES)


def test_shape_classes_are_balanced():
    counts = collections.Counter(label for _, _, label in iter_shapes(400, 16, 3, seed=0))
    assert sorted(counts) == list(range(len(SHAPE_CLASSES)))
    assert all(0.15 < count / 400 < 0.35 for count in counts.values()), counts


@pytest.mark.parametrize("channels", [1, 3])
def test_a_shape_fills_a_good_fraction_of_the_image_with_strong_contrast(channels):
    for _, image, _ in iter_shapes(200, 32, channels, seed=3):
        colours, counts = np.unique(image.reshape(-1, channels), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        shape = (image != background).any(-1)
        rows, cols = np.nonzero(shape)
        assert shape.mean() > 0.06  # a triangle of 40% of the width covers 8%
        assert np.ptp(rows) + 1 >= 0.35 * 32 and np.ptp(cols) + 1 >= 0.35 * 32
        assert len(colours) == 2  # crisp: one shape colour on one background, no blending
        if channels == 1:
            assert abs(int(colours[0][0]) - int(colours[1][0])) >= 120


# ----------------------------------------------------------------------------- prepare


def test_prepare_shapes_writes_shards_and_a_manifest(shapes_set):
    manifest = read_manifest(shapes_set)
    assert manifest["format"] == 1 and manifest["source"] == "shapes" and manifest["shard_format"] == "png"
    assert (manifest["num_samples"], manifest["image_size"], manifest["channels"]) == (96, SIZE, 3)
    assert manifest["classes"] == SHAPE_CLASSES and manifest["skipped"] == 0
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert [s["num_samples"] for s in manifest["shards"]] == [16] * 6
    for shard in manifest["shards"]:
        assert hashlib.sha256((shapes_set / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    samples = shard_contents(shapes_set)
    assert len(samples) == 96 and all(set(members) == {"png", "cls"} for members in samples.values())
    assert not list(shapes_set.glob("*.partial"))


def test_prepare_is_reproducible_and_refuses_to_overwrite_silently(shapes_set, tmp_path):
    manifest = prepare("shapes", tmp_path, shard_size=16, num=96, image_size=SIZE, channels=3, seed=1, progress=False)
    assert manifest["shards"] == read_manifest(shapes_set)["shards"]  # same bytes, same sha256
    with pytest.raises(DataError, match="--overwrite"):
        prepare("shapes", tmp_path, shard_size=16, num=10, image_size=SIZE, progress=False)
    manifest = prepare("shapes", tmp_path, shard_size=4, num=10, image_size=SIZE, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == [s["name"] for s in manifest["shards"]]
    assert manifest["num_samples"] == 10


def test_prepare_array_format_stores_the_png_sets_pixels_and_labels_in_blocks(shapes_set, array_set, tmp_path):
    manifest = read_manifest(array_set)
    assert (manifest["shard_format"], manifest["images_per_member"], manifest["num_samples"]) == ("array", 6, 96)
    assert [s["num_samples"] for s in manifest["shards"]] == [16] * 6
    images, labels = [], []
    for index, shard in enumerate(manifest["shards"]):
        assert hashlib.sha256((array_set / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(array_set / shard["name"]) as tar:
            assert [m.name for m in tar.getmembers()] == [f"{index:06d}_{block:04d}.{member}" for block in range(3)
                                                          for member in ("images.npy", "labels.npy")]
            for block, count in enumerate([6, 6, 4]):
                block_images = npy_member(tar, f"{index:06d}_{block:04d}.images.npy")
                block_labels = npy_member(tar, f"{index:06d}_{block:04d}.labels.npy")
                assert block_images.dtype == np.uint8 and block_images.shape == (count, 3, SIZE, SIZE)
                assert block_labels.dtype == np.int64 and block_labels.shape == (count,)
                images += list(block_images)
                labels += block_labels.tolist()
    png_images, png_labels = png_set_contents(shapes_set)
    assert labels == png_labels  # the same samples, in the same order
    assert all(np.array_equal(a, b) for a, b in zip(images, png_images))
    again = prepare("shapes", tmp_path, shard_size=16, num=96, image_size=SIZE, channels=3, seed=1,
                    shard_format="array", images_per_member=6, progress=False)
    assert again["shards"] == manifest["shards"]  # reproducible: same bytes, same sha256


def test_prepare_array_blocks_default_to_at_most_1000_images_of_about_4_mb(tmp_path):
    small = prepare("shapes", tmp_path / "small", shard_size=1200, num=1200, image_size=8, channels=1,
                    shard_format="array", progress=False)
    assert small["images_per_member"] == 1000  # 64-byte images: the image cap
    large = prepare("shapes", tmp_path / "large", num=2, image_size=256, channels=3, shard_format="array",
                    progress=False)
    assert large["images_per_member"] == (4 << 20) // (256 * 256 * 3) == 21  # 192 KB images: the byte cap
    with tarfile.open(tmp_path / "small" / "shard-000000.tar") as tar:
        assert [npy_member(tar, name).shape[0] for name in tar.getnames() if "labels" in name] == [1000, 200]


def test_prepare_rejects_a_bad_format_or_block_size(tmp_path):
    with pytest.raises(DataError, match="--format must be one of png, array"):
        prepare("shapes", tmp_path, num=4, shard_format="jpeg", progress=False)
    with pytest.raises(DataError, match="--images-per-member applies to --format array only"):
        prepare("shapes", tmp_path, num=4, images_per_member=4, progress=False)
    with pytest.raises(DataError, match="--images-per-member must be at least 1, not 0"):
        prepare("shapes", tmp_path, num=4, shard_format="array", images_per_member=0, progress=False)


def test_a_manifest_without_shard_format_is_png_and_an_unknown_format_is_refused(shapes_copy):
    manifest = read_manifest(shapes_copy)
    del manifest["shard_format"]  # as written before array shards existed
    (shapes_copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(shapes_copy)["shard_format"] == "png"
    batches, _ = collect(build_train_loader(shapes_copy, batch_size=32, image_size=SIZE, channels=3,
                                            num_workers=0, resample=False))
    assert sum(len(batch["label"]) for batch in batches) == 96
    (shapes_copy / "manifest.json").write_text(json.dumps(manifest | {"shard_format": "parquet"}))
    with pytest.raises(DataError, match=r"manifest.json has shard_format 'parquet', which this version does not read"):
        read_manifest(shapes_copy)


def write_image_folder(root: Path, rng) -> dict[str, tuple[str, np.ndarray, bytes]]:
    """Two classes, created in reverse name order, with PNGs, a BMP, a broken file and clutter.
    Returns {file stem: (class, pixels, file bytes)} of the good images."""
    images = {}
    for name in ["zebra", "apple"]:
        (root / name).mkdir(parents=True)
        for index in range(3):
            pixels = random_image(rng, size=8)
            data = png_bytes(pixels)
            (root / name / f"{name}.{index}.png").write_bytes(data)  # dots in names must not leak into keys
            images[f"{name}.{index}"] = (name, pixels, data)
    pixels = random_image(rng, size=8)
    Image.fromarray(pixels).save(root / "apple" / "bitmap.bmp")
    images["bitmap"] = ("apple", pixels, None)
    (root / "zebra" / "broken.png").write_bytes(b"this is not a png")
    (root / "zebra" / "notes.txt").write_text("not an image, ignored")
    (root / "apple" / ".hidden.png").write_bytes(b"ignored too")
    return images


@pytest.mark.parametrize("packed", ["folder", "tar.gz", "zip"])
def test_prepare_image_folder_labels_follow_sorted_class_names(tmp_path, packed):
    rng = np.random.default_rng(0)
    images = write_image_folder(tmp_path / "src" / "train", rng)
    source = tmp_path / "src" / "train"
    if packed == "tar.gz":  # with one top-level folder, as in the real CIFAR-10 archive
        source = tmp_path / "images.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "src" / "train", arcname="train")
    with pytest.warns(UserWarning, match="broken.png"):
        manifest = prepare(source, tmp_path / "out", shard_size=3, progress=False)
    assert manifest["classes"] == ["apple", "zebra"]
    assert (manifest["num_samples"], manifest["skipped"], manifest["image_size"], manifest["channels"]) == (7, 1, 8, 3)
    samples = shard_contents(tmp_path / "out")
    assert len(samples) == 7
    for key, members in samples.items():
        assert set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
        class_name = key.split("_", 1)[0]
        assert int(members["cls"]) == manifest["classes"].index(class_name)
    for stem, (class_name, pixels, data) in images.items():
        key = f"{class_name}_{stem.replace('.', '_')}"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[key]["png"]))), pixels)
        if data is not None:
            assert samples[key]["png"] == data  # original bytes kept, not re-encoded
    # every shard holds a mix of classes, not one class after the other
    labels = [int(members["cls"]) for members in samples.values()]
    assert labels != sorted(labels)


@pytest.mark.parametrize("packed", ["folder", "tar.gz", "zip"])
def test_hidden_files_and_macos_resource_forks_are_images_neither_of_a_source_nor_of_an_evaluation_set(tmp_path,
                                                                                                      packed):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ["cat/1.png", "dog/2.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes(random_image(rng, size=8)))
    # junk that does not decode; counted as images, the last three would also be a second root of class folders
    for name in ["dog/notes.txt", "cat/.3.png", ".thumbnails/cat/4.png", "__MACOSX/cat/5.png", "__MACOSX/cat/._1.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    assert is_image_path("cat/1.png") and is_image_path("cat/1.JPG")
    assert not any(map(is_image_path, ["dog/notes.txt", "cat/.3.png", ".thumbnails/cat/4.png", "__MACOSX/cat/5.png"]))
    source = root
    if packed == "tar.gz":
        source = tmp_path / "images.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(root, arcname="images")
    elif packed == "zip":
        source = shutil.make_archive(str(tmp_path / "images"), "zip", tmp_path, "images")
    prepared = open_source(source)
    assert prepared.classes == ["cat", "dog"] and sorted(sample.origin.rsplit("/", 2)[-2] for sample in
                                                         prepared.samples) == ["cat", "dog"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading a junk file would warn that it does not decode
        images = open_images(source)
        assert images.total == 2 and [tuple(batch.shape) for batch in images.read(8, None)] == [(2, 3, 8, 8)]


def test_prepare_rejects_images_of_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in [("a", 8), ("b", 8), ("c", 12)]:
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "x.png").write_bytes(png_bytes(random_image(rng, size=size)))
    with pytest.raises(DataError, match=r"x\.png: image is \d+x\d+x3, but the first image .* must share size"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("shard-*"))  # nothing half-written left behind


def write_cifar10_python(path: Path, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny archive in the official format: 5 train batches of 2 images, a test batch of 3."""
    batches = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    contents = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, value) -> None:
            data = pickle.dumps(value)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer",
                                                                   "dog", "frog", "horse", "ship", "truck"]],
                             b"num_vis": 3072, b"num_cases_per_batch": 10000})
        for name, count in batches.items():
            rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            labels = [int(label) for label in rng.integers(0, 10, count)]
            add(name, {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                       b"filenames": [b"x.png"] * count})
            contents[name] = (rows, labels)
    return contents


def test_a_tar_source_holds_an_index_not_the_images_and_reads_each_when_taken(tmp_path):
    """An archive may be far larger than memory. Opening one indexes its members: a compressed one is spooled in one
    pass to a temporary file (tracemalloc's peak stays a fraction of it), an uncompressed one is read in place (cut
    short after opening, the image it no longer holds is one clear error)."""
    payload = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()  # incompressible
    for name, mode in (("images.tar.gz", "w:gz"), ("images.tar", "w")):
        path = tmp_path / name
        with tarfile.open(path, mode, compresslevel=1) if mode == "w:gz" else tarfile.open(path, mode) as tar:
            member = tarfile.TarInfo("train/noise/big.png")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        tracemalloc.start()
        try:
            source = open_source(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert source.kind == "image-folder-tar" and source.classes == ["noise"]
        assert peak < len(payload) // 4, f"{name}: {peak} bytes at the peak of opening it"
        if mode == "w":
            with open(path, "r+b") as archive:
                archive.truncate(len(payload) // 2)
            with pytest.raises(DataError, match="big.png from .*images.tar: the archive ends inside it"):
                next(source.samples)
        else:
            assert next(source.samples).data == payload


@pytest.mark.parametrize("split", ["train", "test"])
def test_prepare_cifar10_python_archive_round_trips_pixels_in_chw_order(tmp_path, split):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = write_cifar10_python(archive, np.random.default_rng(0))
    manifest = prepare(archive, tmp_path / "out", shard_size=4, split=split, progress=False)
    assert manifest["kind"] == "cifar10-python" and manifest["classes"][:2] == ["airplane", "automobile"]
    assert (manifest["image_size"], manifest["channels"]) == (32, 3)
    samples = shard_contents(tmp_path / "out")
    wanted = [name for name in batches if (name == "test_batch") == (split == "test")]
    assert len(samples) == manifest["num_samples"] == sum(len(batches[name][1]) for name in wanted)
    for name in wanted:
        rows, labels = batches[name]
        for index, (row, label) in enumerate(zip(rows, labels)):
            members = samples[f"{name}_{index:05d}"]
            pixels = np.asarray(Image.open(io.BytesIO(members["png"])))
            assert np.array_equal(pixels, row.reshape(3, 32, 32).transpose(1, 2, 0))  # planar R, G, B
            assert int(members["cls"]) == label


def test_prepare_reads_the_real_cifar10_archive_in_place(tmp_path):
    if not REAL_CIFAR10.is_file():
        pytest.skip(f"{REAL_CIFAR10} is absent")
    manifest = prepare(REAL_CIFAR10, tmp_path, shard_size=100, num=200, progress=False)
    assert manifest["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                   "truck"]
    assert (manifest["num_samples"], manifest["image_size"], manifest["channels"]) == (200, 32, 3)
    samples = shard_contents(tmp_path)
    labels = collections.Counter(int(members["cls"]) for members in samples.values())
    assert len(labels) >= 8  # a seeded sample of all classes, not the first 200 airplanes
    for key, members in samples.items():
        assert manifest["classes"][int(members["cls"])] == key.rsplit("_", 1)[0]
        assert members["jpg"][:2] == b"\xff\xd8"  # the original JPEG bytes


# ----------------------------------------------------------------------------- loader


def test_loader_yields_uint8_batches_forever_when_resampling(either_set):
    shapes_set = either_set
    loader = build_train_loader(shapes_set, batch_size=10, image_size=SIZE, channels=3, num_workers=0, seed=3)
    batches = [batch for _, batch in zip(range(25), loader)]  # 250 samples from a set of 96
    for batch in batches:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (10, 3, SIZE, SIZE)
        assert batch["image"].is_contiguous()
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (10,)
        assert batch["skipped"] == 0
    again = build_train_loader(shapes_set, batch_size=10, image_size=SIZE, channels=3, num_workers=0, seed=3)
    other_rank = build_train_loader(shapes_set, batch_size=10, image_size=SIZE, channels=3, num_workers=0, seed=3,
                                    rank=1, world_size=2)
    first = torch.cat([b["image"] for b in batches[:5]])
    assert torch.equal(first, torch.cat([b["image"] for _, b in zip(range(5), again)]))  # seeded
    assert not torch.equal(first, torch.cat([b["image"] for _, b in zip(range(5), other_rank)]))


def test_images_scale_to_unit_range_and_flip_exactly_the_masked_samples():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    plain = images_to_unit_range(images, torch.zeros(16, dtype=torch.bool), torch.float32)
    assert plain.dtype == torch.float32
    assert plain.min().item() == -1.0 and plain.max().item() == 1.0
    torch.testing.assert_close(plain, images.float() / 127.5 - 1, rtol=0, atol=1e-6)
    mask = random_flip_mask(16, generator=torch.Generator().manual_seed(5))
    flipped = images_to_unit_range(images, mask, torch.float32)
    assert 0 < int(mask.sum()) < 16
    torch.testing.assert_close(flipped[mask], plain[mask].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(flipped[~mask], plain[~mask], rtol=0, atol=0)


def test_a_finite_pass_over_two_ranks_and_two_workers_reads_every_sample_once(shapes_set, either_set):
    expected_images, expected_labels = png_set_contents(shapes_set)  # both formats hold these samples
    seen_images, seen_labels = [], []
    for rank in range(2):
        loader = build_train_loader(either_set, batch_size=7, image_size=SIZE, channels=3, num_workers=2,
                                    resample=False, rank=rank, world_size=2)
        batches, skipped = collect(loader)
        assert skipped == 0
        assert any(len(batch["label"]) < 7 for batch in batches)  # partial last batches are kept
        for batch in batches:
            seen_images += list(batch["image"].numpy())
            seen_labels += batch["label"].tolist()
    assert len(seen_labels) == 96
    assert as_multiset(seen_images, seen_labels) == as_multiset(expected_images, expected_labels)


def test_a_finite_pass_needs_a_shard_per_rank(shapes_set):
    with pytest.raises(DataError, match="7 ranks"):
        build_train_loader(shapes_set, batch_size=8, image_size=SIZE, channels=3, resample=False, world_size=7)


def test_corrupt_and_incomplete_samples_are_skipped_and_counted(shapes_copy):
    good = png_bytes(random_image(np.random.default_rng(0)))
    add_shard(shapes_copy, "extra.tar", [("fine_1", {"png": good, "cls": b"1"}),
                                         ("garbage", {"png": b"these bytes are no image", "cls": b"2"}),
                                         ("no_label", {"png": good}),
                                         ("fine_2", {"png": good, "cls": b"3"})])
    loader = build_train_loader(shapes_copy, batch_size=8, image_size=SIZE, channels=3, num_workers=0,
                                resample=False)
    with pytest.warns(UserWarning) as caught:
        batches, skipped = collect(loader)
    assert skipped == 2
    assert sum(len(batch["label"]) for batch in batches) == 96 + 2
    messages = " ".join(str(warning.message) for warning in caught)
    assert "extra.tar, sample garbage" in messages and "extra.tar, sample no_label" in messages


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_shard_counts_exactly_the_samples_it_lost(shapes_copy, num_workers):
    # members go <key>.cls, <key>.png: cut one shard inside the data of its 6th image, and one
    # inside the header of its 4th sample, which tarfile reads as a shorter, valid archive
    for name, cut in [("shard-000002.tar", lambda members: members[2 * 5 + 1].offset_data + 10),
                      ("shard-000004.tar", lambda members: members[2 * 3].offset + 100)]:
        with tarfile.open(shapes_copy / name) as tar:
            end = cut(tar.getmembers())
        (shapes_copy / name).write_bytes((shapes_copy / name).read_bytes()[:end])
    loader = build_train_loader(shapes_copy, batch_size=8, image_size=SIZE, channels=3, num_workers=num_workers,
                                resample=False)
    # worker processes print their warnings themselves: only num_workers=0 can catch them here
    with pytest.warns(UserWarning, match="truncated") if num_workers == 0 else contextlib.nullcontext():
        batches, skipped = collect(loader)
    delivered = sum(len(batch["label"]) for batch in batches)
    assert delivered == 5 + 3 + 4 * 16
    assert delivered + skipped == 96


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shard_format", ["png", "array"])
def test_an_image_of_the_wrong_size_raises_naming_shard_and_key(request, shard_format, num_workers):
    if shard_format == "png":
        folder, what = request.getfixturevalue("shapes_copy"), r"sample odd_one: image is"
        small = png_bytes(random_image(np.random.default_rng(0), size=8, channels=1))
        add_shard(folder, "odd.tar", [("odd_one", {"png": small, "cls": b"0"})])
    else:
        folder, what = request.getfixturevalue("array_copy"), r"block odd_one: images are"
        add_shard(folder, "odd.tar", [("odd_one", array_block(np.random.default_rng(0), 2, size=8, channels=1))],
                  num_samples=2)
    loader = build_train_loader(folder, batch_size=8, image_size=SIZE, channels=3, num_workers=num_workers,
                                resample=False)
    # one line: raised in this process, not re-raised by torch with the worker's traceback folded in
    one_line = rf"^shard [^\n]*odd\.tar, {what} 8x8x1, expected 16x16x3 \(data.image_size, data.channels\)$"
    with pytest.raises(DataError, match=one_line):
        collect(loader)


def test_the_shuffle_buffer_mixes_array_blocks_and_shards(array_set):
    # without the buffer a worker's batches follow the stored order; with it, samples mix across blocks
    def first_labels(shuffle_buffer: int) -> list[int]:
        loader = build_train_loader(array_set, batch_size=48, image_size=SIZE, channels=3, num_workers=0,
                                    shuffle_buffer=shuffle_buffer, seed=0, resample=False)
        return next(iter(loader))["label"].tolist()

    stored = first_labels(0)
    shuffled = first_labels(100)
    assert stored != shuffled and collections.Counter(stored) != collections.Counter(shuffled)


def test_bad_array_blocks_are_skipped_counting_all_their_images(array_copy):
    rng = np.random.default_rng(0)
    float_images = {"images.npy": npy_bytes(np.zeros((5, 3, SIZE, SIZE), np.float32)),
                    "labels.npy": npy_bytes(np.zeros(5, np.int64))}
    add_shard(array_copy, "extra.tar", [("good", array_block(rng, 3)),
                                        ("garbage", array_block(rng, 4) | {"images.npy": b"no npy file at all"}),
                                        ("no_labels", {"images.npy": array_block(rng, 2)["images.npy"]}),
                                        ("floats", float_images)], num_samples=3 + 4 + 2 + 5)
    loader = build_train_loader(array_copy, batch_size=8, image_size=SIZE, channels=3, num_workers=0,
                                resample=False)
    with pytest.warns(UserWarning) as caught:
        batches, skipped = collect(loader)
    assert skipped == 4 + 2 + 5
    assert sum(len(batch["label"]) for batch in batches) == 96 + 3
    messages = " ".join(str(warning.message) for warning in caught)
    for key in ["garbage", "no_labels", "floats"]:
        assert f"extra.tar, block {key}" in messages


def test_a_truncated_array_shard_counts_exactly_the_images_it_lost(array_copy):
    # cut shard 3 inside the pixels of its second block: the first block's 6 images remain
    with tarfile.open(array_copy / "shard-000003.tar") as tar:
        end = tar.getmember("000003_0001.images.npy").offset_data + 100
    (array_copy / "shard-000003.tar").write_bytes((array_copy / "shard-000003.tar").read_bytes()[:end])
    loader = build_train_loader(array_copy, batch_size=8, image_size=SIZE, channels=3, num_workers=0,
                                resample=False)
    with pytest.warns(UserWarning) as caught:
        batches, skipped = collect(loader)
    assert any("10 images of shard" in str(w.message) and "shard-000003.tar: it delivered 6 of 16" in str(w.message)
               for w in caught)
    assert (sum(len(batch["label"]) for batch in batches), skipped) == (80 + 6, 10)


def test_missing_manifest_or_mismatched_config_raise_data_error(tmp_path, shapes_set):
    with pytest.raises(DataError, match="python -m engine.data.prepare"):
        build_train_loader(tmp_path, batch_size=4, image_size=SIZE, channels=3)
    with pytest.raises(DataError, match=r"16x16x3 images, but the config asks for 32x32x3 \(data.image_size"):
        build_train_loader(shapes_set, batch_size=4, image_size=32, channels=3)


def test_a_manifest_without_shards_raises_data_error(shapes_copy):
    manifest = read_manifest(shapes_copy)
    (shapes_copy / "manifest.json").write_text(json.dumps(manifest | {"shards": []}))
    with pytest.raises(DataError, match="lists no shards"):
        build_train_loader(shapes_copy, batch_size=4, image_size=SIZE, channels=3)


def test_every_public_name_of_the_data_package_loads():
    import engine.data

    assert set(engine.data.__all__) == {"DataError", *engine.data._EXPORTS}
    for name in engine.data.__all__:
        assert getattr(engine.data, name) is not None


# ----------------------------------------------------------------------------- command line


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return run_module("engine.data.prepare", args, cwd=REPO, timeout=600)


def test_cli_writes_array_shards_with_format_array(tmp_path):
    result = run_prepare("shapes", str(tmp_path), "--format", "array", "--num", "40", "--image-size", "8",
                         "--shard-size", "16", "--images-per-member", "10")
    assert result.returncode == 0, result.stderr
    assert "wrote 40 samples (8x8x3, 4 classes) in 3 array shards" in result.stdout
    manifest = read_manifest(tmp_path)
    assert (manifest["shard_format"], manifest["images_per_member"]) == ("array", 10)
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8]


@pytest.mark.parametrize("case", ["missing source", "existing output", "block size without array"])
def test_cli_reports_bad_input_in_one_line_with_status_2(tmp_path, shapes_set, case):
    if case == "missing source":
        result = run_prepare(str(tmp_path / "no-such-folder"), str(tmp_path / "out"))
        expected = "does not exist"
    elif case == "block size without array":
        result = run_prepare("shapes", str(tmp_path / "out"), "--num", "8", "--images-per-member", "4")
        expected = "--images-per-member applies to --format array only"
    else:
        result = run_prepare("shapes", str(shapes_set), "--num", "8")
        expected = "--overwrite"
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
