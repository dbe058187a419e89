"""Per-timestep loss weights: min-SNR-gamma (Hang et al. 2023) and P2 (Choi et al. 2022), for every target.

Each is defined on one reference error: min-SNR weights the x0 error by min(SNR, gamma), P2 weights the
eps error by 1 / (k + SNR)^gamma. The three targets' squared errors differ by factors of the SNR,

    |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2,    |v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2,

(SNR = abar / (1 - abar)), so each target's weight is the reference weight divided by its factor: for
min-SNR, min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v
(the v weight that diffusers first got wrong, #5654); for EDM's F the factor is 1 / c_out^2 = SNR + 1 / sd^2
(engine/preconditioning.py), so with no weighting its plain loss is EDM's lambda-weighted one. The table is
indexed by t like the schedule's; the trainer multiplies each sample's loss by its entry, and the gradient
follows through autograd.
"""

from __future__ import annotations

import torch

from engine import preconditioning
from engine.schedule import NoiseSchedule

WEIGHTINGS = ("none", "min_snr", "p2")


def signal_to_noise(schedule: NoiseSchedule) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), in float64."""
    alphas_cumprod = schedule.alphas_cumprod.double()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def x0_error_factor(snr: torch.Tensor, target: str, sigma_data: float = 0.5) -> torch.Tensor:
    """f with |target - target_hat|^2 = f |x0 - x0_hat|^2 at the same x_t (for EDM's F, 1 / c_out^2)."""
    return preconditioning.x0_error_factor(snr, target, sigma_data)


def loss_weights(schedule: NoiseSchedule, target: str, weighting: str, *, min_snr_gamma: float = 5.0,
                 p2_k: float = 1.0, p2_gamma: float = 1.0, sigma_data: float = 0.5) -> torch.Tensor | None:
    """(T,) weights of each timestep's per-sample loss for `target`, in the schedule's dtype and device;
    None for `weighting="none"` (the paper's L_simple: every timestep alike)."""
    if weighting == "none":
        return None
    snr = signal_to_noise(schedule)
    if weighting == "min_snr":
        x0_weight = snr.clamp(max=min_snr_gamma)
    elif weighting == "p2":
        x0_weight = snr / (p2_k + snr) ** p2_gamma  # P2's eps weight, times the eps error's factor SNR
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    weights = x0_weight / x0_error_factor(snr, target, sigma_data)
    return weights.to(schedule.alphas_cumprod.dtype)


def weights_from_config(diffusion, schedule: NoiseSchedule) -> torch.Tensor | None:
    """The table of a config's `diffusion` section (its target, loss_weighting and their parameters)."""
    return loss_weights(schedule, diffusion.target, diffusion.loss_weighting, min_snr_gamma=diffusion.min_snr_gamma,
                        p2_k=diffusion.p2_k, p2_gamma=diffusion.p2_gamma, sigma_data=diffusion.sigma_data)
