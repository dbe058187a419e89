"""ddim_step: one DDIM update from t to t_prev for any eta (Song et al. 2021, eq. 12).

    ddim_step(x_t, eps, t, t_prev, noise_keys, alphas_cumprod, eta, clip_denoised, use_clipped_model_output) -> x_prev

x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), optionally clipped to [-1, 1]. The direction
term then uses the network's eps (the DDIM paper's code and diffusers' default), or, with
`use_clipped_model_output`, the eps re-derived from the clipped x_0 (improved-diffusion and GLIDE;
diffusers' option of that name): with an undertrained network the second keeps x_0's overshoot as
noise, which lowers sample quality (issue 12);
sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev));
x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
The direction's scale is computed as sqrt((1 - abar_prev) ((1 - eta^2) + eta^2 abar_t (1 - abar_prev) /
(abar_prev (1 - abar_t)))), the same number without the cancellation: at eta = 1 and the first step of a
cosine schedule, 1 - abar_prev - sigma^2 is 1e-9 of its terms, and in float32 it came out as 0 or as
rounding noise of ~2e-4 by the order of the float operations (so the samples depended on the machine).
Likewise sigma's 1 - abar_t / abar_prev is computed as (abar_prev - abar_t) / abar_prev: the subtraction of two
close floats is exact, where rounding abar_t / abar_prev first cost sigma 2e-4 relative between adjacent steps.
t_prev = -1 means the data end (abar_prev = 1). With eta = 0 the update is deterministic; otherwise z
is drawn inside the kernel from (noise_keys[b], t[b]) as `kernels.noise` specifies.
"""

from __future__ import annotations

import torch

from kernels.noise import randn_like
from kernels.ops import OpSpec
from kernels.reference import compute_dtype, extract
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_pair, check_per_sample, table, triton_unavailable


def formula(x_t, eps, t, t_prev, noise, alphas_cumprod, eta: float, clip_denoised: bool,
            use_clipped_model_output: bool = False) -> torch.Tensor:
    """The update with the noise z given (ignored when eta = 0), in x_t's dtype."""
    abar_t = extract(alphas_cumprod, t, x_t)
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp_min(0)], 1.0).to(x_t.dtype).view_as(abar_t)
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        if use_clipped_model_output:
            eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    sigma, direction_scale = noise_and_direction_scales(abar_t, abar_prev, eta)
    x_prev = abar_prev.sqrt() * x0 + direction_scale * eps
    return x_prev + sigma * noise if eta > 0 else x_prev


def noise_and_direction_scales(abar_t, abar_prev, eta: float):
    """sigma and sqrt(1 - abar_prev - sigma^2), the second in its cancellation-free form (module docstring)."""
    one_minus_prev = 1 - abar_prev
    sigma = eta * (one_minus_prev / (1 - abar_t) * ((abar_prev - abar_t) / abar_prev)).sqrt()
    kept = (1 - eta * eta) + eta * eta * abar_t * one_minus_prev / (abar_prev * (1 - abar_t))
    return sigma, (one_minus_prev * kept).clamp_min(0).sqrt()


@register_kernel("ddim_step", "pytorch")
def reference(x_t, eps, t, t_prev, noise_keys, alphas_cumprod, eta: float, clip_denoised: bool,
              use_clipped_model_output: bool) -> torch.Tensor:
    compute = compute_dtype(x_t.dtype)
    x = x_t.to(compute)
    noise = randn_like(x, noise_keys, t) if eta > 0 else None
    return formula(x, eps.to(compute), t, t_prev, noise, alphas_cumprod.to(compute), eta, clip_denoised,
                   use_clipped_model_output).to(x_t.dtype)


def conformance_args(case) -> tuple:
    return (case.batch(), case.batch(), case.t, case.t_prev, case.noise_keys, case.schedule.alphas_cumprod,
            case.option(0.0, 0.5, 1.0), case.option(False, True),
            case.option(False, False, True, True))  # every pair of the two flags


