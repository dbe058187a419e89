"""The samplers with the exact denoiser of Gaussian data (benchmarks/solver_oracle.py): rankings and rates.

Everything is float64 on the PyTorch reference kernels and seeded. The ODE samplers are affine in x_T, so a
batch of 8 fits their output distribution exactly; only the stochastic ones (DDPM, dpm++2m-sde) need a
batch, and their bounds are set against the finite-batch floor they would show if they were perfect.
"""

import math

import numpy as np
import pytest
import torch

from benchmarks import solver_oracle as so
from engine import diffusion, solvers

EXACT_BATCH = 8  # >= 3 points fit A, c per element exactly for a deterministic sampler
NOISY_BATCH = 1024
HIGHER_ORDER = ("dpm++2m", "dpm++3m", "unipc-2", "unipc-3")
OPTIONS = {label: (sampler, options) for label, sampler, options in so.SAMPLERS}


@pytest.fixture(scope="module")
def setup():
    return so.setup()


@pytest.fixture(scope="module")
def end_to_end(setup):
    """{label: {steps: Measurement}} of the ODE samplers through `diffusion.sample`."""
    rows = {}
    for label in so.ODE_ROWS:
        sampler, options = OPTIONS[label]
        rows[label] = {n: so.measure(*setup, label, sampler, n, batch=EXACT_BATCH, **options) for n in so.STEPS}
    return rows


@pytest.fixture(scope="module")
def orders():
    return so.order_table()


@pytest.fixture(scope="module")
def ddpm(setup):
    return so.measure(*setup, "ddpm", "ddpm", so.REFERENCE_STEPS, batch=NOISY_BATCH)


def test_initial_noise_is_the_samplers_x_T(setup):
    # A deterministic sampler's output is an exact affine function of the x_T we reconstruct: no residual at all
    # (a float64-drawn x_T would differ from sample's float32-drawn one by ~1e-7 and leave ~4e-16).
    data, schedule, kernels = setup
    x_T = so.initial_noise(EXACT_BATCH, so.SHAPE, 0, schedule.num_timesteps)
    x_0 = so.run(data, schedule, kernels, "dpm++2m", 10, batch=EXACT_BATCH)
    slope, _, residual = so.output_moments(x_T, x_0)
    assert float(residual.max()) < 1e-26 and float(slope.abs().min()) > 0.01


