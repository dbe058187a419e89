"""What the network sees and predicts at each noise level: the targets eps, x0, v, and EDM's preconditioning.

Karras et al. 2022 (EDM, Table 1) write every denoiser as

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),   x = x0 + sigma eps,

with F the network. On the DDPM (VP) schedule x = x_t / sqrt(abar_t) and sigma = sqrt((1 - abar_t) / abar_t).
The targets eps, x0 and v are such preconditionings with c_in x = x_t; `edm` is EDM's own column, with
sigma_data the data's standard deviation (0.5 for images in [-1, 1]):

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2),

and the loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on D's error, which makes the loss on F
unweighted: F is trained on (x0 - c_skip x) / c_out with a plain MSE. The network keeps its timestep
embedding (c_noise = t, Table 1's VP column). With sd = 1, c_in x = x_t and F = -v: v-prediction.

Everything here is in float64, as tables over t or numbers per noise level, in the forms the engine uses:
- `input_scales`: the network sees input_scale[t] * x_t (1 except for edm);
- `target_coefficients`: F's training target as noise_coef[t] eps + x0_coef[t] x0 (the fused loss's form);
- `x0_coefficients`: x0 = a x_t + b F (the samplers' form);
- `x0_error_factor`: f with |F - F_hat|^2 = f |x0 - x0_hat|^2 (how loss weightings convert between targets).
"""

from __future__ import annotations

import torch

from engine.schedule import NoiseSchedule

TARGETS = ("eps", "x0", "v", "edm")


def _check(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def vp_sigma(schedule: NoiseSchedule) -> torch.Tensor:
    """(T,) sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / sqrt(abar_t), in float64; from the square
    roots the schedule computed in float64 (1 - abar itself would lose digits near t = 0 in a float32 schedule)."""
    return schedule.sqrt_one_minus_alphas_cumprod.double() / schedule.sqrt_alphas_cumprod.double()


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of Karras et al. 2022, Table 1 (EDM column)."""
    total = sigma.square() + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, EDM's weight on the denoiser's squared error."""
    return (sigma.square() + sigma_data ** 2) / (sigma * sigma_data).square()


def input_scales(schedule: NoiseSchedule, target: str, sigma_data: float) -> torch.Tensor:
    """(T,) the factor on x_t of the network's input: c_in / sqrt(abar) = 1 / sqrt(1 - abar + abar sd^2) for edm."""
    _check(target)
    alpha, noise = schedule.sqrt_alphas_cumprod.double(), schedule.sqrt_one_minus_alphas_cumprod.double()
    if target != "edm":
        return torch.ones_like(alpha)
    return (noise.square() + alpha.square() * sigma_data ** 2).rsqrt()


def target_coefficients(schedule: NoiseSchedule, target: str, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise_coef, x0_coef), (T,) each: the network's training target is noise_coef[t] eps + x0_coef[t] x0."""
    _check(target)
    alpha, noise = schedule.sqrt_alphas_cumprod.double(), schedule.sqrt_one_minus_alphas_cumprod.double()
    ones, zeros = torch.ones_like(alpha), torch.zeros_like(alpha)
    if target == "eps":
        return ones, zeros
    if target == "x0":
        return zeros, ones
    if target == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
        return alpha, -noise
    sigma = vp_sigma(schedule)
    c_skip, c_out, _ = edm_scalings(sigma, sigma_data)
    # F = (x0 - c_skip (x0 + sigma eps)) / c_out
    return -c_skip * sigma / c_out, (1.0 - c_skip) / c_out


def x0_coefficients(sigma: float, target: str, sigma_data: float) -> tuple[float, float]:
    """(a, b) with x0 = a x_t + b F at the noise level sigma (x_t the VP sample, F the network's output)."""
    _check(target)
    alpha = (1.0 + sigma * sigma) ** -0.5  # sqrt(abar)
    noise = sigma * alpha  # sqrt(1 - abar)
    if target == "eps":  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        return 1.0 / alpha, -noise / alpha
    if target == "x0":
        return 0.0, 1.0
    if target == "v":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return alpha, -noise
    c_skip, c_out, _ = (float(value) for value in edm_scalings(torch.tensor(sigma, dtype=torch.float64), sigma_data))
    return c_skip / alpha, c_out  # D = c_skip x_t / sqrt(abar) + c_out F


def x0_error_factor(snr: torch.Tensor, target: str, sigma_data: float) -> torch.Tensor:
    """f with |F - F_hat|^2 = f |x0 - x0_hat|^2 at the same x_t, from SNR = abar / (1 - abar) = 1 / sigma^2."""
    _check(target)
    if target == "eps":
        return snr
    if target == "x0":
        return torch.ones_like(snr)
    if target == "v":
        return snr + 1.0
    return (1.0 + sigma_data ** 2 * snr) / sigma_data ** 2  # 1 / c_out^2