SPECS = {"ddim_step": OpSpec("ddim_step(x_t, eps, t, t_prev, noise_keys, alphas_cumprod, eta, clip_denoised, "
                             "use_clipped_model_output) -> x_prev",
                             reference, conformance_args)}


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, gaussian_quarters, grid, load_timestep, quarter, quarter_elements

    @autotune_elementwise
    @triton.jit
    def _ddim_step_kernel(x_ptr, eps_ptr, t_ptr, t_prev_ptr, keys_ptr, alphas_cumprod_ptr, out_ptr, numel, num_timesteps, eta,
                          CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr, NOISE: tl.constexpr, EVEN: tl.constexpr,
                          BLOCK: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        t = load_timestep(t_ptr, sample, num_timesteps)
        t_prev = load_timestep(t_prev_ptr, sample, num_timesteps, -1)
        abar_t = tl.load(alphas_cumprod_ptr + t)
        abar_prev = tl.where(t_prev >= 0, tl.load(alphas_cumprod_ptr + tl.maximum(t_prev, 0)), 1.0)
        sqrt_abar_t = tl.sqrt(abar_t)
        sqrt_one_minus_abar_t = tl.sqrt(1.0 - abar_t)
        sigma = eta * tl.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * ((abar_prev - abar_t) / abar_prev))
        kept = (1.0 - eta * eta) + eta * eta * abar_t * (1.0 - abar_prev) / (abar_prev * (1.0 - abar_t))
        direction_scale = tl.sqrt(tl.maximum((1.0 - abar_prev) * kept, 0.0))
        if NOISE:
            n0, n1, n2, n3 = gaussian_quarters(tl.load(keys_ptr + sample), t, counters)
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            offsets = sample * numel + index
            x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
            eps = tl.load(eps_ptr + offsets, mask=mask).to(tl.float32)
            x0 = (x - sqrt_one_minus_abar_t * eps) / sqrt_abar_t
            if CLIP:
                x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
                if CLIPPED_EPS:
                    eps = (x - sqrt_abar_t * x0) / sqrt_one_minus_abar_t
            x_prev = tl.sqrt(abar_prev) * x0 + direction_scale * eps
            if NOISE:
                x_prev += sigma * quarter(n0, n1, n2, n3, j)
            tl.store(out_ptr + offsets, x_prev.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op("ddpm::ddim_step", mutates_args=())
    def ddim_step_triton(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                         noise_keys: torch.Tensor, alphas_cumprod: torch.Tensor, eta: float,
                         clip_denoised: bool, use_clipped_model_output: bool) -> torch.Tensor:
        batch = x_t.shape[0]
        x_t, eps = check_pair("ddim_step", ("x_t", "eps"), x_t, eps)
        t = check_per_sample("ddim_step", "t", t, batch)
        t_prev = check_per_sample("ddim_step", "t_prev", t_prev, batch)
        noise_keys = check_per_sample("ddim_step", "noise_keys", noise_keys, batch)
        out = torch.empty_like(x_t)
        if out.numel():
            numel = x_t[0].numel()
            _ddim_step_kernel[grid(batch, numel)](x_t, eps, t, t_prev, noise_keys, table(alphas_cumprod), out, numel,
                                                  alphas_cumprod.shape[0], float(eta), CLIP=clip_denoised,
                                                  CLIPPED_EPS=clip_denoised and use_clipped_model_output, NOISE=eta > 0,
                                                  EVEN=even(numel))
        return out

    @ddim_step_triton.register_fake
    def _(x_t, eps, t, t_prev, noise_keys, alphas_cumprod, eta, clip_denoised, use_clipped_model_output):
        return torch.empty_like(x_t, memory_format=torch.contiguous_format)

    register_kernel("ddim_step", "triton", unavailable=triton_unavailable)(ddim_step_triton)
