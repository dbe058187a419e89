"""`engine.data.prepare` on what users have: any size and mode of image, several worker processes, and
every kind of source (zip, LMDB, Hugging Face save_to_disk, parquet). Every file is tiny and made here."""

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import DataError, read_manifest
from engine.data.prepare import prepare
from engine.data.transforms import crop_square, resize_shorter_side
from forked_cli import run_module
from test_data import shard_contents

REPO = Path(__file__).resolve().parents[1]
N = 16  # the image size asked for


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(rng, width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)


def shard_images(out_dir: Path) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (uint8 (H, W, C) pixels, label)} over a png data set's shards."""
    result = {}
    for key, members in shard_contents(out_dir).items():
        pixels = np.asarray(Image.open(io.BytesIO(members.get("png") or members["jpg"])))
        result[key] = (pixels[:, :, None] if pixels.ndim == 2 else pixels, int(members["cls"]))
    return result


def exif_rotated_jpeg() -> bytes:
    """Stored 16 wide, 24 tall, red above blue, with EXIF orientation 6: seen upright it is 24 wide,
    16 tall, blue left, red right."""
    pixels = np.zeros((24, 16, 3), np.uint8)
    pixels[:12, :, 0] = 255
    pixels[12:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def mixed_files(rng) -> dict[str, bytes]:
    """One flat folder of every size and mode prepare must take, and two broken files."""
    palette = Image.fromarray(rng.integers(0, 4, (20, 16), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    rgba = np.zeros((16, 20, 4), np.uint8)  # transparent everywhere but one opaque black column
    rgba[:, 10, 3] = 255
    sixteen_bit = Image.fromarray(np.full((16, 16), 257 * 100, np.uint16))  # 100 in 8 bit; clipping gives 255
    gray_alpha = Image.fromarray(np.zeros((16, 16, 2), np.uint8), mode="LA")  # fully transparent
    return {
        "wide.png": encoded(noise(rng, 40, 20)),  # larger, not square
        "tall.jpg": encoded(noise(rng, 12, 30), "JPEG"),  # shorter side below N: upsampled
        "tiny.png": encoded(noise(rng, 8, 8, "L")),  # upsampled
        "square.png": encoded(noise(rng, N, N)),  # kept as it is
        "palette.png": encoded(palette),
        "palette_transparent.png": encoded(palette, transparency=3),
        "rgba.png": encoded(Image.fromarray(rgba)),
        "gray_alpha.png": encoded(gray_alpha),
        "sixteen_bit.png": encoded(sixteen_bit),
        "cmyk.jpg": encoded(Image.new("CMYK", (N, N), (0, 255, 255, 0)), "JPEG", quality=95),  # red
        "rotated.jpg": exif_rotated_jpeg(),
        "broken.png": b"\x89PNG not really",
        "truncated.jpg": encoded(noise(rng, 20, 20), "JPEG")[:60],
    }


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("sources") / "my_photos"
    root.mkdir()
    files = mixed_files(np.random.default_rng(0))
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, files


# ----------------------------------------------------------------------------- sizes and modes


def test_any_size_and_mode_becomes_an_n_by_n_rgb_square_and_broken_files_are_named(mixed_folder, tmp_path):
    root, files = mixed_folder
    with pytest.warns(UserWarning) as caught:
        manifest = prepare(root, tmp_path, shard_size=4, image_size=N, progress=False)
    messages = [str(warning.message) for warning in caught]
    assert sum("broken.png" in m or "truncated.jpg" in m for m in messages) == 2
    assert sum("upsampled" in m for m in messages) == 1 and "2 images were smaller than 16x16" in " ".join(messages)
    assert (manifest["num_samples"], manifest["skipped"], manifest["upsampled"]) == (11, 2, 2)
    assert (manifest["image_size"], manifest["channels"], manifest["classes"]) == (N, 3, ["my_photos"])
    assert manifest["resize"] == {"image_size": N, "crop": "center", "background": "white"}
    images = shard_images(tmp_path)
    assert all(pixels.shape == (N, N, 3) for pixels, _ in images.values())
    pixels = {key.removeprefix("my_photos_"): image for key, (image, _) in images.items()}
    assert (pixels["sixteen_bit"] == 100).all()  # scaled, not clipped
    assert (pixels["gray_alpha"] == 255).all()  # transparent on the white background
    rgba = pixels["rgba"]
    assert (rgba[:, :8] == 255).all() and (rgba[:, 8] < 40).all()  # white, and the black column, cropped from 20 wide
    assert (pixels["cmyk"][..., 0] > 200).all() and (pixels["cmyk"][..., 1:] < 60).all()
    rotated = pixels["rotated"].astype(int)
    assert (rotated[:, :6, 2] > 200).all() and (rotated[:, -6:, 0] > 200).all()  # upright: blue left, red right
    assert Image.open(io.BytesIO(files["palette_transparent.png"])).mode == "P"
    assert pixels["palette_transparent"].shape == (N, N, 3)


def test_an_image_already_of_the_size_keeps_its_bytes(mixed_folder, tmp_path):
    root, files = mixed_folder
    with pytest.warns(UserWarning):
        prepare(root, tmp_path, image_size=N, progress=False)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.extractfile("my_photos_square.png").read() == files["square.png"]


def test_downscaling_averages_fine_stripes_to_grey_instead_of_aliasing():
    stripes = np.zeros((24, 24), np.uint8)
    stripes[:, ::2] = 255  # one-pixel columns: the highest frequency an image holds
    small = np.asarray(resize_shorter_side(Image.fromarray(stripes), 8))
    assert small.shape == (8, 8) and np.abs(small.astype(int) - 128).max() <= 1
    naive = np.asarray(Image.fromarray(stripes).resize((8, 8), Image.Resampling.NEAREST))
    assert naive.std() > 100  # what an unfiltered resize gives: the stripes alias


def test_a_wide_image_keeps_its_shorter_side_and_its_centre_and_a_random_crop_is_seeded():
    columns = np.tile(np.arange(48, dtype=np.uint8), (16, 1))  # pixel value = column index
    wide = Image.fromarray(columns)
    assert resize_shorter_side(wide, 16).size == (48, 16)  # already N tall: nothing to resize
    assert np.asarray(crop_square(wide, 16, "center", 0, 0))[0].tolist() == list(range(16, 32))
    lefts = [int(np.asarray(crop_square(wide, 16, "random", seed=3, index=i))[0, 0]) for i in range(8)]
    assert lefts == [int(np.asarray(crop_square(wide, 16, "random", seed=3, index=i))[0, 0]) for i in range(8)]
    assert len(set(lefts)) > 1 and set(lefts) != {16} and all(0 <= left <= 32 for left in lefts)


def test_random_crops_in_prepare_are_reproducible_and_differ_from_centre_crops(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "wide").mkdir()
    for index in range(6):
        (tmp_path / "wide" / f"{index}.png").write_bytes(encoded(noise(rng, 3 * N, N)))
    shards = {}
    for name, crop, seed in [("centre", "center", 0), ("random", "random", 0), ("again", "random", 0),
                             ("other", "random", 1)]:
        manifest = prepare(tmp_path / "wide", tmp_path / name, image_size=N, crop=crop, seed=seed, progress=False)
        shards[name] = [shard["sha256"] for shard in manifest["shards"]]
    assert shards["random"] == shards["again"]
    assert shards["random"] != shards["centre"] and shards["random"] != shards["other"]


def test_without_image_size_a_non_square_image_is_an_error_that_suggests_image_size(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "wide.png").write_bytes(encoded(noise(np.random.default_rng(0), 12, 8)))
    with pytest.raises(DataError, match=r"wide\.png: image is 12x8; .*pass --image-size N"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)


def test_gray_sources_stay_gray_and_rgba_is_kept_only_when_asked_for(tmp_path):
    rng = np.random.default_rng(2)
    for folder, mode in [("gray", "L"), ("rgba", "RGBA")]:
        (tmp_path / folder).mkdir()
        for index in range(2):
            noise(rng, 8, 8, mode).save(tmp_path / folder / f"{index}.png")
    assert prepare(tmp_path / "gray", tmp_path / "gray-out", progress=False)["channels"] == 1
    assert prepare(tmp_path / "rgba", tmp_path / "rgba-out", progress=False)["channels"] == 3
    kept = prepare(tmp_path / "rgba", tmp_path / "rgba-4", channels=4, progress=False)
    assert kept["channels"] == 4
    assert all(pixels.shape == (8, 8, 4) for pixels, _ in shard_images(tmp_path / "rgba-4").values())


# ----------------------------------------------------------------------------- workers


def test_one_and_two_workers_write_identical_shards(mixed_folder, tmp_path):
    root, _ = mixed_folder
    manifests = []
    for workers in (1, 2):
        with pytest.warns(UserWarning):
            manifests.append(prepare(root, tmp_path / str(workers), shard_size=4, image_size=N, crop="random",
                                     workers=workers, progress=False))
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    assert (manifests[1]["skipped"], manifests[1]["upsampled"]) == (2, 2)


# ----------------------------------------------------------------------------- sources


def write_class_folders(root: Path, rng, count: int = 3) -> None:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for index in range(count):
            (root / name / f"{index}.png").write_bytes(encoded(noise(rng, 10, 12)))


def test_a_zip_of_class_folders_and_a_flat_zip_are_read(tmp_path):
    write_class_folders(tmp_path / "train", np.random.default_rng(3))
    with zipfile.ZipFile(tmp_path / "pets.zip", "w") as archive:
        for file in sorted((tmp_path / "train").rglob("*.png")):
            archive.write(file, f"train/{file.relative_to(tmp_path / 'train').as_posix()}")
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as archive:
        for file in sorted((tmp_path / "train" / "cat").glob("*.png")):
            archive.write(file, file.name)
    manifest = prepare(tmp_path / "pets.zip", tmp_path / "out", image_size=8, progress=False)
    assert (manifest["kind"], manifest["classes"], manifest["num_samples"]) == ("image-folder-zip", ["cat", "dog"], 6)
    assert sorted(label for _, label in shard_images(tmp_path / "out").values()) == [0, 0, 0, 1, 1, 1]
    flat = prepare(tmp_path / "flat.zip", tmp_path / "flat", image_size=8, progress=False)
    assert (flat["classes"], flat["num_samples"]) == (["flat"], 3)


def test_a_folder_with_images_both_loose_and_in_class_folders_is_still_an_error(tmp_path):
    write_class_folders(tmp_path / "src", np.random.default_rng(4), count=1)
    (tmp_path / "src" / "loose.png").write_bytes(encoded(noise(np.random.default_rng(5), 8, 8)))
    with pytest.raises(DataError, match=r"loose\.png is not inside a class folder, but others are"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)


def test_an_lmdb_of_encoded_images_is_read_as_one_class_in_seeded_order(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(6)
    database = tmp_path / "bedroom_train_lmdb"
    with lmdb.open(str(database), map_size=1 << 22) as environment, environment.begin(write=True) as transaction:
        for index, fmt in enumerate(["WEBP", "JPEG", "PNG", "WEBP", "JPEG"]):
            transaction.put(f"{index:040x}".encode(), encoded(noise(rng, 20, 14), fmt))
    manifest = prepare(database, tmp_path / "out", image_size=8, progress=False)
    assert (manifest["kind"], manifest["classes"], manifest["num_samples"]) == ("lmdb", ["bedroom_train_lmdb"], 5)
    assert all(pixels.shape == (8, 8, 3) for pixels, _ in shard_images(tmp_path / "out").values())
    again = prepare(database, tmp_path / "again", image_size=8, progress=False)
    other = prepare(database, tmp_path / "other", image_size=8, seed=1, progress=False)
    assert again["shards"] == manifest["shards"] and other["shards"] != manifest["shards"]


def test_without_the_lmdb_package_an_lmdb_source_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'ddpm-engine\[lmdb\]'"):
        prepare(tmp_path / "db", tmp_path / "out", progress=False)


HF_FEATURES = {"image": {"_type": "Image"}, "label": {"names": ["plane", "car", "bird"], "_type": "ClassLabel"}}


def image_table(rng, labels: list, struct: bool = True):
    """A pyarrow table of encoded images (HF Image structs {bytes, path}, or plain bytes) and labels."""
    pa = pytest.importorskip("pyarrow")
    images = [encoded(noise(rng, 12, 10)) for _ in labels]
    column = pa.array([{"bytes": data, "path": None} for data in images],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())])) if struct else pa.array(images)
    return pa.table({"image": column, "label": labels})


def test_a_hugging_face_save_to_disk_folder_is_read_with_its_class_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = image_table(np.random.default_rng(7), [2, 0, 1, 2, 0, 1, 2])
    folder = tmp_path / "cifar_like"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:  # `datasets` writes the stream format
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))
    manifest = prepare(folder, tmp_path / "out", image_size=8, progress=False)
    assert (manifest["kind"], manifest["classes"], manifest["num_samples"]) == ("hf-arrow", ["plane", "car", "bird"], 7)
    images = shard_images(tmp_path / "out")
    assert {key: label for key, (_, label) in images.items()} == {
        f"data-00000-of-00001_{row}": label for row, label in enumerate([2, 0, 1, 2, 0, 1, 2])}
    datasets = pytest.importorskip("datasets")  # the real writer, when it is installed
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=HF_FEATURES["label"]["names"])})
    images_column = [{"bytes": data, "path": None} for data in table["image"].field("bytes").to_pylist()]
    real = datasets.Dataset.from_dict({"image": images_column, "label": [2, 0, 1, 2, 0, 1, 2]}, features=features)
    real.save_to_disk(str(tmp_path / "real"))
    again = prepare(tmp_path / "real", tmp_path / "real-out", image_size=8, progress=False)
    assert (again["classes"], again["num_samples"]) == (manifest["classes"], 7)
    real_images = shard_images(tmp_path / "real-out")
    assert {key: label for key, (_, label) in real_images.items()} == {key: label for key, (_, label) in images.items()}


