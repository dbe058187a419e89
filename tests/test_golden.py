"""Golden numbers: absolute anchors for the training loss and the samplers (issue 28).

Every other trajectory test compares two runs (resumed against uninterrupted, two ranks against one, compiled
against eager), so a change that moves both sides alike passes them. These compare one run with numbers stored
in tests/golden/, so they fail when the schedule, the target, the loss weighting, the timestep draw, the data
path, the optimizer or a sampler's maths change:

- the first 20 losses of the tiny preset through the real training loop (`engine.train.train` in this process:
  the loader, the step, the loop's logging), scaled down to run in seconds (`SCALED_DOWN`); once as the preset
  is (cosine schedule, v target) and once with a linear schedule and issue 26's recipe options (EDM target,
  lognormal timesteps, min-SNR weighting, inverse-sqrt LR), so that the betas and the weighting are anchored too;
- the first DDIM and DPM-Solver++(2M) samples (10 steps, seed 0) of the scaled-down tiny model at a seeded
  init, stored as a digest: each image's mean and std and every 96th value.

All run in fp32 on the CPU, in one process, with the PyTorch reference kernels.

When a change is meant to move them, regenerate them, read the diff of tests/golden/ and commit it with the
change (the files' header records the torch version and the command):

    python -m pytest tests/test_golden.py --regenerate-golden

Tolerances: the losses came out bit for bit the same with one and two threads, the samples within ~1e-7
(another summation order in the network's reductions), which is also what another torch release changes
(float32 rounding, ~1e-7 relative per op; not tried here on 2.11). Another machine (an AVX2 AMD EPYC against
the one that wrote them) moved the losses by 1e-7 relative and the DPM-Solver digest by 1e-9; the DDIM digest
moved by 2e-4 until the DDIM update lost its cancellation (kernels/ddim_step.py), which is how that was found.
The smallest deliberate changes tried (the cosine offset s 0.008 -> 0.0081, beta_end 0.02 -> 0.0201, DDIM's
eta or every DPM-Solver coefficient off by 1e-3 or 1e-4 relative) move some number by 2e-5 relative or more.
Hence rtol 1e-5 on the losses and on the sample digests, with atol 1e-6 for digest values near zero: 50 times
the rounding seen, below the smallest change.
"""

import json
import platform
from pathlib import Path

import pytest
import torch

import engine.train
from engine.config import load_config
from engine.sampling import Sampler, with_sample
from engine.schedule import schedule_from_config
from engine.unet import build_unet
from kernels.registry import OPS, resolve_kernels_from_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
REGENERATE = "python -m pytest tests/test_golden.py --regenerate-golden"

# The tiny preset at a size that trains 20 steps in seconds on one core; the rest is the preset's.
SCALED_DOWN = ["model.base_channels=16", "model.channel_mult=[1,2]", "train.batch_size=8"]
REFERENCE_KERNELS = [f"kernels.{op}=pytorch" for op in OPS]
ONE_PROCESS = ["train.device=cpu", "train.precision=fp32", "sample.precision=fp32", "data.num_workers=0"]
# Per-step losses in metrics.jsonl, one checkpoint and a one-image grid at the end (the loop always writes them).
LOGGING = ["train.steps=20", "train.log_every=1", "train.checkpoint_every=20", "train.sample_every=0",
           "sample.num_images=1", "sample.steps=2"]
# A linear schedule and issue 26's recipe options, spelt out (not test_train_cli.RECIPE_OPTIONS: an edit there
# must not move this golden).
RECIPE = ["diffusion.schedule=linear", "diffusion.target=edm", "diffusion.sigma_data=0.5",
          "diffusion.timestep_sampling=lognormal", "diffusion.loss_weighting=min_snr", "optim.lr_schedule=inverse_sqrt",
          "optim.lr_ref_steps=3", "optim.warmup_steps=2", "optim.lr_scaling=sqrt", "optim.reference_batch_size=32",
          "optim.betas=[0.9,0.99]"]
GOLDEN_SETTINGS = [*SCALED_DOWN, *REFERENCE_KERNELS, *ONE_PROCESS]
LOSS_RTOL = 1e-5
SAMPLE_RTOL, SAMPLE_ATOL = 1e-5, 1e-6
DIGEST_STRIDE = 96  # every 96th value of an image: 8 of a 3x16x16 image


