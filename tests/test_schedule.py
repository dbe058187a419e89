"""Schedules against their closed forms and the DDPM paper's textbook values, in float64."""

import math

import pytest
import torch

from engine.schedule import NoiseSchedule, make_betas


def test_linear_schedule_matches_the_ddpm_paper():
    schedule = NoiseSchedule.create("linear", 1000, 1e-4, 0.02)
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    # the textbook value: abar_T of the linear schedule is about 4.04e-5
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=2e-3)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_alphas_cumprod_is_the_product_of_one_minus_beta(name):
    schedule = NoiseSchedule.create(name, 1000)
    expected = torch.exp(torch.cumsum(torch.log1p(-schedule.betas), 0))
    torch.testing.assert_close(schedule.alphas_cumprod, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(schedule.sqrt_alphas_cumprod ** 2 + schedule.sqrt_one_minus_alphas_cumprod ** 2,
                               torch.ones(1000, dtype=torch.float64))
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())


def test_cosine_schedule_follows_its_closed_form_and_caps_beta():
    T, s = 1000, 0.008
    schedule = NoiseSchedule.create("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # uncapped region: abar_t = f(t+1) / f(0)
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert schedule.betas.max().item() == pytest.approx(0.999)  # the cap bites at the last step
    assert torch.equal(make_betas("cosine", T), make_betas("squaredcos_cap_v2", T))


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = make_betas("scaled_linear", 100, 1e-4, 0.02)
    roots = betas.sqrt()
    torch.testing.assert_close(roots[1:] - roots[:-1], torch.full((99,), (0.02 ** 0.5 - 1e-2) / 99, dtype=torch.float64))


def test_posterior_quantities_match_their_definitions():
    s = NoiseSchedule.create("linear", 1000)
    abar, abar_prev, beta, alpha = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas, s.alphas
    assert abar_prev[0].item() == 1.0
    torch.testing.assert_close(abar_prev[1:], abar[:-1])
    torch.testing.assert_close(s.posterior_variance, beta * (1 - abar_prev) / (1 - abar))
    assert s.posterior_variance[0].item() == 0.0
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    torch.testing.assert_close(s.posterior_mean_coef1, beta * abar_prev.sqrt() / (1 - abar))
    torch.testing.assert_close(s.posterior_mean_coef2, (1 - abar_prev) * alpha.sqrt() / (1 - abar))
    torch.testing.assert_close(s.eps_coef, beta / (1 - abar).sqrt())


def test_cast_once_converts_every_tensor():
    schedule = NoiseSchedule.create("linear", 50).to("cpu", torch.float32)
    for name, value in vars(schedule).items():
        assert value.dtype == torch.float32, name
    assert schedule.num_timesteps == 50


def test_invalid_betas_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)