def test_parquet_files_with_string_labels_map_them_to_sorted_class_names(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(8)
    table = image_table(rng, ["dog", "cat", "dog", "emu", "cat"], struct=False).rename_columns(["pixels", "animal"])
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"no column 'photo' .*fix --image-column"):
        prepare(tmp_path / "part-0.parquet", tmp_path / "bad", image_column="photo", progress=False)
    manifest = prepare(tmp_path / "part-0.parquet", tmp_path / "out", image_size=8, label_column="animal",
                       progress=False)
    assert (manifest["kind"], manifest["classes"], manifest["num_samples"]) == ("parquet", ["cat", "dog", "emu"], 5)
    labels = {int(key.rsplit("_", 1)[1]): label for key, (_, label) in shard_images(tmp_path / "out").items()}
    assert labels == {0: 1, 1: 0, 2: 1, 3: 2, 4: 0}
    unlabelled = prepare(tmp_path, tmp_path / "folder-out", image_size=8, progress=False)  # a folder of parquet files
    assert (unlabelled["classes"], unlabelled["num_samples"]) == ([tmp_path.name], 5)


@pytest.mark.parametrize("named, source", [("zip", "folder"), ("lmdb", "folder"), ("cifar10", "tar"),
                                           ("folder", "shapes"), ("parquet", "zip")])
