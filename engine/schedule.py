"""Noise schedules and every quantity derived from them (Ho et al. 2020, section 2).

All of it is computed once in float64 and cast once with `NoiseSchedule.to`, so that
float32/bf16 training never accumulates the rounding of a cumulative product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels.schedule_tables import cosine_betas  # noqa: F401 (re-exported: the schedules' maths, one copy)

SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2", "scaled_linear")


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T in float64."""
    if schedule == "linear":  # the DDPM paper: 1e-4 to 0.02 over T=1000
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta), as Stable Diffusion uses
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep coefficients, indexed by t = 0..T-1 (the paper's t = 1..T)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor  # abar_t
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, with abar_0 = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor  # 1 / sqrt(alpha_t)
    sqrt_recip_alphas_cumprod: torch.Tensor  # 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # sqrt(1 / abar_t - 1)
    eps_coef: torch.Tensor  # beta_t / sqrt(1 - abar_t), eq. 11
    posterior_variance: torch.Tensor  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), eq. 7
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t with beta~_0 replaced by beta~_1 (it is 0)
    posterior_mean_coef1: torch.Tensor  # multiplies x_0 in mu~_t, eq. 7
    posterior_mean_coef2: torch.Tensor  # multiplies x_t in mu~_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor of values in (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas=alphas.rsqrt(),
            sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            eps_coef=betas / (1.0 - alphas_cumprod).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        )

    @classmethod
    def create(cls, schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        return cls.from_betas(make_betas(schedule, num_timesteps, beta_start, beta_end))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> "NoiseSchedule":
        """The same schedule with every tensor cast once to (device, dtype)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                                            for f in dataclasses.fields(self)})


def schedule_from_config(diffusion) -> NoiseSchedule:
    """The float64 schedule a config's `diffusion` section describes."""
    return NoiseSchedule.create(diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)
