"""The forward process, losses and samplers, checked in float64 against the equations."""

import pytest
import torch

from engine import diffusion
from engine.schedule import NoiseSchedule
from kernels.noise import noise_keys, randn_like
from kernels.registry import resolve_kernels

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("linear", T)


@pytest.fixture(scope="module")
def kernels():
    return resolve_kernels(device="cpu")  # the PyTorch references


def _batch(seed=0, shape=(6, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])[: shape[0]]
    return x0, eps, t


def test_the_two_forms_of_the_posterior_mean_agree(schedule):
    x0, eps, t = _batch()
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    via_x0 = diffusion.q_posterior_mean(schedule, diffusion.predict_x0_from_eps(schedule, x_t, t, eps), x_t, t)
    direct = diffusion.posterior_mean_from_eps(schedule, x_t, t, eps)
    torch.testing.assert_close(via_x0, direct, rtol=1e-9, atol=1e-9)


def test_q_sample_has_the_stated_mean_and_variance(schedule):
    # Monte Carlo over 200k draws: mean sqrt(abar) x0, variance 1 - abar
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for t_value, x0_value in ((0, 0.7), (250, -0.3), (999, 0.9)):
        x0 = torch.full((n, 1, 1, 1), x0_value, dtype=torch.float64)
        t = torch.full((n,), t_value)
        x_t = diffusion.q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        abar = schedule.alphas_cumprod[t_value].item()
        assert x_t.mean().item() == pytest.approx(abar ** 0.5 * x0_value, abs=5 * (1 - abar) ** 0.5 / n ** 0.5 + 1e-12)
        assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_each_target_maps_back_to_the_noise(schedule, target):
    x0, eps, t = _batch()
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    output = diffusion.training_target(schedule, x0, eps, t, target)
    torch.testing.assert_close(diffusion.eps_from_model_output(schedule, x_t, t, output, target), eps, rtol=1e-7, atol=1e-7)