def test_a_source_named_with_the_wrong_kind_is_a_clear_error(tmp_path, named, source):
    write_class_folders(tmp_path / "src", np.random.default_rng(9), count=1)
    paths = {"folder": tmp_path / "src", "shapes": "shapes", "tar": tmp_path / "src.tar", "zip": tmp_path / "src.zip"}
    with tarfile.open(paths["tar"], "w") as tar:
        tar.add(tmp_path / "src", arcname="src")
    zipfile.ZipFile(paths["zip"], "w").close()
    with pytest.raises(DataError, match=rf"^--source {named}, but .*leave --source out"):
        prepare(paths[source], tmp_path / "out", source_kind=named, progress=False)


@pytest.mark.slow
def test_cli_resizes_with_workers_and_reports_skipped_and_upsampled(mixed_folder, tmp_path):
    root, _ = mixed_folder
    result = run_module("engine.data.prepare", [root, tmp_path, "--image-size", N, "--workers", 2, "--crop", "random",
                                                "--background", "black"], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "wrote 11 samples (16x16x3, 1 classes)" in result.stdout
    assert "skipped 2 unreadable files, upsampled 2 smaller images" in result.stdout
    assert read_manifest(tmp_path)["resize"] == {"image_size": N, "crop": "random", "background": "black"}
