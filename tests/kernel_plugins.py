"""Example user kernels for q_sample: one to copy, and three broken ones the tests expect to be caught.

A user kernel is any callable with the op's positional signature (`kernels.<op module>.SPECS[op].signature`).
Select it in a config by dotted path,

    kernels: {q_sample: tests.kernel_plugins:q_sample_good}

or register a name with `@register_kernel` and list this module under `kernels.plugins`,

    kernels: {q_sample: plugin_good, plugins: [tests.kernel_plugins]}

and check it before training with `python -m kernels.check q_sample plugin_good --plugin tests.kernel_plugins`.
The noise must be drawn from `kernels.noise` (a pure function of the noise key and timestep), so that the
fused loss recomputes exactly the noise this op added.
"""

from __future__ import annotations

import itertools

import torch

from kernels.noise import randn_like
from kernels.noise_loss import reference as noise_loss_reference
from kernels.registry import register_kernel


@register_kernel("q_sample", "plugin_good")
def q_sample_good(x0: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                  sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in float32 and returned in x0's dtype."""
    x = x0.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    signal = sqrt_alphas_cumprod.float()[t].view(shape)
    noise_scale = sqrt_one_minus_alphas_cumprod.float()[t].view(shape)
    return (signal * x + noise_scale * randn_like(x, noise_keys, t)).to(x0.dtype)


@register_kernel("q_sample", "plugin_wrong")
def q_sample_wrong_noise(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """Broken: Gaussian noise of the right distribution, but from torch.randn, not from the noise keys."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0.device)
    return (sqrt_alphas_cumprod[t].view(shape) * x0.float()
            + sqrt_one_minus_alphas_cumprod[t].view(shape) * noise).to(x0.dtype)


@register_kernel("q_sample", "plugin_crash")
def q_sample_crash(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """Broken: raises on every call."""
    raise RuntimeError("plugin kernel exploded\nsecond line of the message")


def q_sample_too_few_parameters(x0, t, noise_keys):
    """Broken: misses the two coefficient tables of the op's signature."""
    return x0


_loss_calls = itertools.count()


def noise_loss_nan_every_third_call(prediction, t, noise_keys, noise_coef, x0_coef, x0=None):
    """Broken on purpose, for the training tests: the reference loss, but NaN on every third call."""
    loss = noise_loss_reference(prediction, t, noise_keys, noise_coef, x0_coef, x0)
    return loss * float("nan") if next(_loss_calls) % 3 == 2 else loss


def noise_loss_always_nan(prediction, t, noise_keys, noise_coef, x0_coef, x0=None):
    """Broken on purpose, for the training tests: a NaN loss (and so NaN gradients) on every call."""
    return noise_loss_reference(prediction, t, noise_keys, noise_coef, x0_coef, x0) * float("nan")
