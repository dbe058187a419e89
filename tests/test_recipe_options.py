"""The recipe options of issue 26, each against its paper's equations in float64: EDM's preconditioning on the
VP schedule (Karras et al. 2022, Table 1), its log-normal noise levels mapped onto the timesteps, the learning-rate
schedules (EDM2's inverse square root, cosine) and the batch-size scaling rule."""

import math

import pytest
import torch

from engine import diffusion, preconditioning
from engine.config import ConfigError, load_config
from engine.diffusers_format import DiffusersFormatError, diffusers_scheduler_config
from engine.distributed import DistributedContext
from engine.loss_weighting import loss_weights
from engine.lr_schedule import lr_factor, scaled_lr
from engine.schedule import NoiseSchedule, schedule_from_config
from engine.throughput import small_micro_batch_warning
from engine.trainer import build_trainer, step_inputs
from kernels.noise import noise_keys, randn
from kernels.registry import resolve_kernels

T = 1000
TIMESTEPS = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create("linear", T)


def noisy_batch(schedule, seed=0):
    """x0, eps, t and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, in float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((len(TIMESTEPS), 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, eps, TIMESTEPS, diffusion.q_sample(schedule, x0, TIMESTEPS, eps)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- EDM's preconditioning


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 2.0])
def test_edm_denoiser_is_table_1_and_its_lambda_weighted_loss_is_the_plain_loss_on_F(schedule, sigma_data):
    """D = c_skip x + c_out F(c_in x) with x = x_t / sqrt(abar): the network sees input_scale x_t = c_in x, is
    trained on noise_coef eps + x0_coef x0 = (x0 - c_skip x) / c_out, and lambda |D - x0|^2 = |F - F_target|^2."""
    x0, eps, t, x_t = noisy_batch(schedule)
    abar = schedule.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)  # Table 1, EDM column
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    x = x_t / per_sample(abar.sqrt())
    torch.testing.assert_close(x, x0 + per_sample(sigma) * eps, rtol=1e-9, atol=1e-9)  # the VE form of x_t
    scale = preconditioning.input_scales(schedule, "edm", sigma_data)[t]
    torch.testing.assert_close(per_sample(scale) * x_t, per_sample(c_in) * x, rtol=1e-12, atol=1e-12)
    goal = diffusion.training_target(schedule, x0, eps, t, "edm", sigma_data)
    torch.testing.assert_close(goal, (x0 - per_sample(c_skip) * x) / per_sample(c_out), rtol=1e-9, atol=1e-9)
    network = goal + 0.3 * torch.randn(goal.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    denoised = per_sample(c_skip) * x + per_sample(c_out) * network
    torch.testing.assert_close(per_sample(preconditioning.edm_loss_weight(sigma, sigma_data)), per_sample(weight))
    torch.testing.assert_close((per_sample(weight) * (denoised - x0) ** 2), (network - goal) ** 2, rtol=1e-8, atol=1e-10)


def test_edm_with_sigma_data_1_is_v_prediction(schedule):
    """c_in x = x_t and F = -v: the same input, target (negated), sampler weights and loss weights as v."""
    edm, v = (diffusion.loss_coefficients(schedule, target, 1.0) for target in ("edm", "v"))
    for got, expected in zip(edm, v):
        torch.testing.assert_close(got, -expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preconditioning.input_scales(schedule, "edm", 1.0),
                               torch.ones(T, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    for sigma in (0.01, 0.5, 3.0, 150.0):
        a_edm, b_edm = preconditioning.x0_coefficients(sigma, "edm", 1.0)
        a_v, b_v = preconditioning.x0_coefficients(sigma, "v", 1.0)
        assert a_edm == pytest.approx(a_v, rel=1e-12) and b_edm == pytest.approx(-b_v, rel=1e-12)
    torch.testing.assert_close(loss_weights(schedule, "edm", "min_snr", sigma_data=1.0), loss_weights(schedule, "v", "min_snr"))


def test_edm_tables_of_a_float32_schedule_keep_float32_precision_near_t_0(schedule):
    """The trainer and the samplers hold the schedule in float32: its tables come from the square roots computed in
    float64, not from 1 - abar in float32, which keeps 3 digits at t = 0."""
    fp32 = schedule.to("cpu", torch.float32)
    for got, expected in zip(diffusion.loss_coefficients(fp32, "edm", 0.5), diffusion.loss_coefficients(schedule, "edm", 0.5)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(preconditioning.input_scales(fp32, "edm", 0.5), preconditioning.input_scales(schedule, "edm", 0.5),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("target, sigma_data", [("eps", 0.5), ("x0", 0.5), ("v", 0.5), ("edm", 0.5), ("edm", 2.0)])
def test_each_target_maps_back_to_eps_and_x0_and_its_error_factor_holds(schedule, target, sigma_data):
    """What the samplers read from the network's output (eps for DDPM/DDIM, x0 = a x_t + b F for the solvers) and
    the factor the loss weightings convert by: |F - F_hat|^2 = f |x0 - x0_hat|^2 at the same x_t."""
    x0, eps, t, x_t = noisy_batch(schedule)
    output = diffusion.training_target(schedule, x0, eps, t, target, sigma_data)
    torch.testing.assert_close(diffusion.eps_from_model_output(schedule, x_t, t, output, target, sigma_data), eps,
                               rtol=1e-7, atol=1e-7)
    sigmas = preconditioning.vp_sigma(schedule)[t]
    for i, sigma in enumerate(sigmas.tolist()):
        a, b = preconditioning.x0_coefficients(sigma, target, sigma_data)
        torch.testing.assert_close(a * x_t[i] + b * output[i], x0[i], rtol=1e-7, atol=1e-7)
    x0_hat = x0 + 0.1
    eps_hat = (x_t - per_sample(schedule.sqrt_alphas_cumprod[t]) * x0_hat) / per_sample(schedule.sqrt_one_minus_alphas_cumprod[t])
    output_hat = diffusion.training_target(schedule, x0_hat, eps_hat, t, target, sigma_data)  # the same x_t
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    factor = preconditioning.x0_error_factor(snr, target, sigma_data)
    torch.testing.assert_close(((output_hat - output) ** 2).flatten(1).mean(1), factor * 0.01, rtol=1e-6, atol=0)


def test_the_fused_training_loss_of_edm_is_the_lambda_weighted_denoiser_error(schedule):
    """The trainer's path: uint8 images, noise from counters, the noising tables scaled by c_in / sqrt(abar)."""
    sigma_data = 0.5
    kernels = resolve_kernels(device="cpu")
    images = torch.randint(0, 256, (len(TIMESTEPS), 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    flip = torch.zeros(len(TIMESTEPS), dtype=torch.bool)
    keys = noise_keys(3, torch.arange(len(TIMESTEPS)))
    seen = []

    def network(x, t):
        seen.append(x.double())
        return 0.4 * x - 0.1

    fp32 = schedule.to("cpu", torch.float32)
    losses = diffusion.training_loss(network, kernels, fp32, images, flip, TIMESTEPS, keys, target="edm",
                                     coefficients=diffusion.loss_coefficients(fp32, "edm", sigma_data),
                                     noising=diffusion.noising_tables(fp32, "edm", sigma_data))
    x0 = images.double() / 127.5 - 1
    eps = randn(keys, TIMESTEPS, 48).view(x0.shape).double()
    abar = schedule.alphas_cumprod[TIMESTEPS]
    sigma = ((1 - abar) / abar).sqrt()
    c_skip, c_out, c_in = preconditioning.edm_scalings(sigma, sigma_data)
    x = x0 + per_sample(sigma) * eps
    torch.testing.assert_close(seen[0], per_sample(c_in) * x, rtol=1e-5, atol=1e-5)
    denoised = per_sample(c_skip) * x + per_sample(c_out) * (0.4 * per_sample(c_in) * x - 0.1)
    expected = preconditioning.edm_loss_weight(sigma, sigma_data) * ((denoised - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-6)


def analytic_network(x, t):
    """A smooth stand-in for a trained network: any function of (input, t) will do."""
    return torch.tanh(x) * 0.7 + 0.05 * x.flip(-1) - t.view(-1, 1, 1, 1).to(x.dtype) / 4000


@pytest.mark.parametrize("sampler, options", [
    ("ddpm", {}), ("ddim", {"steps": 12, "eta": 0.5}), ("dpm++2m", {"steps": 12}), ("dpm++3m", {"steps": 12}),
    ("dpm++2m-sde", {"steps": 12}), ("unipc", {"steps": 12, "unipc_order": 2}), ("unipc", {"steps": 12, "unipc_order": 3}),
])
def test_every_sampler_reads_an_edm_network_as_its_denoiser(schedule, sampler, options):
    """A network sampled with target=edm draws what the same network draws when it is wrapped into Table 1's
    denoiser D(x_t) = c_skip x_t / sqrt(abar) + c_out F(c_in x_t / sqrt(abar)) and sampled as an x0 predictor."""
    sigma_data = 0.5
    fp64 = schedule.to("cpu", torch.float64)
    scales = preconditioning.input_scales(schedule, "edm", sigma_data)
    sigma = preconditioning.vp_sigma(schedule)
    c_skip, c_out, _ = preconditioning.edm_scalings(sigma, sigma_data)
    sqrt_abar = schedule.sqrt_alphas_cumprod

    def denoiser(x_t, t):
        return (per_sample(c_skip[t] / sqrt_abar[t]) * x_t
                + per_sample(c_out[t]) * analytic_network(per_sample(scales[t]) * x_t, t))

    kernels = resolve_kernels(device="cpu")
    common = dict(seed=5, sampler=sampler, dtype=torch.float64, timestep_spacing="trailing", clip_denoised=True)
    shape = (3, 3, 4, 4)
    steps = options.pop("steps", None)
    got = diffusion.sample(analytic_network, fp64, kernels, shape, steps=steps, target="edm", sigma_data=sigma_data,
                           **common, **options)
    expected = diffusion.sample(denoiser, fp64, kernels, shape, steps=steps, target="x0", **common, **options)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_diffusers_export_refuses_edm_by_name():
    config = load_config("configs/cifar.yaml", ["diffusion.target=edm"])
    with pytest.raises(DiffusersFormatError, match=r"diffusion.target='edm'.*sigma_data=0.5.*diffusion.target=v"):
        diffusers_scheduler_config(config)


# ----------------------------------------------------------------------------- log-normal noise levels


@pytest.mark.parametrize("name, mean, std", [("linear", -1.2, 1.2), ("cosine", 0.4, 0.6)])
def test_lognormal_timesteps_follow_the_normal_in_log_sigma(name, mean, std):
    """ln sigma ~ N(P_mean, P_std^2), each draw on the timestep of the nearest ln sigma: P(t <= k) is the normal's
    CDF at the edge between k and k+1 (Dvoretzky-Kiefer-Wolfowitz: 0.004 at 400,000 draws is a 1e-6 chance)."""
    schedule = NoiseSchedule.create(name, T)
    edges = diffusion.log_sigma_edges(schedule)
    log_sigma = preconditioning.vp_sigma(schedule).log()
    torch.testing.assert_close(edges, (log_sigma[1:] + log_sigma[:-1]) / 2)
    draws = diffusion.lognormal_timesteps(400_000, edges, mean, std, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and 0 <= int(draws.min()) and int(draws.max()) <= T - 1
    empirical = torch.bincount(draws, minlength=T).cumsum(0)[:-1].double() / len(draws)
    exact = 0.5 * (1 + torch.erf((edges - mean) / (std * math.sqrt(2))))
    assert float((empirical - exact).abs().max()) < 0.004
    inside = (draws > 0) & (draws < T - 1)  # the ends also hold the tails beyond the schedule
    assert float(log_sigma[draws[inside]].mean()) == pytest.approx(mean, abs=0.05 if name == "linear" else 0.02)


def test_the_trainer_draws_lognormal_timesteps_with_the_configured_mean_and_std():
    config = load_config("configs/tiny.yaml", ["diffusion.timestep_sampling=lognormal", "diffusion.lognormal_mean=0.5",
                                               "diffusion.lognormal_std=0.3", "train.batch_size=4096", "train.device=cpu"])
    trainer = build_trainer(config, DistributedContext(0, 0, 1, torch.device("cpu")), check_kernels=False)
    t, _, _ = step_inputs(trainer, step=3)
    log_sigma = preconditioning.vp_sigma(trainer.schedule).log()[t]
    assert float(log_sigma.mean()) == pytest.approx(0.5, abs=0.03) and float(log_sigma.std()) == pytest.approx(0.3, abs=0.03)
    assert torch.equal(step_inputs(trainer, step=3)[0], t)  # from (seed, step): a resume draws the same


# ----------------------------------------------------------------------------- learning rate


def test_the_lr_schedules_are_the_closed_forms():
    warmup, total, ref = 100, 1000, 300
    for step in (0, 49, 99, 100, 299, 300, 550, 999):
        ramp = min(1.0, (step + 1) / warmup)
        assert lr_factor(step, "constant", warmup, total, ref) == pytest.approx(ramp)
        assert lr_factor(step, "inverse_sqrt", warmup, total, ref) == pytest.approx(ramp / math.sqrt(max(step / ref, 1)))
        progress = max(0.0, (step - warmup) / (total - warmup))
        assert lr_factor(step, "cosine", warmup, total, ref) == pytest.approx(ramp * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_factor(1200, "inverse_sqrt", warmup, total, ref) == pytest.approx(0.5)  # EDM2: 1/sqrt(t/t_ref)
    assert lr_factor(total, "cosine", warmup, total, ref) == pytest.approx(0.0, abs=1e-12)


def test_the_lr_scaling_rules():
    assert scaled_lr(1e-3, 512, 512, "sqrt") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 128, 512, "sqrt") == pytest.approx(5e-4)
    assert scaled_lr(1e-3, 2048, 512, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 64, 512, "none") == pytest.approx(1e-3)


def test_the_trainer_steps_the_scaled_rate_along_its_schedule():
    """Adam's rate at each step is optim.lr scaled to train.batch_size, times the schedule's factor."""
    config = load_config("configs/tiny.yaml", ["optim.lr=1e-3", "optim.lr_scaling=sqrt", "optim.reference_batch_size=128",
                                               "optim.lr_schedule=inverse_sqrt", "optim.lr_ref_steps=4",
                                               "optim.warmup_steps=2", "train.batch_size=32", "train.device=cpu"])
    trainer = build_trainer(config, DistributedContext(0, 0, 1, torch.device("cpu")), check_kernels=False)
    rates = []
    for _ in range(10):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_schedule.step()
    expected = [5e-4 * min(1, (s + 1) / 2) / math.sqrt(max(s / 4, 1)) for s in range(10)]
    assert rates == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("override, message", [
    ("diffusion.sigma_data=0", "diffusion.sigma_data must be > 0"),
    ("diffusion.lognormal_std=-1", "diffusion.lognormal_std must be > 0"),
    ("diffusion.timestep_sampling=normal", "diffusion.timestep_sampling must be one of uniform, antithetic, lognormal"),
    ("optim.lr_schedule=linear", "optim.lr_schedule must be one of constant, cosine, inverse_sqrt"),
    ("optim.reference_batch_size=0", "optim.reference_batch_size must be positive"),
    ("optim.lr_ref_steps=0", "optim.lr_ref_steps must be positive"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling must be one of none, linear, sqrt"),
])
def test_recipe_option_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/cifar.yaml", [override])


# ----------------------------------------------------------------------------- the batch per GPU


def test_a_micro_batch_too_small_for_a_gpu_is_named_with_what_to_use_instead():
    paper = load_config("configs/cifar.yaml")
    message = small_micro_batch_warning(paper, "cuda", world_size=8)
    assert message is not None
    for part in ("train.batch_size=128", "8 ranks", "16 images of 32x32", "train.batch_size=512", "cifar-fast.yaml"):
        assert part in message
    assert small_micro_batch_warning(paper, "cpu", world_size=8) is None  # a CPU is busy at any batch
    assert small_micro_batch_warning(paper, "cuda", world_size=2) is None  # 64 per GPU
    assert small_micro_batch_warning(load_config("configs/cifar.yaml", ["train.batch_size=512"]), "cuda", 8) is None


def test_the_fast_preset_is_the_paper_model_with_another_recipe():
    """configs/cifar-fast.yaml: the cifar preset's architecture and data, so that only the recipe differs; a global
    batch that gives every one of 8 GPUs at least 64 images; no warning there on CUDA."""
    paper, fast = load_config("configs/cifar.yaml"), load_config("configs/cifar-fast.yaml")
    assert fast.model == paper.model and fast.data == paper.data
    assert fast.train.batch_size >= 512 and fast.train.batch_size // 8 >= 64
    assert small_micro_batch_warning(fast, "cuda", world_size=8) is None
    assert (fast.diffusion, fast.optim) != (paper.diffusion, paper.optim)


def test_lognormal_noise_levels_with_an_eps_target_warn_that_sampling_starts_untrained():
    """The combination that gave noise images in the benchmark's ablation (eps at t >= 900 is never trained, and
    x0 amplifies its error 157x there): named with the way out; v, uniform timesteps or a wide enough normal
    are fine."""
    def warning(*overrides):
        config = load_config("configs/cifar-fast.yaml", list(overrides))
        return diffusion.untrained_start_warning(config.diffusion, schedule_from_config(config.diffusion))

    message = warning("diffusion.target=eps")
    assert message is not None and "diffusion.target=v" in message and "900" in message and "157x" in message
    assert warning() is None  # v
    assert warning("diffusion.target=eps", "diffusion.timestep_sampling=uniform") is None
    assert warning("diffusion.target=eps", "diffusion.lognormal_mean=2.0") is None  # the top is drawn often enough
