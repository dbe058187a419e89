"""q_sample: the forward noising step x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4).

Two ops share one kernel:
- `q_sample(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod) -> x_t`
- `q_sample_uint8(images, flip, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
  out_dtype) -> x_t`: straight from the loader's uint8 batch, scaled to [-1, 1] and flipped
  left-right where `flip` is set, in the same pass.
The noise eps is drawn inside the kernel from (noise_keys[b], t[b]) as `kernels.noise` specifies,
so it never exists as a tensor; the fused loss recomputes it from the same counters.
"""

from __future__ import annotations

import torch

from kernels.noise import randn_like
from kernels.ops import OpSpec
from kernels.reference import compute_dtype, extract
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_batch, check_per_sample, table, triton_unavailable

def formula(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
            sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with the noise given, in x0's dtype."""
    return extract(sqrt_alphas_cumprod, t, x0) * x0 + extract(sqrt_one_minus_alphas_cumprod, t, x0) * noise


def images_to_unit_range(images: torch.Tensor, flip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1] in `dtype`, each sample mirrored left-right (last dim) where `flip` is set."""
    mirrored = torch.where(flip.view(-1, *([1] * (images.ndim - 1))), images.flip(-1), images)
    return mirrored.to(dtype) / 127.5 - 1.0


@register_kernel("q_sample", "pytorch")
def reference(x0: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
              sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
    compute = compute_dtype(x0.dtype)
    x = x0.to(compute)
    noise = randn_like(x, noise_keys, t)
    return formula(x, t, noise, sqrt_alphas_cumprod.to(compute), sqrt_one_minus_alphas_cumprod.to(compute)).to(x0.dtype)


@register_kernel("q_sample_uint8", "pytorch")
def reference_uint8(images: torch.Tensor, flip: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor,
                    sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    if images.ndim < 2:
        raise ValueError(f"q_sample_uint8: images must be (B, ..., W) with a width to flip, got shape {tuple(images.shape)}")
    x0 = images_to_unit_range(images, flip, compute_dtype(out_dtype))
    return reference(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod).to(out_dtype)


# ----------------------------------------------------------------------------- conformance


def conformance_args(case) -> tuple:
    return (case.batch(), case.t, case.noise_keys, case.schedule.sqrt_alphas_cumprod,
            case.schedule.sqrt_one_minus_alphas_cumprod)


def conformance_args_uint8(case) -> tuple:
    return (case.images(), case.flip(), case.t, case.noise_keys, case.schedule.sqrt_alphas_cumprod,
            case.schedule.sqrt_one_minus_alphas_cumprod, case.dtype)


SPECS = {
    "q_sample": OpSpec("q_sample(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod) -> x_t",
                       reference, conformance_args),
    "q_sample_uint8": OpSpec("q_sample_uint8(images, flip, t, noise_keys, sqrt_alphas_cumprod, "
                             "sqrt_one_minus_alphas_cumprod, out_dtype) -> x_t", reference_uint8, conformance_args_uint8),
}


# ----------------------------------------------------------------------------- Triton


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, gaussian_quarters, grid, load_timestep, quarter, quarter_elements

    @autotune_elementwise
    @triton.jit
    def _q_sample_kernel(x0_ptr, flip_ptr, t_ptr, keys_ptr, sqrt_abar_ptr, sqrt_one_minus_abar_ptr, out_ptr,
                         numel, width, num_timesteps, FROM_UINT8: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        t = load_timestep(t_ptr, sample, num_timesteps)
        signal_scale = tl.load(sqrt_abar_ptr + t)
        noise_scale = tl.load(sqrt_one_minus_abar_ptr + t)
        n0, n1, n2, n3 = gaussian_quarters(tl.load(keys_ptr + sample), t, counters)
        if FROM_UINT8:
            flip = tl.load(flip_ptr + sample) != 0
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            if FROM_UINT8:  # read the mirrored column where this sample is flipped
                column = index % width
                source = tl.where(flip, index + (width - 1) - 2 * column, index)
                x0 = tl.load(x0_ptr + sample * numel + source, mask=mask).to(tl.float32) / 127.5 - 1.0
            else:
                x0 = tl.load(x0_ptr + sample * numel + index, mask=mask).to(tl.float32)
            x_t = signal_scale * x0 + noise_scale * quarter(n0, n1, n2, n3, j)
            tl.store(out_ptr + sample * numel + index, x_t.to(out_ptr.dtype.element_ty), mask=mask)

    def _launch(source, flip, t, noise_keys, sqrt_abar, sqrt_one_minus_abar, out, from_uint8: bool) -> torch.Tensor:
        batch = out.shape[0]
        numel = out[0].numel() if batch else 0
        if out.numel():
            _q_sample_kernel[grid(batch, numel)](source, flip, t, noise_keys, table(sqrt_abar), table(sqrt_one_minus_abar),
                                                 out, numel, out.shape[-1], sqrt_abar.shape[0], FROM_UINT8=from_uint8,
                                                 EVEN=even(numel))
        return out

    @torch.library.custom_op("ddpm::q_sample", mutates_args=())
    def q_sample_triton(x0: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                        sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
        batch = x0.shape[0]
        x0 = check_batch("q_sample", "x0", x0, batch)
        t = check_per_sample("q_sample", "t", t, batch)
        noise_keys = check_per_sample("q_sample", "noise_keys", noise_keys, batch)
        return _launch(x0, x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                       torch.empty_like(x0), from_uint8=False)

    @q_sample_triton.register_fake
    def _(x0, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
        return torch.empty_like(x0, memory_format=torch.contiguous_format)

    @torch.library.custom_op("ddpm::q_sample_uint8", mutates_args=())
    def q_sample_uint8_triton(images: torch.Tensor, flip: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor,
                              sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
                              out_dtype: torch.dtype) -> torch.Tensor:
        batch = images.shape[0]
        images = check_batch("q_sample_uint8", "images", images, batch, dtypes=(torch.uint8,))
        if images.ndim < 2:
            raise ValueError(f"q_sample_uint8: images must be (B, ..., W) with a width to flip, got shape {tuple(images.shape)}")
        if flip.shape != (batch,) or flip.dtype != torch.bool:
            raise ValueError(f"q_sample_uint8: flip must be a bool tensor of shape ({batch},), got {flip.dtype} {tuple(flip.shape)}")
        t = check_per_sample("q_sample_uint8", "t", t, batch)
        noise_keys = check_per_sample("q_sample_uint8", "noise_keys", noise_keys, batch)
        out = torch.empty(images.shape, dtype=out_dtype, device=images.device)
        check_batch("q_sample_uint8", "out_dtype", out, batch)
        return _launch(images, flip.contiguous().view(torch.uint8), t, noise_keys, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, out, from_uint8=True)

    @q_sample_uint8_triton.register_fake
    def _(images, flip, t, noise_keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out_dtype):
        return torch.empty(images.shape, dtype=out_dtype, device=images.device)

    register_kernel("q_sample", "triton", unavailable=triton_unavailable)(q_sample_triton)
    register_kernel("q_sample_uint8", "triton", unavailable=triton_unavailable)(q_sample_uint8_triton)
