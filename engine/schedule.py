"""Noise schedules and every quantity derived from them (Ho et al. 2020, section 2).

All of it is computed once in float64 and cast once with `NoiseSchedule.to`, so that
float32/bf16 training never accumulates the rounding of a cumulative product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels.schedule_tables import ScheduleTables, cosine_betas, linear_betas, schedule_tables

SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2", "scaled_linear")


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T in float64."""
    if schedule == "linear":  # the DDPM paper: 1e-4 to 0.02 over T=1000
        return linear_betas(num_timesteps, beta_start, beta_end)
    if schedule == "scaled_linear":  # linear in sqrt(beta), as Stable Diffusion uses
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule(ScheduleTables):
    """The tables the ops read (kernels/schedule_tables.py: one copy of the maths), indexed by t = 0..T-1 (the
    paper's t = 1..T), and what the samplers and plots read besides."""

    alphas: torch.Tensor
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, with abar_0 = 1
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t with beta~_0 replaced by beta~_1 (it is 0)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor of values in (0, 1)")
        tables = schedule_tables(betas)
        variance = tables.posterior_variance
        return cls(**{field.name: getattr(tables, field.name) for field in dataclasses.fields(tables)},
                   alphas=1.0 - betas,
                   alphas_cumprod_prev=torch.cat([torch.ones(1, dtype=torch.float64), tables.alphas_cumprod[:-1]]),
                   posterior_log_variance_clipped=torch.log(torch.cat([variance[1:2], variance[1:]])))

    @classmethod
    def create(cls, schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_betas(make_betas(schedule, num_timesteps, beta_start, beta_end))


def schedule_from_config(diffusion) -> NoiseSchedule:
    """The float64 schedule a config's `diffusion` section describes."""
    return NoiseSchedule.create(diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)