def test_oracle_is_the_gaussian_score(setup):
    # eps_hat = -b * score of the noised marginal N(a mu, a^2 s^2 + b^2): a formula independent of E[x_0 | x_t]'s.
    data, schedule, _ = setup
    t = torch.tensor([0, 99, 500, 999])
    x_t = torch.randn(4, *so.SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = diffusion.extract(schedule.sqrt_alphas_cumprod, t, x_t)
    b = diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    expected = b * (x_t - a * data.mean) / (a * a * data.std**2 + b * b)
    torch.testing.assert_close(so.oracle(data, schedule)(x_t, t), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label", HIGHER_ORDER)
def test_higher_order_beats_ddim_at_equal_steps(end_to_end, label):
    for n in (10, 20):
        assert end_to_end[label][n].w2_ode < end_to_end["ddim"][n].w2_ode, n
    assert end_to_end[label][20].w2_ode < 0.75 * end_to_end["ddim"][20].w2_ode  # measured 0.54-0.58


@pytest.mark.parametrize("label", so.ODE_ROWS)
def test_end_to_end_error_falls_with_steps(end_to_end, label):
    errors = [end_to_end[label][n].w2_ode for n in so.STEPS]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("label", HIGHER_ORDER)
def test_end_to_end_error_is_the_final_steps(setup, end_to_end, label):
    # Why the end-to-end errors fall at ~2.5x per doubling whatever the order: the last step jumps from trailing
    # spacing's last timestep T/n - 1 to sigma = 0 at first order (it returns E[x_0 | x_t], which shrinks the
    # spread by a s / r against the ODE's), and that one error alone (`final_step_alone`: the exact ODE, then
    # that step) is within 30 % of each higher-order solver's total. The solvers' orders show in the order study.
    data, schedule, _ = setup
    for n in so.STEPS:
        ratio = end_to_end[label][n].w2_ode / so.final_step_alone(data, schedule, n)
        assert 0.6 < ratio < 1.4, (n, ratio)


# Error ratio from 10 to 20 steps on the order study's interval (T-1 down to t = 199, no jump to sigma = 0),
# at least 2^p with margin for the order p each one reaches. Measured: 1.97, 3.90, 5.98, 6.94, 3.75.
RATE_10_20 = {
    "ddim": 1.7,  # first order (2x): DDIM (eta 0) is first-order DPM-Solver++
    "dpm++2m": 3.0,  # second order (4x)
    # Third-order steps, but the method is second order (4x asymptotically: p 2.58 then 2.19, see
    # test_dpm3m_update_is_exact_for_quadratic_x0); only the margin of second order is asserted.
    "dpm++3m": 3.0,
    "unipc-2": 5.0,  # UniP-2 with the UniC corrector is third order (8x), as Zhao et al. 2023 state
}


@pytest.mark.parametrize("label", so.ODE_ROWS)
def test_order_study_rates(orders, label):
    errors = orders[label]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    if label in RATE_10_20:
        assert errors[1] / errors[2] >= RATE_10_20[label], errors
    else:
        # unipc-3 (UniP-3 + UniC: fourth order) only from 20 steps: its per-element errors change sign between
        # 5 and 50 steps (the leading error terms have opposite signs), so at 10-20 they partly cancel (10 -> 20
        # is 3.75x). From 20 to 50 (2.5x the steps) third order at least, 2.5^3 = 15.6 with margin: 18.4 measured.
        assert errors[2] / errors[3] >= 11.0, errors


def _exponential_integrator_error(order: int, x0_of_lambda) -> float:
    """DPM-Solver++'s update of `order` on a trajectory whose data prediction x_0(lambda) is given (the ODE's
    solution is then the integral x_t = sigma_t / sigma_s x_s + sigma_t int e^lambda x_0(lambda) dlambda), minus
    that integral in closed form for x_0 a quadratic c0 + c1 u + c2 u^2 in u = lambda - lambda_s."""
    sigmas = np.array([2.0, 1.3, 0.9, 0.6])
    lam = -np.log(sigmas)
    i, x_s = 2, 0.7
    alpha_t, sigma_t = solvers.alpha_sigma(sigmas[i + 1])
    _, sigma_s = solvers.alpha_sigma(sigmas[i])
    h = lam[i + 1] - lam[i]
    c0, c1, c2 = x0_of_lambda
    x0 = [c0 + c1 * (lam[k] - lam[i]) + c2 * (lam[k] - lam[i]) ** 2 for k in (i, i - 1, i - 2)]
    update = solvers.dpm_solver_weights(sigmas, i, order, sde=False) @ np.array([x_s, *x0, 0.0])
    integral = (-math.expm1(-h) * c0 + (h + math.expm1(-h)) * c1 + (h * h - 2 * h - 2 * math.expm1(-h)) * c2)
    return update - (sigma_t / sigma_s * x_s + alpha_t * integral)


def test_dpm3m_update_is_exact_for_linear_x0():
    assert abs(_exponential_integrator_error(3, (0.3, 0.0, 0.0))) < 1e-12
    assert abs(_exponential_integrator_error(3, (0.3, -0.8, 0.0))) < 1e-12


def test_dpm3m_weighs_the_second_derivative_by_half_the_integrators_weight_as_diffusers_does():
    # Known, and kept for parity (tests/test_solvers.py: every step equals diffusers'): the third-order multistep
    # update of DPM-Solver's reference code and diffusers' alike estimates D2 = h^2 x0''/2 exactly for a
    # quadratic x_0(lambda) but weighs it by alpha_t (1/2 - (e^-h - 1 + h) / h^2), half the exponential
    # integrator's alpha_t (1 - 2 (e^-h - 1 + h) / h^2). So `dpm++3m` converges at second order (the order study:
    # p 2.58, then 2.19), and its error on a quadratic x_0 is exactly that missing half.
    c2 = 0.5
    sigmas = np.array([2.0, 1.3, 0.9, 0.6])
    h = np.log(sigmas[2] / sigmas[3])
    alpha_t, _ = solvers.alpha_sigma(sigmas[3])
    missing_half = alpha_t * (0.5 - (math.expm1(-h) + h) / h**2) * h * h * c2
    assert abs(_exponential_integrator_error(3, (0.3, -0.8, c2)) + missing_half) < 1e-12
    assert abs(missing_half) > 1e-3


def test_ddpm_reference_and_solvers_at_50_steps(end_to_end, ddpm):
    # DDPM at 1,000 steps is indistinguishable from a perfect sampler at this batch: its W2 to the data (0.054)
    # sits at the floor a perfect sampler's fitted mean and std would show from 1,024 samples (0.057; W2^2 is a
    # sum of 32 such squared errors, so it fluctuates by ~25 %). With 16,384 samples it is 0.016 against a floor
    # of 0.014: its own bias (the fixed_large variance) is ~0.008.
    assert ddpm.w2_data < 2.0 * ddpm.floor
    # The ODE solvers' 50-step errors are exact (no batch noise); the higher-order ones (0.027-0.033, nearly all
    # the final first-order step's) are below the reference's measured W2, and DDIM (first order: 0.109) within 3x.
    for label in HIGHER_ORDER:
        assert end_to_end[label][50].w2_data < ddpm.w2_data, label
    assert end_to_end["ddim"][50].w2_data < 3.0 * ddpm.w2_data


def test_sde_approaches_the_data(setup):
    # 0.82 at 5 steps, 0.072 at 50 (whose floor at this batch is 0.058).
    few, many = (so.measure(*setup, "dpm++2m-sde", "dpm++2m-sde", n, batch=NOISY_BATCH) for n in (5, 50))
    assert many.w2_data < 0.25 * few.w2_data


@pytest.mark.parametrize("label", [*OPTIONS, "ddpm"])
def test_targets_give_the_same_samples(setup, label):
    # The oracle in x0 or v terms is the same denoiser, so every sampler's float64 output must agree with eps's
    # up to rounding (the x_0 <-> eps conversions at t = T-1 divide by sqrt(abar) ~ 6e-3).
    data, schedule, kernels = setup
    sampler, options = OPTIONS.get(label, ("ddpm", {}))
    steps = so.REFERENCE_STEPS if sampler == "ddpm" else 10
    samples = {target: so.run(data, schedule, kernels, sampler, steps, batch=4, target=target, **options)
               for target in diffusion.TARGETS}
    for target in ("x0", "v"):
        torch.testing.assert_close(samples[target], samples["eps"], rtol=0, atol=1e-9)
