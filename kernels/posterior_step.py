"""posterior_step: one DDPM ancestral update x_{t-1} = mu(x_t, eps_hat) + sigma_t z (Algorithm 2).

    posterior_step(x_t, eps, t, noise_keys, sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod,
                   sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2, sigma,
                   clip_denoised) -> x_prev

The mean takes one of the two forms the engine supports: without clipping, the direct eps form
mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 11); with clipping, x_0 predicted from
eps and clipped to [-1, 1], then mu~_t(x_t, x_0) (eq. 7), as the DDPM code samples. `sigma` is the
table of sigma_t: sqrt(beta_t) for fixed_large, sqrt(beta~_t) for fixed_small. z is drawn inside the
kernel from (noise_keys[b], t[b]) as `kernels.noise` specifies; samples at t = 0 get no noise.
"""

from __future__ import annotations

import torch

from kernels.noise import randn_like
from kernels.ops import OpSpec
from kernels.reference import compute_dtype, extract
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_pair, check_per_sample, table, triton_unavailable


def formula(x_t, eps, t, noise, sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
            posterior_mean_coef1, posterior_mean_coef2, sigma, clip_denoised: bool) -> torch.Tensor:
    """The update with the noise z given, in x_t's dtype."""
    if clip_denoised:
        x0 = extract(sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        mean = extract(posterior_mean_coef1, t, x_t) * x0.clamp(-1.0, 1.0) + extract(posterior_mean_coef2, t, x_t) * x_t
    else:
        mean = extract(sqrt_recip_alphas, t, x_t) * (x_t - extract(eps_coef, t, x_t) * eps)
    not_last = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return mean + not_last * extract(sigma, t, x_t) * noise


@register_kernel("posterior_step", "pytorch")
def reference(x_t, eps, t, noise_keys, sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod,
              sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2, sigma,
              clip_denoised: bool) -> torch.Tensor:
    compute = compute_dtype(x_t.dtype)
    x = x_t.to(compute)
    tables = (table.to(compute) for table in (sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod,
                                             sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2, sigma))
    return formula(x, eps.to(compute), t, randn_like(x, noise_keys, t), *tables, clip_denoised).to(x_t.dtype)


def schedule_tables(schedule, variance: str) -> tuple[torch.Tensor, ...]:
    """The op's seven coefficient tables from a NoiseSchedule, for fixed_large or fixed_small variance."""
    if variance == "fixed_large":  # sigma_t^2 = beta_t
        sigma = schedule.betas.sqrt()
    elif variance == "fixed_small":  # sigma_t^2 = beta~_t
        sigma = schedule.posterior_variance.sqrt()
    else:
        raise ValueError(f"unknown variance {variance!r}; choose fixed_large or fixed_small")
    return (schedule.sqrt_recip_alphas, schedule.eps_coef, schedule.sqrt_recip_alphas_cumprod,
            schedule.sqrt_recipm1_alphas_cumprod, schedule.posterior_mean_coef1, schedule.posterior_mean_coef2, sigma)


def conformance_args(case) -> tuple:
    variance = case.option("fixed_large", "fixed_large", "fixed_small", "fixed_small")
    return (case.batch(), case.batch(), case.t, case.noise_keys, *schedule_tables(case.schedule, variance),
            case.option(False, True))


SPECS = {"posterior_step": OpSpec(
    "posterior_step(x_t, eps, t, noise_keys, sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod, "
    "sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2, sigma, clip_denoised) -> x_prev",
    reference, conformance_args)}


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, gaussian_quarters, grid, load_timestep, quarter, quarter_elements

    @autotune_elementwise
    @triton.jit
    def _posterior_step_kernel(x_ptr, eps_ptr, t_ptr, keys_ptr, sqrt_recip_alphas_ptr, eps_coef_ptr,
                               sqrt_recip_abar_ptr, sqrt_recipm1_abar_ptr, coef1_ptr, coef2_ptr, sigma_ptr, out_ptr,
                               numel, num_timesteps, CLIP: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        t = load_timestep(t_ptr, sample, num_timesteps)
        sigma = tl.where(t > 0, tl.load(sigma_ptr + t), 0.0)  # no noise at the last step
        n0, n1, n2, n3 = gaussian_quarters(tl.load(keys_ptr + sample), t, counters)
        if CLIP:  # x0 = a x - b eps, clipped; mean = c1 x0 + c2 x
            a, b = tl.load(sqrt_recip_abar_ptr + t), tl.load(sqrt_recipm1_abar_ptr + t)
            c1, c2 = tl.load(coef1_ptr + t), tl.load(coef2_ptr + t)
        else:  # mean = a (x - b eps)
            a, b = tl.load(sqrt_recip_alphas_ptr + t), tl.load(eps_coef_ptr + t)
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            offsets = sample * numel + index
            x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
            eps = tl.load(eps_ptr + offsets, mask=mask).to(tl.float32)
            if CLIP:
                x0 = tl.minimum(tl.maximum(a * x - b * eps, -1.0), 1.0)
                mean = c1 * x0 + c2 * x
            else:
                mean = a * (x - b * eps)
            x_prev = mean + sigma * quarter(n0, n1, n2, n3, j)
            tl.store(out_ptr + offsets, x_prev.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op("ddpm::posterior_step", mutates_args=())
    def posterior_step_triton(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor,
                              sqrt_recip_alphas: torch.Tensor, eps_coef: torch.Tensor,
                              sqrt_recip_alphas_cumprod: torch.Tensor, sqrt_recipm1_alphas_cumprod: torch.Tensor,
                              posterior_mean_coef1: torch.Tensor, posterior_mean_coef2: torch.Tensor,
                              sigma: torch.Tensor, clip_denoised: bool) -> torch.Tensor:
        batch = x_t.shape[0]
        x_t, eps = check_pair("posterior_step", ("x_t", "eps"), x_t, eps)
        t = check_per_sample("posterior_step", "t", t, batch)
        noise_keys = check_per_sample("posterior_step", "noise_keys", noise_keys, batch)
        out = torch.empty_like(x_t)
        if out.numel():
            numel = x_t[0].numel()
            tables = [table(value) for value in (sqrt_recip_alphas, eps_coef, sqrt_recip_alphas_cumprod,
                                                 sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2, sigma)]
            _posterior_step_kernel[grid(batch, numel)](x_t, eps, t, noise_keys, *tables, out, numel, sigma.shape[0],
                                                       CLIP=clip_denoised, EVEN=even(numel))
        return out

    @posterior_step_triton.register_fake
    def _(x_t, eps, t, noise_keys, *tables_and_clip):
        return torch.empty_like(x_t, memory_format=torch.contiguous_format)

    register_kernel("posterior_step", "triton", unavailable=triton_unavailable)(posterior_step_triton)
