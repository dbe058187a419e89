"""dpm_solver_step: one step of multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and
its SDE variant, eq. 18), of any order up to 3, fused with the conversion of the network's output to x_0.

    dpm_solver_step(x_t, model_output, x0_prev, x0_prev2, t, noise_keys, coefficients, history, noise,
                    clip_denoised) -> (x_next, x0)

Every DPM-Solver++ update is linear in the sample and the data predictions m_i = x_0(x_{t_i}):
    x0     = c[0] x_t + c[1] model_output           (the target's x_0: eps, x0 or v; clipped to [-1, 1] if asked)
    x_next = c[2] x_t + c[3] x0 + c[4] x0_prev + c[5] x0_prev2 + c[6] z
so the step's seven scalars `coefficients` are computed once per sampling run, in float64, from the
paper's equations (`engine/solvers.py`: e.g. 2M's x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D0
- 0.5 alpha_t (e^-h - 1) D1 with D0 = m0, D1 = (m0 - m1) / r0), and this op only combines tensors.
`history` is how many earlier predictions the solver reads (1 for 2M, 2 for 3M; x0_prev2 is ignored at
1). With `noise` (the SDE variant) z is drawn inside the kernel from (noise_keys[b], t[b]) as
`kernels.noise` specifies. Returns the next sample and this step's x0, the next step's x0_prev.
"""

from __future__ import annotations

import torch

from kernels.noise import randn_like
from kernels.ops import OpSpec
from kernels.reference import compute_dtype
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_per_sample, check_same_shape, table, triton_unavailable

COEFFICIENTS = ("x0_from_x_t", "x0_from_model_output", "x_t", "x0", "x0_prev", "x0_prev2", "noise")


def formula(x_t, model_output, x0_prev, x0_prev2, z, c, history: int, clip_denoised: bool):
    """(x_next, x0) with the noise z given (None: no noise term), in x_t's dtype."""
    x0 = c[0] * x_t + c[1] * model_output
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    x_next = c[2] * x_t + c[3] * x0 + c[4] * x0_prev
    if history >= 2:
        x_next = x_next + c[5] * x0_prev2
    if z is not None:
        x_next = x_next + c[6] * z
    return x_next, x0


@register_kernel("dpm_solver_step", "pytorch")
def reference(x_t, model_output, x0_prev, x0_prev2, t, noise_keys, coefficients, history: int, noise: bool,
              clip_denoised: bool):
    compute = compute_dtype(x_t.dtype)
    x = x_t.to(compute)
    z = randn_like(x, noise_keys, t) if noise else None
    x_next, x0 = formula(x, model_output.to(compute), x0_prev.to(compute), x0_prev2.to(compute), z,
                         coefficients.to(compute), history, clip_denoised)
    return x_next.to(x_t.dtype), x0.to(x_t.dtype)


def conformance_args(case) -> tuple:
    return (case.batch(), case.batch(), case.batch(), case.batch(), case.t, case.noise_keys,
            case.weights(len(COEFFICIENTS)), case.option(1, 2), case.option(False, False, True, True),
            case.option(False, True, True))


def conformance_outputs(fn, args) -> dict[str, torch.Tensor]:
    x_next, x0 = fn(*args)
    return {"x_next": x_next, "x0": x0}


SPECS = {"dpm_solver_step": OpSpec("dpm_solver_step(x_t, model_output, x0_prev, x0_prev2, t, noise_keys, coefficients, "
                                   "history, noise, clip_denoised) -> (x_next, x0)",
                                   reference, conformance_args, conformance_outputs)}


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, gaussian_quarters, grid, quarter, quarter_elements

    @autotune_elementwise
    @triton.jit
    def _dpm_solver_step_kernel(x_ptr, output_ptr, x0_prev_ptr, x0_prev2_ptr, t_ptr, keys_ptr, coefficients_ptr,
                                out_ptr, x0_out_ptr, numel, HISTORY: tl.constexpr, NOISE: tl.constexpr,
                                CLIP: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        from_x, from_output = tl.load(coefficients_ptr), tl.load(coefficients_ptr + 1)
        c_x, c_x0, c_prev = tl.load(coefficients_ptr + 2), tl.load(coefficients_ptr + 3), tl.load(coefficients_ptr + 4)
        c_prev2, c_noise = tl.load(coefficients_ptr + 5), tl.load(coefficients_ptr + 6)
        if NOISE:
            n0, n1, n2, n3 = gaussian_quarters(tl.load(keys_ptr + sample), tl.load(t_ptr + sample), counters)
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            offsets = sample * numel + index
            x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
            x0 = from_x * x + from_output * tl.load(output_ptr + offsets, mask=mask).to(tl.float32)
            if CLIP:
                x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
            x_next = c_x * x + c_x0 * x0 + c_prev * tl.load(x0_prev_ptr + offsets, mask=mask).to(tl.float32)
            if HISTORY >= 2:
                x_next += c_prev2 * tl.load(x0_prev2_ptr + offsets, mask=mask).to(tl.float32)
            if NOISE:
                x_next += c_noise * quarter(n0, n1, n2, n3, j)
            tl.store(out_ptr + offsets, x_next.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(x0_out_ptr + offsets, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op("ddpm::dpm_solver_step", mutates_args=())
    def dpm_solver_step_triton(x_t: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor,
                               x0_prev2: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor,
                               coefficients: torch.Tensor, history: int, noise: bool,
                               clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x_t.shape[0]
        x_t, model_output, x0_prev, x0_prev2 = check_same_shape(
            "dpm_solver_step", ("x_t", "model_output", "x0_prev", "x0_prev2"), x_t, model_output, x0_prev, x0_prev2)
        t = check_per_sample("dpm_solver_step", "t", t, batch)
        noise_keys = check_per_sample("dpm_solver_step", "noise_keys", noise_keys, batch)
        out, x0_out = torch.empty_like(x_t), torch.empty_like(x_t)
        if out.numel():
            numel = x_t[0].numel()
            _dpm_solver_step_kernel[grid(batch, numel)](x_t, model_output, x0_prev, x0_prev2, t, noise_keys,
                                                        table(coefficients), out, x0_out, numel, HISTORY=int(history),
                                                        NOISE=bool(noise), CLIP=bool(clip_denoised), EVEN=even(numel))
        return out, x0_out

    @dpm_solver_step_triton.register_fake
    def _(x_t, model_output, x0_prev, x0_prev2, t, noise_keys, coefficients, history, noise, clip_denoised):
        return (torch.empty_like(x_t, memory_format=torch.contiguous_format),
                torch.empty_like(x_t, memory_format=torch.contiguous_format))

    register_kernel("dpm_solver_step", "triton", unavailable=triton_unavailable)(dpm_solver_step_triton)
