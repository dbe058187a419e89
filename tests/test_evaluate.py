"""FID and KID (engine.evaluate) with a seeded stand-in for the Inception network: no download.

The stand-in (tests/feature_network.py) is a small TorchScript conv net with the Inception file's
calling convention, loaded through the same code as the real file.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from engine.data import DataError
from engine.data.image_sets import as_uint8_images, open_images
from engine.data.prepare import prepare
from engine.data.shapes import iter_shapes
from engine.evaluate import (INCEPTION_ENV, INCEPTION_URL, EvaluationError, evaluate, load_feature_network, main,
                             read_reference, reference_statistics, save_reference)
from feature_network import make_feature_network
from forked_cli import torchrun
from test_train_cli import run

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train.tar.gz"
TORCHRUN = torchrun(2)
KID = {"kid_subset_size": 128, "kid_subsets": 50}


def _shapes(num: int, seed: int) -> np.ndarray:
    """uint8 (N, 16, 16, 3): the procedural shapes `prepare shapes --image-size 16` writes for `seed`."""
    return np.stack([image for _, image, _ in iter_shapes(num, 16, 3, seed)])


def _noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def _blurred(images: np.ndarray, radius: int) -> torch.Tensor:
    """A box blur of the given radius, as uint8 (N, C, H, W)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(F.pad(x, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)
    return x.round().to(torch.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors only: with a second intra-op thread, a busy machine makes KID's many small ops
    spin-wait for it (seconds per test instead of tenths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    return make_feature_network(tmp_path_factory.mktemp("nets") / "standin.pt", seed=0)


@pytest.fixture(scope="module")
def net(net_file):
    return load_feature_network(net_file)


@pytest.fixture(scope="module")
def images():
    return _shapes(256, seed=0)


@pytest.fixture(scope="module")
def reference(images, net):
    return reference_statistics(images, net)


@pytest.fixture(scope="module")
def stats_file(reference, tmp_path_factory):
    return save_reference(reference, tmp_path_factory.mktemp("stats") / "reference.npz")


def test_a_set_against_itself_has_fid_and_kid_near_zero(images, reference, net):
    result = evaluate(images, reference, net, **KID)
    assert abs(result["fid"]) < 1e-8
    assert abs(result["kid"]) < 0.02 and abs(result["kid"]) < 2 * result["kid_std"]
    assert result["num_images"] == result["num_reference"] == 256 and result["kid_subset_size"] == 128
    # ...while another draw of shapes is measurably different
    assert evaluate(_shapes(256, seed=1), reference, net, **KID)["fid"] > 0.01


@pytest.mark.parametrize("corrupt, levels", [(_noisy, (16, 32, 64)), (_blurred, (1, 2, 3))], ids=["noise", "blur"])
def test_fid_grows_as_the_images_are_corrupted(images, reference, net, corrupt, levels):
    results = [evaluate(images, reference, net, **KID)] + [evaluate(corrupt(images, level), reference, net, **KID)
                                                             for level in levels]
    fids = [r["fid"] for r in results]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[-1] > 100 * max(fids[0], 1e-6)
    # the strongest corruption is also far from the set by KID: by 3 standard errors of the subsets' mean
    assert results[-1]["kid"] - results[0]["kid"] > 3 * results[-1]["kid_std"] / math.sqrt(KID["kid_subsets"])


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_saved_statistics_reproduce_torchmetrics_on_the_raw_images(images, reference, stats_file, net):
    generated = _noisy(images, 24, seed=1)
    # torchmetrics itself, with the wrapped network as its feature extractor, on all raw images
    direct_fid = FrechetInceptionDistance(feature=net)
    direct_kid = KernelInceptionDistance(feature=net, subset_size=KID["kid_subset_size"], subsets=KID["kid_subsets"])
    for metric in (direct_fid, direct_kid):
        metric.update(as_uint8_images(images), real=True)
        metric.update(as_uint8_images(generated), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        kid, kid_std = direct_kid.compute()
    loaded = read_reference(stats_file)
    for stats in (reference, loaded, stats_file):
        result = evaluate(generated, stats, net, batch_size=64, seed=0, **KID)
        assert result["fid"] == pytest.approx(float(direct_fid.compute()), rel=1e-6)
        assert (result["kid"], result["kid_std"]) == pytest.approx((float(kid), float(kid_std)), rel=1e-4)
    assert loaded.num_images == 256 and loaded.image_shape == (3, 16, 16)
    assert loaded.mu.dtype == loaded.sigma.dtype == np.float64 and loaded.features.dtype == np.float32
    assert loaded.features.shape == (256, 64) and loaded.feature_network == "standin.pt"
    np.testing.assert_array_equal(loaded.sigma, reference.sigma)


def test_the_feature_subset_for_kid_is_seeded_and_bounded(images, net):
    first = reference_statistics(images, net, max_features=100, seed=3)
    again = reference_statistics(images, net, max_features=100, seed=3, batch_size=7)
    other = reference_statistics(images, net, max_features=100, seed=4)
    assert first.features.shape == (100, 64) and first.num_images == 256
    np.testing.assert_allclose(first.features, again.features, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first.features, other.features)
    # the subset is drawn from the whole set, not its first rows
    everything = reference_statistics(images, net).features
    rows = [int(np.argmin(np.abs(everything - row).sum(axis=1))) for row in first.features]
    assert len(set(rows)) == 100 and max(rows) > 200


def test_a_mu_sigma_only_file_gives_fid_and_says_why_kid_is_missing(images, reference, net, tmp_path):
    path = tmp_path / "pytorch_fid_style.npz"
    np.savez(path, mu=reference.mu, sigma=reference.sigma)
    generated = _noisy(images, 24, seed=1)
    result = evaluate(generated, path, net, **KID)
    assert result["fid"] == pytest.approx(evaluate(generated, reference, net, **KID)["fid"], rel=1e-6)
    assert result["kid"] is None and result["kid_std"] is None and result["num_reference"] is None
    notes = " ".join(result["notes"])
    assert "KID is not available" in notes and "only mu and sigma" in notes and "does not say which" in notes


def test_statistics_of_another_feature_network_are_refused(stats_file, images, tmp_path):
    other = load_feature_network(make_feature_network(tmp_path / "standin.pt", seed=1))  # same name, other weights
    with pytest.raises(EvaluationError, match="computed with the feature network standin.pt .* --save-reference"):
        evaluate(images, stats_file, other)
    narrow = load_feature_network(make_feature_network(tmp_path / "narrow.pt", num_features=32))
    with pytest.raises(EvaluationError, match="64-dimensional statistics.* gives 32 features"):
        evaluate(images, stats_file, narrow)


def test_a_missing_inception_file_says_where_it_looked_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    default = tmp_path / "home" / ".cache" / "ddpm-engine" / "inception-2015-12-05.pt"
    for given, expected, how in [(None, default, "default location"), (tmp_path / "given.pt", tmp_path / "given.pt",
                                                                        "--inception")]:
        with pytest.raises(EvaluationError) as error:
            load_feature_network(given)
        message = str(error.value)
        assert str(expected) in message and INCEPTION_URL in message and how in message and "\n" not in message
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "from_env.pt"))
    with pytest.raises(EvaluationError, match=f"from_env.pt .from \\${INCEPTION_ENV}"):
        load_feature_network()
    (tmp_path / "broken.pt").write_bytes(b"not a TorchScript file")
    with pytest.raises(EvaluationError, match="cannot use .*broken.pt as the FID feature network"):
        load_feature_network(tmp_path / "broken.pt")


@pytest.mark.parametrize("shard_format", ["png", "array"])
def test_reference_from_a_prepared_data_set_reads_every_image_once(tmp_path, reference, net, shard_format):
    out = tmp_path / "shapes"
    # the same 256 images as the `images` fixture, in 5 shards (one short)
    prepare("shapes", out, shard_size=60, num=256, image_size=16, channels=3, seed=0, shard_format=shard_format,
            progress=False)
    stats = reference_statistics(out, net, batch_size=50)
    assert stats.num_images == 256 and stats.image_shape == (3, 16, 16)
    np.testing.assert_allclose(stats.mu, reference.mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, reference.sigma, rtol=1e-7, atol=1e-9)
    assert reference_statistics(out, net, num=100).num_images == 100
    # the read order, hence the KID feature subset, does not depend on the batch size
    few = reference_statistics(out, net, batch_size=7, max_features=50)
    np.testing.assert_allclose(few.features, reference_statistics(out, net, max_features=50).features, rtol=1e-5,
                               atol=1e-5)


def test_reference_from_an_image_folder_and_images_from_any_folder(tmp_path, images, reference, net):
    for index, (image, (_, _, label)) in enumerate(zip(images, iter_shapes(256, 16, 3, 0))):
        folder = tmp_path / "classes" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    stats = reference_statistics(tmp_path / "classes", net)
    assert stats.num_images == 256
    np.testing.assert_allclose(stats.sigma, reference.sigma, rtol=1e-7, atol=1e-9)
    # a flat folder of samples, as a generator might write them, including a grayscale and an RGBA one
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(images[0]).save(flat / "a.png")
    Image.fromarray(images[1][:, :, 0]).save(flat / "b.png")
    Image.fromarray(np.dstack([images[2], np.full((16, 16), 7, np.uint8)])).save(flat / "c.png")
    (flat / ".hidden.png").write_bytes(b"junk")
    found = open_images(flat)
    assert found.total == 3
    batches = list(found.read(8, None))
    assert [tuple(batch.shape) for batch in batches] == [(1, 3, 16, 16), (1, 1, 16, 16), (1, 4, 16, 16)]
    # grayscale is repeated to RGB and alpha dropped, by the feature network's wrapper
    gray = torch.from_numpy(images[1][None, :, :, :1]).permute(0, 3, 1, 2)
    torch.testing.assert_close(net(batches[1]), net(gray.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(net(batches[2]), net(as_uint8_images(images[2:3])))


def test_streamed_model_outputs_match_uint8_arrays_and_leave_the_generator_alone(images, reference, net):
    generated = _noisy(images, 24, seed=1)
    floats = as_uint8_images(generated).float() / 127.5 - 1  # model outputs in [-1, 1]
    state = torch.get_rng_state()
    streamed = evaluate((floats[i:i + 30] for i in range(0, 256, 30)), reference, net, **KID)
    assert torch.equal(torch.get_rng_state(), state)
    whole = evaluate(generated, reference, net, **KID)
    assert streamed["fid"] == pytest.approx(whole["fid"], rel=1e-9) and streamed["kid"] == pytest.approx(whole["kid"])
    with pytest.raises(DataError, match="uint8 .N, H, W, C."):
        evaluate(generated.astype(np.float32), reference, net)
    # (first index, batch) pairs, as engine.sampling.Sampler.batches yields them: any order gives the same KID
    pairs = [(start, floats[start:start + 40]) for start in range(0, 256, 40)]
    shuffled = evaluate(pairs[::-1], reference, net, **KID)
    assert (shuffled["fid"], shuffled["kid"]) == pytest.approx((whole["fid"], whole["kid"]), rel=1e-6)
    assert evaluate(pairs[::-1][:1] + pairs[:-1], reference, net, **KID)["kid"] == pytest.approx(whole["kid"], rel=1e-6)
    # ...while the same batches without their indices, in another order, draw other KID subsets
    assert evaluate([batch for _, batch in pairs[::-1]], reference, net, **KID)["kid"] != pytest.approx(whole["kid"])


def test_a_kid_subset_larger_than_the_images_is_clamped_with_a_note(images, reference, net):
    result = evaluate(images[:50], reference, net)  # default subset size 1000
    assert result["kid_subset_size"] == 50 and math.isfinite(result["kid"])
    assert any("clamped to 50" in note for note in result["notes"])
    with pytest.raises(EvaluationError, match="at least 2 generated images"):
        evaluate(images[:1], reference, net)


def test_the_cli_saves_a_reference_and_evaluates_against_it(tmp_path, images, net_file, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=_noisy(images, 24, seed=1))
    assert main(["--save-reference", str(tmp_path / "ref.npz"), "--reference", str(tmp_path / "samples.npz"),
                 "--inception", str(net_file)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = tmp_path / "data"
    prepare("shapes", data, shard_size=64, num=256, image_size=16, channels=3, seed=0, progress=False)
    assert main(["--save-reference", str(tmp_path / "ref.npz"), "--reference", str(data), "--inception",
                 str(net_file)]) == 0
    # as a user runs it
    result = run("engine.evaluate", tmp_path / "samples.npz", "--reference", tmp_path / "ref.npz", "--inception",
                 net_file, "--json", tmp_path / "out" / "metrics.json", "--kid-subset-size", 100, "--kid-subsets", 10)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"FID \d+\.\d\d  KID -?\d\.\d{4} ± \d\.\d{4} \(256 images vs 256 reference\)\n", result.stdout)
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fid", "kid", "kid_std", "num_images", "num_reference", "notes", "feature_network"} <= set(record)
    assert record["num_images"] == 256 and record["kid_subset_size"] == 100 and record["fid"] > 0


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, images, net_file, stats_file, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    np.savez(tmp_path / "samples.npz", arr_0=images[:10])
    cases = [
        (["samples.npz", "--reference", str(stats_file)], INCEPTION_URL),  # no Inception anywhere
        (["missing.npz", "--reference", str(stats_file), "--inception", str(net_file)], "missing.npz does not exist"),
        ([str(stats_file), "--reference", str(stats_file), "--inception", str(net_file)], "statistics file"),
        (["samples.npz", "--reference", "nowhere", "--inception", str(net_file)], "nowhere does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["samples.npz", "--reference", str(stats_file), "--device", "cuda"], "CUDA is not available"))
    monkeypatch.chdir(tmp_path)
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("evaluate: error: ") and expected in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["samples.npz"])  # no --reference
    assert exit_.value.code == 2


# Run by torchrun with 2 ranks: rank 0 computes the reference from the prepared set and sends it; the
# library call gets batches dealt to the ranks in turn (as engine.sampling.Sampler.batches deals them),
# with their indices; the CLI then reads its contiguous half of the same samples.
TWO_RANKS = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import numpy as np
from engine.distributed import init_distributed, shutdown_distributed
from engine.evaluate import evaluate, load_feature_network, load_reference, main

data, net_file, samples, out = sys.argv[1:5]
context = init_distributed("cpu")
net = load_feature_network(net_file)
reference = load_reference(data, net)
images = np.load(samples)["arr_0"]
starts = range(11 * context.rank, len(images), 11 * context.world_size)
result = evaluate([(start, images[start:start + 11]) for start in starts], reference, net, kid_subset_size=40,
                  kid_subsets=20)
with open(f"{out}/library-{context.rank}.json", "w") as file:
    json.dump(result, file)
assert main(sys.argv[5:]) == 0
shutdown_distributed()
"""


def test_two_ranks_each_with_part_of_the_images_give_the_single_process_numbers(tmp_path, images, net_file):
    data = tmp_path / "data"
    prepare("shapes", data, shard_size=64, num=256, image_size=16, channels=3, seed=0, progress=False)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_noisy(images[:45], 24, seed=1))  # ranks get 22 and 23 images, in 2 and 3 batches
    cli = [str(samples), "--reference", str(data), "--inception", str(net_file), "--batch-size", "11",
           "--kid-subset-size", "40", "--kid-subsets", "20"]
    assert main([*cli, "--json", str(tmp_path / "single.json")]) == 0
    single = json.loads((tmp_path / "single.json").read_text())
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    ranks = run(tmp_path / "two_ranks.py", data, net_file, samples, tmp_path, *cli, "--json", tmp_path / "ranks.json",
                launcher=TORCHRUN)
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stdout.count("FID ") == 1  # the CLI reports on rank 0 only
    cli_ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert (single["world_size"], cli_ranks["world_size"]) == (1, 2)
    for result in [cli_ranks] + [json.loads((tmp_path / f"library-{rank}.json").read_text()) for rank in (0, 1)]:
        assert result["num_images"] == 45 and result["num_reference"] == 256
        assert result["fid"] == pytest.approx(single["fid"], rel=1e-6)
        assert (result["kid"], result["kid_std"]) == pytest.approx((single["kid"], single["kid_std"]), rel=1e-4)


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"{CIFAR_TAR} is not here")
def test_a_reference_from_the_cifar_tarball(net):
    stats = reference_statistics(CIFAR_TAR, net, num=200)
    assert stats.num_images == 200 and stats.image_shape == (3, 32, 32) and stats.features.shape == (200, 64)
    assert np.isfinite(stats.sigma).all() and stats.source == str(CIFAR_TAR)


def test_training_evaluates_fid_and_kid_every_n_steps_and_logs_them(tmp_path, shapes16):
    from test_outputs import _tensorboard_events
    from test_train_cli import losses, train

    inception = make_feature_network(tmp_path / "stand-in.pt")
    evaluation = ["eval.every=2", "eval.num_images=8", "eval.batch_size=4", "eval.steps=2", f"eval.inception={inception}"]
    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=3", "train.tensorboard=true", *evaluation)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "fid" in r]
    assert [r["step"] for r in evaluations] == [2, 3]  # every 2 steps, and at the end
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 and r["eval_images"] == 8 for r in evaluations)
    assert sorted(losses(run_dir)) == [2, 3]  # loss records still read as before
    assert (run_dir / "fid_reference.npz").is_file(), "the data set's statistics are cached in the run"
    assert "step 2: FID" in result.stderr
    pytest.importorskip("tensorboard")
    events = _tensorboard_events(run_dir / "tensorboard")
    assert [e.step for e in events.Scalars("fid")] == [2, 3] and "samples" in events.Tags()["images"]

    missing = train(tmp_path / "missing", shapes16, "train.steps=1", *evaluation[:-1],
                    f"eval.inception={tmp_path / 'nowhere.pt'}")
    assert missing.returncode == 2 and "nowhere.pt" in missing.stderr and "Traceback" not in missing.stderr


# steps that move the weights off their initial values, at which the class cannot change the output; 64 channels at
# the second level: with 32 or fewer, GroupNorm has one channel per group and cancels the class embedding's shift
TRAINED = ["optim.warmup_steps=0", "optim.lr=1e-2", "train.ema_decay=0", "model.base_channels=32"]


def test_a_conditional_run_is_evaluated_at_its_guidance_and_the_cli_sweeps_scales_and_names_the_best(
        tmp_path, shapes16, capsys):
    from test_train_cli import train

    inception = make_feature_network(tmp_path / "stand-in.pt")
    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=3", "model.num_classes=4", "model.label_dropout=0.2",
                   "eval.every=3", "eval.num_images=8", "eval.batch_size=8", "eval.steps=2", "eval.guidance=2",
                   f"eval.inception={inception}", "train.post_hoc_ema_sigma_rels=[0.05,0.2]", *TRAINED)
    assert result.returncode == 0, result.stderr
    logged = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "fid" in line)
    assert logged["eval_guidance"] == 2.0 and "at guidance 2" in result.stderr
    cli = ["--run", str(run_dir), "--reference", str(run_dir / "fid_reference.npz"), "--inception", str(inception)]
    assert main([*cli, "--guidance", "0,2,4", "--json", str(tmp_path / "sweep.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["guidance 0", "guidance 2", "guidance 4"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    fids = [r["fid"] for r in sweep["results"]]
    assert [r["guidance"] for r in sweep["results"]] == [0.0, 2.0, 4.0] and len(set(fids)) == 3
    assert sweep["best"]["fid"] == min(fids) and lines[3] == f"best: guidance {sweep['best']['guidance']:g}, " \
                                                              f"FID {min(fids):.2f}"
    # the same weights, images and classes as training's evaluation at the end
    assert fids[1] == pytest.approx(logged["fid"], rel=1e-3)
    # post-hoc EMA lengths are swept as the scales are (EDM2's choice of the EMA after training)
    assert main([*cli, "--guidance", "2", "--ema", "0.05,0.1", "--json", str(tmp_path / "ema.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["ema 0.05, guidance 2", "ema 0.1, guidance 2"]
    emas = json.loads((tmp_path / "ema.json").read_text())
    assert [(r["ema"], r["step"]) for r in emas["results"]] == [("0.05", 3), ("0.1", 3)]
    assert lines[2].startswith(f"best: ema {emas['best']['ema']}, guidance 2, FID ")
    assert len({r["fid"] for r in emas["results"]}) == 2
    assert main([*cli[2:], "--run", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("evaluate: error: run directory") and "missing does not exist" in error
