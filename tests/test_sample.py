"""Fast and distributed sampling: the compiled denoising step, the deal of image indices over ranks,
and `engine.sample` under torchrun giving what one process gives."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.sampling import Sampler, batch_starts
from engine.schedule import schedule_from_config
from engine.unet import build_unet
from kernels.registry import resolve_kernels_from_config
from test_train_cli import ONE_LEVEL, ROOT, SMALL, run, train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes16):
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    result = train(run_dir, shapes16, "train.steps=3", "model.base_channels=32")  # widths diffusers can express
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("num_images,batch_size,world_size", [(5, 2, 2), (64, 8, 3), (7, 7, 1), (3, 4, 4)])
def test_ranks_draw_disjoint_equal_shares_covering_every_image(num_images, batch_size, world_size):
    shares = [batch_starts(num_images, batch_size, rank, world_size) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1, "every rank must run the same number of batches"
    starts = sorted(start for share in shares for start in share)
    assert len(starts) == len(set(starts))
    covered = {index for start in starts for index in range(start, start + batch_size) if index < num_images}
    assert covered == set(range(num_images))


def test_the_compiled_denoising_step_samples_what_the_eager_one_does():
    config = load_config(ROOT / "configs/tiny.yaml", SMALL + ["model.dropout=0.0", "sample.steps=3", *ONE_LEVEL])
    torch.manual_seed(0)
    model = build_unet(config, "cpu")
    schedule = schedule_from_config(config.diffusion)
    kernels = resolve_kernels_from_config(config, torch.device("cpu"), check=False)
    sampler = Sampler(model, config, schedule, kernels, "cpu")
    eager = sampler.generate(3, 1, 2)
    compiled = sampler.with_settings(compile=True).generate(3, 1, 2)
    assert eager.shape == (3, 3, 16, 16)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_two_ranks_write_what_one_process_writes(tmp_path, trained_run):
    common = ["--num-images", 5, "--batch-size", 2, "--sampler", "ddpm", "--seed", 4, "--device", "cpu"]
    one = run("engine.sample", trained_run, *common, "--out", tmp_path / "one.png", "--npz", tmp_path / "one.npz")
    assert one.returncode == 0, one.stderr
    two = run("engine.sample", trained_run, *common, "--out", tmp_path / "two.png", "--npz", tmp_path / "two.npz",
              "--png-dir", tmp_path / "pngs", ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("sampled 5 images") == 1, "rank 0 alone reports"
    images = np.load(tmp_path / "one.npz")["arr_0"]
    assert np.array_equal(np.load(tmp_path / "two.npz")["arr_0"], images)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    # Both ranks wrote their own images, one PNG per index.
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    for index, path in enumerate(pngs):
        with Image.open(path) as png:
            assert np.array_equal(np.asarray(png), images[index])


def test_the_grid_holds_the_first_images_only(tmp_path, trained_run):
    result = run("engine.sample", trained_run, "--num", 6, "--grid-size", 4, "--sampler", "ddim", "--steps", 2,
                 "--out", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "grid.png") as grid:  # 2 x 2 tiles of 16 px, 2 px borders, enlarged 16x
        assert grid.size == ((2 * 18 + 2) * 16,) * 2
    bad = run("engine.sample", trained_run, "--num-images", 0)
    assert bad.returncode == 2 and "--num-images" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_any_sample_setting_can_be_overridden_among_the_options(tmp_path, trained_run):
    def sample(name, *overrides):
        result = run("engine.sample", trained_run, "--num-images", 2, *overrides, "--sampler", "ddim", "--steps", 3,
                     "--npz", tmp_path / f"{name}.npz", "--out", tmp_path / f"{name}.png")
        assert result.returncode == 0, result.stderr
        return np.load(tmp_path / f"{name}.npz")["arr_0"]

    default = sample("default")
    assert np.array_equal(default, sample("linspace", "sample.timestep_spacing=linspace"))  # the default spacing
    assert not np.array_equal(default, sample("trailing", "sample.timestep_spacing=trailing"))
    wrong_section = run("engine.sample", trained_run, "train.steps=3")
    assert wrong_section.returncode == 2 and "only sample.* settings" in wrong_section.stderr
    typo = run("engine.sample", trained_run, "sample.thresholdin=dynamic")
    assert typo.returncode == 2 and "did you mean 'sample.thresholding'" in typo.stderr


def test_the_fast_solvers_sample_from_the_cli_in_their_steps(tmp_path, trained_run):
    def sample(name, *options):
        result = run("engine.sample", trained_run, "--num-images", 3, "--batch-size", 2, "--seed", 1, *options,
                     "--npz", tmp_path / f"{name}.npz", "--out", tmp_path / f"{name}.png")
        assert result.returncode == 0, result.stderr
        return result.stdout, np.load(tmp_path / f"{name}.npz")["arr_0"]

    stdout, unipc = sample("unipc", "--sampler", "unipc", "--steps", 4, "sample.unipc_order=3")
    assert "unipc" in stdout and unipc.shape == (3, 16, 16, 3)
    _, sde = sample("sde", "--sampler", "dpm++2m-sde", "--steps", 4, "--karras")
    _, sde_again = sample("sde-again", "--sampler", "dpm++2m-sde", "--steps", 4, "--karras")
    assert np.array_equal(sde, sde_again), "the SDE's noise is keyed by the seed and image, not drawn from state"
    assert not np.array_equal(sde, unipc)
    bad = run("engine.sample", trained_run, "--sampler", "unipc", "sample.unipc_order=4")
    assert bad.returncode == 2 and "sample.unipc_order" in bad.stderr


def test_a_run_exported_for_diffusers_samples_and_trains_on_as_the_run_does(tmp_path, trained_run, shapes16):
    exported = tmp_path / "exported"
    assert run("engine.export", trained_run, "--format", "diffusers", exported).returncode == 0
    common = ["--num-images", 3, "--sampler", "ddpm", "--seed", 2, "--eta", 0]
    from_run = run("engine.sample", trained_run, *common, "--out", tmp_path / "a.png", "--npz", tmp_path / "a.npz")
    from_folder = run("engine.sample", exported, *common, "--out", tmp_path / "b.png", "--npz", tmp_path / "b.npz")
    assert from_run.returncode == 0 and from_folder.returncode == 0, from_folder.stderr
    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"])
    raw = run("engine.sample", exported, "--raw")
    assert raw.returncode == 2 and "one set of weights" in raw.stderr

    # Training from the folder starts at its weights (a vanishing learning rate keeps them).
    again = train(tmp_path / "again", shapes16, "train.steps=1", "model.base_channels=32",
                  f"train.init_from={exported}", "optim.lr=1e-12")
    assert again.returncode == 0, again.stderr
    assert "starting from the weights" in again.stderr
    from safetensors.torch import load_file
    from engine.diffusers_format import unet_to_diffusers
    from engine.checkpoint import load_latest_checkpoint
    state, _ = load_latest_checkpoint(tmp_path / "again")
    _, expected = unet_to_diffusers(state["model"], state["config"])
    for name, value in load_file(exported / "unet" / "diffusion_pytorch_model.safetensors").items():
        torch.testing.assert_close(expected[name], value, atol=1e-6, rtol=0, msg=name)
    other = train(tmp_path / "other", shapes16, "train.steps=1", f"train.init_from={exported}")
    assert other.returncode == 2 and "model.base_channels" in other.stderr
