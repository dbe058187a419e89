"""The DDPM coefficient tables the ops read, computed from betas (Ho et al. 2020, eqs. 4, 7, 11), and two
beta schedules: linear (the paper) and cosine (Nichol & Dhariwal 2021, which engine/schedule.py takes from here).

The conformance check feeds these to the ops. They live here, not in engine/schedule.py, so that kernels/
never imports engine/; engine's `NoiseSchedule` extends `ScheduleTables` with what only the samplers and plots
read, so the ops' argument builders read either and the maths is written once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduleTables:
    """Per-timestep coefficients, indexed by t = 0..T-1 (the paper's t = 1..T)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor  # abar_t
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor  # 1 / sqrt(alpha_t)
    sqrt_recip_alphas_cumprod: torch.Tensor  # 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # sqrt(1 / abar_t - 1)
    eps_coef: torch.Tensor  # beta_t / sqrt(1 - abar_t), eq. 11
    posterior_variance: torch.Tensor  # beta~_t, eq. 7
    posterior_mean_coef1: torch.Tensor  # multiplies x_0 in mu~_t, eq. 7
    posterior_mean_coef2: torch.Tensor  # multiplies x_t in mu~_t

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> "ScheduleTables":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                                            for f in dataclasses.fields(self)})


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas linear from beta_start to beta_end (the paper: 1e-4 to 0.02), in float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta capped at 0.999."""

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def schedule_tables(betas: torch.Tensor) -> ScheduleTables:
    """Every table from float64 betas."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])  # abar_0 = 1
    one_minus_alphas_cumprod = 1.0 - alphas_cumprod
    return ScheduleTables(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=one_minus_alphas_cumprod.sqrt(),
        sqrt_recip_alphas=alphas.rsqrt(),
        sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        eps_coef=betas / one_minus_alphas_cumprod.sqrt(),
        posterior_variance=betas * (1.0 - alphas_cumprod_prev) / one_minus_alphas_cumprod,
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / one_minus_alphas_cumprod,
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / one_minus_alphas_cumprod,
    )
