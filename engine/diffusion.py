"""The DDPM forward process, training loss and samplers (Ho et al. 2020; DDIM: Song et al. 2021).

Each function maps onto one equation of the papers. `posterior_step` and `ddim_step` are the
per-step updates the samplers loop over; they are the references that faster kernels must match.
Timesteps index the schedule from 0 (the paper's t = 1) to T-1 (the paper's t = T).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from engine.progress import progress_bar
from engine.schedule import NoiseSchedule

TARGETS = ("eps", "x0", "v")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output


def extract(coefficients: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coefficients[t], shaped to broadcast over a batch shaped like `like`."""
    return coefficients[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------- forward process


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (eq. 4)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def sample_timesteps(batch_size: int, num_timesteps: int, mode: str, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform t, or antithetic pairs (t, T-1-t) that lower the variance of the batch loss."""
    if mode == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    if mode == "antithetic":
        if batch_size % 2:
            raise ValueError(f"antithetic timestep sampling needs an even batch size, got {batch_size}")
        half = torch.randint(0, num_timesteps, (batch_size // 2,), generator=generator, device=device)
        return torch.cat([half, num_timesteps - 1 - half])
    raise ValueError(f"unknown timestep sampling {mode!r}; choose uniform or antithetic")


def training_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
    """What the network is trained to predict: eps (the paper), x0, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "v":  # Salimans & Ho 2022
        return extract(schedule.sqrt_alphas_cumprod, t, x0) * noise - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def training_loss(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, *, target: str = "eps",
                  timestep_sampling: str = "uniform", generator: torch.Generator | None = None) -> torch.Tensor:
    """The simplified objective L_simple (eq. 14): MSE between the prediction and its target, in fp32."""
    t = sample_timesteps(x0.shape[0], schedule.num_timesteps, timestep_sampling, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    prediction = model(q_sample(schedule, x0, t, noise), t)
    return F.mse_loss(prediction.float(), training_target(schedule, x0, noise, t, target).float())


# ----------------------------------------------------------------------------- reverse process


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x_0."""
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)


def eps_from_model_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, target: str) -> torch.Tensor:
    """Whatever the network predicts, the samplers work with its implied eps."""
    if target == "eps":
        return output
    if target == "x0":
        return predict_eps_from_x0(schedule, x_t, t, output)
    if target == "v":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return extract(schedule.sqrt_alphas_cumprod, t, x_t) * output + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def q_posterior_mean(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu~_t(x_t, x_0) = coef1 x_0 + coef2 x_t  (eq. 7)."""
    return extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t


def posterior_mean_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)  (eq. 11)."""
    return extract(schedule.sqrt_recip_alphas, t, x_t) * (x_t - extract(schedule.eps_coef, t, x_t) * eps)


def posterior_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, *,
                   variance: str = "fixed_large", clip_denoised: bool = False) -> torch.Tensor:
    """One ancestral step x_{t-1} = mu + sigma_t z (Algorithm 2), with no noise at t = 0.

    With `clip_denoised` the predicted x_0 is clipped to [-1, 1] and the mean is taken from eq. 7
    (as the DDPM code samples); otherwise the direct eps form of eq. 11 is used.
    """
    if clip_denoised:
        x0 = predict_x0_from_eps(schedule, x_t, t, eps).clamp(-1.0, 1.0)
        mean = q_posterior_mean(schedule, x0, x_t, t)
    else:
        mean = posterior_mean_from_eps(schedule, x_t, t, eps)
    if variance == "fixed_large":  # sigma_t^2 = beta_t
        sigma = extract(schedule.betas, t, x_t).sqrt()
    elif variance == "fixed_small":  # sigma_t^2 = beta~_t
        sigma = extract(schedule.posterior_variance, t, x_t).sqrt()
    else:
        raise ValueError(f"unknown variance {variance!r}; choose fixed_large or fixed_small")
    not_last = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return mean + not_last * sigma * noise


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eps: torch.Tensor,
              noise: torch.Tensor | None, *, eta: float = 0.0, clip_denoised: bool = False) -> torch.Tensor:
    """One DDIM update from t to t_prev (Song et al. 2021, eq. 12); t_prev = -1 means the data end (abar = 1)."""
    alphas_cumprod_prev = torch.cat([schedule.alphas_cumprod.new_ones(1), schedule.alphas_cumprod])
    abar_t = extract(schedule.alphas_cumprod, t, x_t)
    abar_prev = extract(alphas_cumprod_prev, t_prev + 1, x_t)
    x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    if clip_denoised:  # clip x_0, then re-derive the eps that points at it
        x0 = x0.clamp(-1.0, 1.0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced over [0, T-1], first and last included, in ascending order."""
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({int(round(x)) for x in np.linspace(0, num_timesteps - 1, steps)})


@torch.no_grad()
def sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], *, sampler: str = "ddpm",
           steps: int | None = None, eta: float = 0.0, variance: str = "fixed_large", clip_denoised: bool = True,
           target: str = "eps", generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """Draw images from pure noise with DDPM ancestral sampling or DDIM. Seeded by `generator`."""
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    batch = shape[0]

    def eps_at(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_from_model_output(schedule, x, t, model(x, t).to(dtype), target)

    if sampler == "ddpm":
        timesteps: Iterable[int] = range(schedule.num_timesteps - 1, -1, -1)
        for step in progress_bar(timesteps, total=schedule.num_timesteps, desc="ddpm", disable=not progress, leave=False):
            t = torch.full((batch,), step, device=device, dtype=torch.long)
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) if step > 0 else torch.zeros_like(x)
            x = posterior_step(schedule, x, t, eps_at(x, t), noise, variance=variance, clip_denoised=clip_denoised)
        return x
    if sampler == "ddim":
        descending = ddim_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)[::-1]
        pairs = list(zip(descending, descending[1:] + [-1]))  # (t, t_prev), ending at the data
        for step, step_prev in progress_bar(pairs, desc="ddim", disable=not progress, leave=False):
            t = torch.full((batch,), step, device=device, dtype=torch.long)
            t_prev = torch.full((batch,), step_prev, device=device, dtype=torch.long)
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) if eta > 0 else None
            x = ddim_step(schedule, x, t, t_prev, eps_at(x, t), noise, eta=eta, clip_denoised=clip_denoised)
        return x
    raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