def tiny_config(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", [*GOLDEN_SETTINGS, *overrides])


def check_golden(request, name: str, settings: dict, values: dict, rtol: float, atol: float = 0.0) -> None:
    """Compare `values` with tests/golden/NAME.json, or with --regenerate-golden write them there (and skip)."""
    path = GOLDEN / f"{name}.json"
    if request.config.getoption("--regenerate-golden"):
        produced_by = {"command": REGENERATE, "test": request.node.nodeid, "torch": torch.__version__,
                       "python": platform.python_version()}
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"produced_by": produced_by, "settings": settings, **values}, indent=1) + "\n")
        pytest.skip(f"wrote {path.relative_to(ROOT)}: review its diff and commit it")
    assert path.is_file(), f"{path} is missing; write it with {REGENERATE}"
    stored = json.loads(path.read_text())
    assert stored["settings"] == settings, f"{path} was produced with other settings; if meant, run {REGENERATE}"
    for key, value in values.items():
        actual, expected = torch.tensor(value, dtype=torch.float64), torch.tensor(stored[key], dtype=torch.float64)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda message, key=key: (
            f"{key} moved from {path.name}'s: {message}\nIf the change is meant to move them, run {REGENERATE} "
            f"and commit the diff of tests/golden/"))


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("variant, extra", [("tiny", []), ("tiny_recipe", RECIPE)], ids=["preset", "recipe-options"])
def test_the_first_20_training_losses_of_the_tiny_preset_match_the_golden_ones(request, tmp_path, shapes16,
                                                                               variant, extra):
    engine.train.train(tiny_config(*LOGGING, *extra, f"data.path={shapes16}", f"train.run_dir={tmp_path}"))
    records = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    losses = [record["loss"] for record in records if "loss" in record]  # evaluation records have none
    assert len(losses) == 20
    settings = {"preset": "configs/tiny.yaml", "overrides": [*GOLDEN_SETTINGS, *LOGGING, *extra],
                "data": "tests/conftest.py shapes16: 64 procedural 16x16 images, seed 0"}
    check_golden(request, f"{variant}_losses", settings, {"losses": losses}, rtol=LOSS_RTOL)


# ----------------------------------------------------------------------------- samples


def seeded_tiny_model(config) -> torch.nn.Module:
    """The scaled-down tiny UNet at seed 0's init, plus seeded noise on every weight: the init zeroes each
    block's last layer and the output layer (an untrained model predicts 0), and the noise makes the prediction
    depend on x_t and t, so the samples exercise the network as well as the sampler."""
    torch.manual_seed(0)
    model = build_unet(config, "cpu")
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=noise), alpha=0.02)
    return model


def digest(images: torch.Tensor) -> dict[str, list]:
    flat = images.flatten(1).double()
    return {"mean": flat.mean(1).tolist(), "std": flat.std(1).tolist(), "values": flat[:, ::DIGEST_STRIDE].tolist()}


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_the_first_10_step_sample_of_a_seeded_tiny_model_matches_the_golden_digest(request, sampler):
    """The preset's sample settings (DDIM with eta 1, clipping), the sampler and its steps apart."""
    config = with_sample(tiny_config(), "the golden test", sampler=sampler, steps=10)
    images = Sampler(seeded_tiny_model(config), config, schedule_from_config(config.diffusion),
                     resolve_kernels_from_config(config, "cpu"), "cpu").generate(num_images=2, seed=0, batch_size=2)
    assert images.shape == (2, 3, 16, 16) and images.std() > 0.1  # not a blank or collapsed image
    settings = {"preset": "configs/tiny.yaml", "overrides": GOLDEN_SETTINGS,
                "sampler": sampler, "steps": 10, "seed": 0, "num_images": 2,
                "model": "seed 0 init + 0.02 x N(0, 1) noise from seed 1 on every weight (seeded_tiny_model)",
                "digest": f"per image: mean, std, every {DIGEST_STRIDE}th value of the flattened CHW image"}
    name = f"tiny_{sampler.replace('++', 'pp')}_sample"
    check_golden(request, name, settings, digest(images), rtol=SAMPLE_RTOL, atol=SAMPLE_ATOL)
