"""unipc_step: one step of UniPC (Zhao et al. 2023, "UniPC", Algorithms 1-3, the B(h) = e^h - 1 variant
"bh2"): the corrector UniC for the sample the network has just seen, then the predictor UniP from it,
fused with the conversion of the network's output to x_0.

    unipc_step(x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3, coefficients, history,
               clip_denoised) -> (x_corrected, x_next, x0)

Both halves are linear in the samples and the data predictions m_i = x_0(x_{t_i}):
    x0          = c[0] x_t + c[1] model_output              (clipped to [-1, 1] if asked)
    x_corrected = c[2] x_t + c[3] x_last + c[4] x0 + c[5] x0_prev + c[6] x0_prev2 + c[7] x0_prev3
    x_next      = c[8] x_corrected + c[9] x0 + c[10] x0_prev + c[11] x0_prev2
where x_last is the previous step's corrected sample (the corrector starts from it, with the network's
new x0 as its extra point). The twelve scalars are computed once per sampling run, in float64, from the
paper's equations (`engine/solvers.py`: rhos from R_p(h) rho = phi_p(h), e.g. x_t = sigma_t / sigma_s x
- alpha_t (e^-h - 1) m0 - alpha_t B(h) sum_k rho_k D_k). With no corrector (the first step) c[2] = 1 and
c[3:8] = 0. `history` is how many earlier predictions are read (2 for UniPC-2, 3 for UniPC-3; the ones
past it are ignored). Returns the corrected sample (the next step's x_last), the next sample and x0.
"""

from __future__ import annotations

import torch

from kernels.ops import OpSpec
from kernels.reference import compute_dtype
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_same_shape, table, triton_unavailable

COEFFICIENTS = ("x0_from_x_t", "x0_from_model_output",
                "corrector_x_t", "corrector_x_last", "corrector_x0", "corrector_x0_prev", "corrector_x0_prev2",
                "corrector_x0_prev3", "predictor_x_corrected", "predictor_x0", "predictor_x0_prev", "predictor_x0_prev2")


def formula(x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3, c, history: int, clip_denoised: bool):
    """(x_corrected, x_next, x0) in x_t's dtype."""
    x0 = c[0] * x_t + c[1] * model_output
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    previous = (x0_prev, x0_prev2, x0_prev3)[:history]
    x_corrected = c[2] * x_t + c[3] * x_last + c[4] * x0 + sum(c[5 + k] * m for k, m in enumerate(previous))
    x_next = c[8] * x_corrected + c[9] * x0 + sum(c[10 + k] * m for k, m in enumerate(previous[:2]))
    return x_corrected, x_next, x0


@register_kernel("unipc_step", "pytorch")
def reference(x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3, coefficients, history: int,
              clip_denoised: bool):
    compute = compute_dtype(x_t.dtype)
    tensors = (value.to(compute) for value in (x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3))
    outputs = formula(*tensors, coefficients.to(compute), history, clip_denoised)
    return tuple(value.to(x_t.dtype) for value in outputs)


def conformance_args(case) -> tuple:
    return (*(case.batch() for _ in range(6)), case.weights(len(COEFFICIENTS)), case.option(2, 3, 1),
            case.option(False, True))


def conformance_outputs(fn, args) -> dict[str, torch.Tensor]:
    x_corrected, x_next, x0 = fn(*args)
    return {"x_corrected": x_corrected, "x_next": x_next, "x0": x0}


SPECS = {"unipc_step": OpSpec("unipc_step(x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3, coefficients, "
                              "history, clip_denoised) -> (x_corrected, x_next, x0)",
                              reference, conformance_args, conformance_outputs)}


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, grid, quarter_elements

    @autotune_elementwise
    @triton.jit
    def _unipc_step_kernel(x_ptr, output_ptr, x_last_ptr, x0_prev_ptr, x0_prev2_ptr, x0_prev3_ptr, coefficients_ptr,
                           corrected_ptr, out_ptr, x0_out_ptr, numel, HISTORY: tl.constexpr, CLIP: tl.constexpr,
                           EVEN: tl.constexpr, BLOCK: tl.constexpr):
        sample = tl.program_id(0).to(tl.int64)
        counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        c = coefficients_ptr
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            offsets = sample * numel + index
            x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
            x0 = tl.load(c) * x + tl.load(c + 1) * tl.load(output_ptr + offsets, mask=mask).to(tl.float32)
            if CLIP:
                x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
            m1 = tl.load(x0_prev_ptr + offsets, mask=mask).to(tl.float32)
            corrected = (tl.load(c + 2) * x + tl.load(c + 3) * tl.load(x_last_ptr + offsets, mask=mask).to(tl.float32)
                         + tl.load(c + 4) * x0 + tl.load(c + 5) * m1)
            predicted = tl.load(c + 9) * x0 + tl.load(c + 10) * m1
            if HISTORY >= 2:
                m2 = tl.load(x0_prev2_ptr + offsets, mask=mask).to(tl.float32)
                corrected += tl.load(c + 6) * m2
                predicted += tl.load(c + 11) * m2
            if HISTORY >= 3:
                corrected += tl.load(c + 7) * tl.load(x0_prev3_ptr + offsets, mask=mask).to(tl.float32)
            predicted += tl.load(c + 8) * corrected
            tl.store(corrected_ptr + offsets, corrected.to(corrected_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + offsets, predicted.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(x0_out_ptr + offsets, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)

    @torch.library.custom_op("ddpm::unipc_step", mutates_args=())
    def unipc_step_triton(x_t: torch.Tensor, model_output: torch.Tensor, x_last: torch.Tensor, x0_prev: torch.Tensor,
                          x0_prev2: torch.Tensor, x0_prev3: torch.Tensor, coefficients: torch.Tensor, history: int,
                          clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = ("x_t", "model_output", "x_last", "x0_prev", "x0_prev2", "x0_prev3")
        x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3 = check_same_shape(
            "unipc_step", names, x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3)
        corrected, out, x0_out = torch.empty_like(x_t), torch.empty_like(x_t), torch.empty_like(x_t)
        if out.numel():
            numel = x_t[0].numel()
            _unipc_step_kernel[grid(x_t.shape[0], numel)](x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3,
                                                          table(coefficients), corrected, out, x0_out, numel,
                                                          HISTORY=int(history), CLIP=bool(clip_denoised),
                                                          EVEN=even(numel))
        return corrected, out, x0_out

    @unipc_step_triton.register_fake
    def _(x_t, model_output, x_last, x0_prev, x0_prev2, x0_prev3, coefficients, history, clip_denoised):
        return tuple(torch.empty_like(x_t, memory_format=torch.contiguous_format) for _ in range(3))

    register_kernel("unipc_step", "triton", unavailable=triton_unavailable)(unipc_step_triton)