def test_antithetic_timesteps_come_in_mirrored_pairs():
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(64, T, "antithetic", generator=g)
    assert t.shape == (64,)
    torch.testing.assert_close(t[:32] + t[32:], torch.full((32,), T - 1))
    u = diffusion.sample_timesteps(10_000, T, "uniform", generator=g)
    assert u.min() >= 0 and u.max() <= T - 1 and len(u.unique()) > 900
    with pytest.raises(ValueError, match="even"):
        diffusion.sample_timesteps(5, T, "antithetic")


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_training_loss_is_the_mse_to_the_target(schedule, kernels, target):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 4, 4), generator=g, dtype=torch.uint8)
    flip = torch.tensor([True, False, True, True, False, False])
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    keys = noise_keys(7, torch.arange(6))
    model = lambda x, t: 0.5 * x
    loss = diffusion.training_loss(model, kernels, schedule.to("cpu", torch.float32), images, flip, t, keys, target=target)
    x0 = images.double() / 127.5 - 1
    x0[flip] = x0[flip].flip(-1)
    noise = randn_like(x0, keys, t)
    error = 0.5 * diffusion.q_sample(schedule, x0, t, noise) - diffusion.training_target(schedule, x0, noise, t, target)
    assert loss.dtype == torch.float32 and loss.shape == (6,)  # per sample
    torch.testing.assert_close(loss.double(), error.square().mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_loss_coefficients_express_the_training_target(schedule, target):
    x0, eps, t = _batch()
    noise_coef, x0_coef = diffusion.loss_coefficients(schedule, target)
    combined = diffusion.extract(noise_coef, t, x0) * eps + diffusion.extract(x0_coef, t, x0) * x0
    torch.testing.assert_close(combined, diffusion.training_target(schedule, x0, eps, t, target), rtol=1e-12, atol=1e-12)


def test_ddim_with_eta_one_over_all_steps_is_the_ddpm_posterior(schedule):
    x0, eps, t = _batch()
    t = t.clamp(min=1)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    eps_hat = eps + 0.1
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ddpm = diffusion.posterior_step(schedule, x_t, t, eps_hat, z, variance="fixed_small")
    ddim = diffusion.ddim_step(schedule, x_t, t, t - 1, eps_hat, z, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [10, 1000])
def test_the_ddim_update_in_float32_is_the_float64_one_at_every_step_of_a_plan(kernels, schedule_name, eta,
                                                                               num_steps):
    """x_t = sqrt(1 - abar_t) eps (x_0 = 0), so x_prev is the direction and noise terms alone. Their scale
    sqrt(1 - abar_prev - sigma^2) is 1e-9 of its terms at eta = 1 on the cosine schedule's first step: computed
    as that difference in float32 it came out 0 against 2.8e-4 (and machine-dependent rounding noise). Between
    adjacent steps (1,000), sigma's 1 - abar_t / abar_prev lost 2e-4 relative the same way."""
    schedule = NoiseSchedule.create(schedule_name, T)
    steps = diffusion.ddim_timesteps(T, num_steps)[::-1]
    t = torch.tensor(steps)
    t_prev = torch.tensor([*steps[1:], -1])
    eps = torch.randn((num_steps, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = noise_keys(0, torch.arange(num_steps))
    x_prev = {}
    for dtype in (torch.float64, torch.float32):
        alphas_cumprod = schedule.alphas_cumprod.float().to(dtype)  # the same table: only the arithmetic differs
        x_t = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * eps.to(dtype)  # as the update computes it: x_0 = 0
        x_prev[dtype] = kernels.ddim_step(x_t, eps.to(dtype), t, t_prev, keys, alphas_cumprod, eta, False, False)
    torch.testing.assert_close(x_prev[torch.float32].double(), x_prev[torch.float64], rtol=1e-4, atol=1e-6)


def test_no_noise_is_added_at_the_last_step(schedule):
    x0, eps, _ = _batch()
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    with_noise = diffusion.posterior_step(schedule, x_t, t, eps, torch.full_like(x0, 100.0))
    torch.testing.assert_close(with_noise, diffusion.posterior_step(schedule, x_t, t, eps, torch.zeros_like(x0)))
    torch.testing.assert_close(with_noise, x0)


def test_ddim_timesteps_are_evenly_spaced():
    assert diffusion.ddim_timesteps(1000, 1000) == list(range(1000))
    steps = diffusion.ddim_timesteps(1000, 10)
    assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 999
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) - min(gaps) <= 1


def _oracle(schedule, point):
    """The ideal eps-predictor when the data set is the single point `point`."""
    def model(x_t, t):
        return (x_t - diffusion.extract(schedule.sqrt_alphas_cumprod, t, x_t) * point) / \
            diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return model


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("options", [
    dict(sampler="ddpm", variance="fixed_large", clip_denoised=True),
    dict(sampler="ddpm", variance="fixed_small", clip_denoised=False),
    dict(sampler="ddim", steps=50, eta=0.0, clip_denoised=False),
    dict(sampler="ddim", steps=20, eta=1.0, clip_denoised=True),
])
def test_sampling_with_an_oracle_returns_the_training_point(name, options, kernels):
    schedule = NoiseSchedule.create(name, T)
    point = torch.rand((1, 3, 4, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.8 - 0.9
    images = diffusion.sample(_oracle(schedule, point), schedule, kernels, (4, 3, 4, 4), seed=0, dtype=torch.float64, **options)
    torch.testing.assert_close(images, point.expand(4, -1, -1, -1), rtol=1e-7, atol=1e-7)


def test_sampling_is_seeded_and_independent_of_the_batch_split(schedule, kernels):
    model = lambda x, t: 0.1 * x
    run = lambda seed, shape=(4, 1, 2, 2), first=0: diffusion.sample(model, schedule, kernels, shape, seed=seed, first_index=first,
                                                                    sampler="ddim", steps=5, eta=1.0)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    halves = torch.cat([run(1, (2, 1, 2, 2), 0), run(1, (2, 1, 2, 2), 2)])
    assert torch.equal(halves, run(1))  # image i is keyed by (seed, i), not by its batch


# ----------------------------------------------------------------------------- DDIM options against diffusers (issue 12)


def _ddim_inputs(schedule, seed=3, shape=(6, 3, 4, 4), scale=3.0):
    """x_t and an eps whose implied x0 overshoots [-1, 1], as an undertrained network's does."""
    x0, eps, t = _batch(seed, shape)
    x_t = diffusion.q_sample(schedule, x0 * scale, t, eps)
    eps_hat = eps + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x_t, eps_hat


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("thresholding", ["static", "dynamic"])
def test_ddim_steps_equal_diffusers_ddim_scheduler_for_both_eps_conventions(schedule, kernels, use_clipped_model_output,
                                                                           thresholding):
    diffusers = pytest.importorskip("diffusers")
    # sample_max_value unbounded: Imagen's s = max(1, quantile), which diffusers caps at sample_max_value
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                                        thresholding=thresholding == "dynamic", sample_max_value=1e9)
    scheduler.set_timesteps(50)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()  # theirs are float32: compare the maths in float64
    x_t, eps_hat = _ddim_inputs(schedule)
    step = diffusion.denoising_step(lambda x, t: eps_hat, schedule, kernels, sampler="ddim", clip_denoised=True,
                                    use_clipped_model_output=use_clipped_model_output, thresholding=thresholding,
                                    dtype=torch.float64)
    for timestep in (980, 500, 20, 0):
        t = torch.full((6,), timestep)
        ours = step(x_t, t, t - 20, noise_keys(0, torch.arange(6)))
        theirs = scheduler.step(eps_hat, timestep, x_t, eta=0.0, use_clipped_model_output=use_clipped_model_output)
        torch.testing.assert_close(ours, theirs.prev_sample, rtol=1e-9, atol=1e-9)


def test_the_two_eps_conventions_differ_once_x0_is_clipped(schedule):
    x_t, eps_hat = _ddim_inputs(schedule)
    t = torch.full((6,), 500)
    network_eps = diffusion.ddim_step(schedule, x_t, t, t - 20, eps_hat, None, clip_denoised=True)
    clipped_eps = diffusion.ddim_step(schedule, x_t, t, t - 20, eps_hat, None, clip_denoised=True,
                                      use_clipped_model_output=True)
    unclipped = [diffusion.ddim_step(schedule, x_t, t, t - 20, eps_hat, None, use_clipped_model_output=flag)
                 for flag in (False, True)]
    assert (network_eps - clipped_eps).abs().max() > 0.01
    torch.testing.assert_close(*unclipped)  # without clipping the flag changes nothing


def test_dynamic_thresholding_rescales_each_sample_by_its_own_quantile(schedule):
    x_t, eps_hat = _ddim_inputs(schedule)
    t = torch.full((6,), 300)
    for clipped in (False, True):
        x_in, eps_in = diffusion.dynamic_threshold(schedule, x_t, t, eps_hat, 0.9, clipped)
        x0 = diffusion.predict_x0_from_eps(schedule, x_in, t, eps_in)
        raw = diffusion.predict_x0_from_eps(schedule, x_t, t, eps_hat)
        s = torch.quantile(raw.abs().flatten(1), 0.9, dim=1).clamp_min(1.0).view(-1, 1, 1, 1)
        torch.testing.assert_close(x0, raw.clamp(-s, s) / s)
        assert x0.abs().max() <= 1 + 1e-9
        assert torch.equal(eps_in, eps_hat) != clipped  # the network's eps kept, or the thresholded x0's


@pytest.mark.parametrize("spacing", diffusion.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_ddim_timesteps_are_diffusers_spacings(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    if spacing == "linspace" and steps == 1:  # theirs is [0], a single step that skips the whole process
        assert diffusion.ddim_timesteps(T, 1, spacing) == [T - 1]
        return
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert diffusion.ddim_timesteps(T, steps, spacing) == sorted(int(t) for t in scheduler.timesteps)
