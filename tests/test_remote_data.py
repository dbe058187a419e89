"""Prepared data streamed from a URL (engine/data/remote.py): the same batches as the local folder, exact
resumes, dropped connections counted, one-line errors before any step, and the local shard cache.

A loopback HTTP server (a thread of this process) serves the folder that holds the `shapes16` set.
"""

import functools
import http.server
import shutil
import socket
import threading
import warnings

import pytest
import torch

import engine.train
from engine.config import ConfigError, load_config
from engine.data import DataError, build_train_loader, load_device_cache, open_images, read_manifest
from engine.data.remote import url_problem
from test_train_cli import ROOT, SMALL, losses

TOTAL = 64  # images in shapes16: 4 shards of 16


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; logs each request path on the server; cuts the connection after `server.cut[path]` bytes."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def copyfile(self, source, outputfile):
        cut = self.server.cut.get(self.path)
        if cut is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(cut))  # the headers promised the whole file: the client sees a broken transfer
        self.close_connection = True


@pytest.fixture(scope="module")
def server(shapes16):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=shapes16.parent))
    httpd.requests, httpd.cut = [], {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def url(server, shapes16):
    server.requests.clear()
    server.cut.clear()
    return f"http://127.0.0.1:{server.server_port}/{shapes16.name}"


def read_all(path, *, batches=None, **options):
    """The loader's batches as comparable tuples (the first `batches` of an endless stream, or one whole pass)."""
    settings = dict(batch_size=8, image_size=16, channels=3, num_workers=2, shuffle_buffer=16, seed=3)
    loader = build_train_loader(path, **{**settings, **options})
    taken = []
    for batch in loader:
        taken.append((batch["image"], batch["label"], batch["skipped"], batch["worker"], batch["position"]))
        if batches is not None and len(taken) == batches:
            break
    return taken


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (image, label, *rest), (other_image, other_label, *other_rest) in zip(first, second):
        assert torch.equal(image, other_image) and torch.equal(label, other_label) and rest == other_rest


def shard_requests(server) -> list[str]:
    return [path for path in server.requests if path.endswith(".tar")]


@pytest.mark.parametrize("form", ["http", "pipe", "fsspec"])
def test_a_url_streams_batch_for_batch_what_the_local_folder_streams_with_two_workers(url, shapes16, form):
    location = {"http": url, "pipe": f"pipe:cat {shapes16}/{{}}", "fsspec": f"file://{shapes16}"}[form]
    assert_same_batches(read_all(location, batches=12), read_all(shapes16, batches=12))
    assert_same_batches(read_all(location, resample=False), read_all(shapes16, resample=False))


def test_a_resume_from_a_url_continues_the_uninterrupted_stream_exactly(url):
    uninterrupted = read_all(url, batches=14)
    done = uninterrupted[:6]  # an even count: the two workers' batches alternate, worker 0 comes next
    start = [max(position for *_, worker, position in done if worker == w) for w in (0, 1)]
    assert_same_batches(read_all(url, batches=8, start=start), uninterrupted[6:])


def test_evaluation_images_and_the_device_cache_load_from_a_url(url, shapes16):
    from_url, local = open_images(url), open_images(shapes16)
    assert from_url.total == local.total == TOTAL
    assert torch.equal(torch.cat(list(from_url.read(32, None))), torch.cat(list(local.read(32, None))))
    cached = load_device_cache(url, image_size=16, channels=3, device="cpu", num_workers=0)
    held = load_device_cache(shapes16, image_size=16, channels=3, device="cpu", num_workers=0)
    assert torch.equal(cached.images, held.images) and torch.equal(cached.labels, held.labels)


def test_a_connection_dropped_inside_a_shard_counts_exactly_the_samples_it_lost(server, url, shapes16, tmp_path):
    shard = shapes16 / "shard-000001.tar"
    cut = shard.stat().st_size // 2
    server.cut[f"/{shapes16.name}/{shard.name}"] = cut
    local_cut = tmp_path / "cut"  # the same shard cut at the same byte, on disk
    shutil.copytree(shapes16, local_cut)
    (local_cut / shard.name).write_bytes(shard.read_bytes()[:cut])
    batches = read_all(url, resample=False)  # two workers: curl's failing exit status must not end one
    assert_same_batches(batches, read_all(local_cut, resample=False))  # every byte that arrived is used
    delivered, skipped = sum(len(image) for image, *_ in batches), sum(skipped for _, _, skipped, *_ in batches)
    assert delivered + skipped == TOTAL and 0 < skipped < 16  # nothing lost silently


def test_a_failing_pipe_command_counts_its_shard_as_skipped_instead_of_crashing_a_worker(shapes16, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shapes16, copy)
    (copy / "shard-000002.tar").unlink()  # `cat` exits with status 1 for it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = read_all(f"pipe:cat {copy}/{{}}", resample=False)
    assert sum(len(image) for image, *_ in batches) == TOTAL - 16
    assert sum(skipped for _, _, skipped, *_ in batches) == 16


def dry_run_error(capsys, *overrides) -> str:
    assert engine.train.main(["configs/tiny.yaml", *SMALL, *overrides, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    return error


def test_a_missing_or_unreachable_url_is_one_line_naming_it_before_any_step(url, capsys):
    missing = url.rsplit("/", 1)[0] + "/nowhere"
    error = dry_run_error(capsys, f"data.path={missing}")
    assert f"{missing}/manifest.json" in error and "HTTP error" in error
    with socket.socket() as probe:  # a port that nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{probe.getsockname()[1]}/data"
    with pytest.raises(DataError, match="refused") as error:  # the check that training runs before step 1
        engine.train.check_data(load_config(ROOT / "configs/tiny.yaml", [*SMALL, f"data.path={refused}"]))
    assert f"{refused}/manifest.json" in str(error.value) and "\n" not in str(error.value)


def test_a_manifest_that_is_not_json_is_a_data_error_naming_its_url(url, shapes16):
    broken = shapes16.parent / "not-json"
    broken.mkdir(exist_ok=True)
    (broken / "manifest.json").write_text("<html>a login page</html>")
    with pytest.raises(DataError, match="not-json/manifest.json is not valid JSON"):
        read_manifest(url.rsplit("/", 1)[0] + "/not-json")


def test_a_url_without_its_reader_or_a_pipe_without_braces_is_a_config_error_naming_what_to_do():
    config = ROOT / "configs/tiny.yaml"
    if url_problem("s3://bucket/data") is not None:  # s3fs is not installed here
        with pytest.raises(ConfigError, match="data.path s3://bucket/data: .*pip install s3fs"):
            load_config(config, ["data.path=s3://bucket/data"])
    with pytest.raises(ConfigError, match="eval.val_data pipe:cat x: needs {}"):
        load_config(config, ["eval.val_data=pipe:cat x"])
    with pytest.raises(ConfigError, match="data.cache_dir must be a local folder"):
        load_config(config, ["data.cache_dir=s3://bucket/cache"])
    with pytest.raises(ConfigError, match="eval.reference .*a statistics .npz must be a local file"):
        load_config(config, ["eval.reference=https://host/cifar10-stats.npz"])


def test_the_shard_cache_serves_the_second_pass_and_never_a_partial_or_corrupt_file(server, url, tmp_path):
    cache = tmp_path / "cache"
    first = read_all(url, resample=False, cache_dir=str(cache))
    assert len(shard_requests(server)) == 4 and len(list(cache.glob("*.tar"))) == 4
    assert not list(cache.glob("*.partial"))
    server.requests.clear()
    assert_same_batches(read_all(url, resample=False, cache_dir=str(cache)), first)
    assert shard_requests(server) == []  # every shard came from the cache

    names = sorted(path.name for path in cache.glob("*.tar"))
    corrupt, partial = sorted(cache.glob("*.tar"))[:2]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit flip in an image: same name and size, another sha256
    corrupt.write_bytes(data)
    partial.rename(partial.with_name(partial.name + ".123.partial"))  # as a killed writer leaves it
    server.requests.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_batches(read_all(url, resample=False, cache_dir=str(cache)), first)
    assert sorted(path.rsplit("/", 1)[1][:12] for path in shard_requests(server)) == sorted(
        path.name[:12] for path in (corrupt, partial))
    assert sorted(path.name for path in cache.glob("*.tar")) == names  # both cached again, whole


@pytest.mark.slow
def test_training_from_a_url_gives_the_losses_of_training_from_the_local_folder_and_resumes_exactly(url, shapes16,
                                                                                                      tmp_path):
    """Stopped at its step-3 checkpoint and run again to step 5, the run from the URL resumes every loader worker's
    stream where the checkpoint recorded it: its 5 losses are the uninterrupted local run's. Step 3 of 2 workers:
    the batch due next is worker 1's, while a DataLoader always starts with worker 0 (the resume turns the
    workers' streams; before it did, resuming at an odd step swapped the next two batches)."""
    def train(data, run_dir, steps):
        overrides = [f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1",
                     "train.checkpoint_every=3", "data.num_workers=2"]
        engine.train.train(load_config(ROOT / "configs/tiny.yaml", [*SMALL, *overrides]))
        return losses(run_dir)

    local = train(shapes16, tmp_path / "local", 5)
    first_three = {step: loss for step, loss in local.items() if step <= 3}
    assert len(local) == 5 and train(url, tmp_path / "url", 3) == first_three
    assert train(url, tmp_path / "url", 5) == local
