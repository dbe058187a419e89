"""noise_loss: the training loss, fused with the noise it is measured against.

    noise_loss(prediction, t, noise_keys, noise_coef, x0_coef, x0) -> per-sample mean((prediction - target)^2), (B,)
    target = noise_coef[t] * eps + x0_coef[t] * x0       (the x0 term is skipped when x0 is None)

Per sample, so that the caller can weight, average and bucket by timestep (the loss by noise level)
without a second pass over the batch.

eps is the noise `q_sample` drew for the same (noise_keys, t), recomputed from those counters in the
forward and again in the backward, so training never stores a noise tensor. With noise_coef = 1 and
x0_coef = 0 this is the DDPM eps loss (eq. 14); noise_coef = sqrt(abar), x0_coef = -sqrt(1 - abar)
gives the v loss, noise_coef = 0 and x0_coef = 1 the x0 loss. The losses are float32 (float64 in the
oracle); the gradient flows to `prediction` only.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.noise import randn_like
from kernels.ops import OpSpec
from kernels.reference import compute_dtype, extract
from kernels.registry import register_kernel
from kernels.triton_support import HAVE_TRITON, check_batch, check_pair, check_per_sample, table, triton_unavailable


def target(prediction: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, noise_coef: torch.Tensor,
           x0_coef: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """What the prediction is compared with, in the reference's compute precision."""
    compute = compute_dtype(prediction.dtype)
    like = prediction.to(compute)
    value = extract(noise_coef.to(compute), t, like) * randn_like(like, noise_keys, t)
    if x0 is not None:
        value = value + extract(x0_coef.to(compute), t, like) * x0.to(compute)
    return value


def reference(prediction: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, noise_coef: torch.Tensor,
              x0_coef: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: plain autograd through each sample's mean squared error."""
    goal = target(prediction, t, noise_keys, noise_coef, x0_coef, x0)
    return per_sample_mse(prediction.to(goal.dtype), goal)


def per_sample_mse(prediction: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    return (prediction - goal).square().flatten(1).mean(dim=1)


class NoisePredictionLoss(torch.autograd.Function):
    """The PyTorch implementation: the same loss, recomputing the noise in the backward instead of saving it."""

    @staticmethod
    def forward(ctx, prediction, t, noise_keys, noise_coef, x0_coef, x0):
        ctx.save_for_backward(prediction, t, noise_keys, noise_coef, x0_coef, x0)
        ctx.has_x0 = x0 is not None
        goal = target(prediction, t, noise_keys, noise_coef, x0_coef, x0)
        return per_sample_mse(prediction.to(goal.dtype), goal)

    @staticmethod
    def backward(ctx, grad_loss):
        prediction, t, noise_keys, noise_coef, x0_coef, x0 = ctx.saved_tensors
        goal = target(prediction, t, noise_keys, noise_coef, x0_coef, x0 if ctx.has_x0 else None)
        per_sample = max(prediction.shape[1:].numel(), 1)
        scale = (grad_loss.to(goal.dtype) * (2.0 / per_sample)).view(-1, *([1] * (goal.ndim - 1)))
        grad = (prediction.to(goal.dtype) - goal) * scale
        return grad.to(prediction.dtype), None, None, None, None, None


@register_kernel("noise_loss", "pytorch")
def noise_loss_pytorch(prediction: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, noise_coef: torch.Tensor,
                       x0_coef: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    return NoisePredictionLoss.apply(prediction, t, noise_keys, noise_coef, x0_coef, x0)


# ----------------------------------------------------------------------------- conformance


def conformance_args(case) -> tuple:
    target_kind = case.option("eps", "v", "x0")
    schedule = case.schedule
    ones, zeros = torch.ones_like(schedule.betas), torch.zeros_like(schedule.betas)
    noise_coef, x0_coef = {"eps": (ones, zeros), "v": (schedule.sqrt_alphas_cumprod, -schedule.sqrt_one_minus_alphas_cumprod),
                           "x0": (zeros, ones)}[target_kind]
    prediction = case.batch()
    return (prediction, case.t, case.noise_keys, noise_coef, x0_coef, None if target_kind == "eps" else case.batch())


def conformance_outputs(fn, args) -> dict[str, torch.Tensor]:
    """The losses and their gradient for an upstream gradient that differs per sample (checks the backward's
    scaling and that each sample gets its own)."""
    prediction = args[0].detach().requires_grad_(True)
    loss = fn(prediction, *args[1:])
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, prediction, grad_outputs=upstream)
    return {"loss": loss.detach(), "grad": grad}


SPECS = {"noise_loss": OpSpec("noise_loss(prediction, t, noise_keys, noise_coef, x0_coef, x0) -> per-sample loss (B,)",
                              reference, conformance_args, conformance_outputs)}


# ----------------------------------------------------------------------------- Triton


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_support import autotune_elementwise, even, gaussian_quarters, grid, load_timestep, quarter, quarter_elements

    @autotune_elementwise(key=("BACKWARD",))  # forward and backward tune separately
    @triton.jit
    def _noise_loss_kernel(prediction_ptr, x0_ptr, t_ptr, keys_ptr, noise_coef_ptr, x0_coef_ptr, grad_loss_ptr, out_ptr,
                           numel, partials_per_sample, grad_scale, num_timesteps, HAS_X0: tl.constexpr, BACKWARD: tl.constexpr,
                           EVEN: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: one partial sum of squared errors per program. Backward: d loss / d prediction."""
        sample = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        counters = block * BLOCK + tl.arange(0, BLOCK)
        t = load_timestep(t_ptr, sample, num_timesteps)
        noise_coef = tl.load(noise_coef_ptr + t)
        n0, n1, n2, n3 = gaussian_quarters(tl.load(keys_ptr + sample), t, counters)
        if BACKWARD:
            scale = tl.load(grad_loss_ptr + sample).to(tl.float32) * grad_scale
        else:
            total = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(4):
            index, mask = quarter_elements(counters, j, numel, EVEN)
            offsets = sample * numel + index
            goal = noise_coef * quarter(n0, n1, n2, n3, j)
            if HAS_X0:
                goal += tl.load(x0_coef_ptr + t) * tl.load(x0_ptr + offsets, mask=mask).to(tl.float32)
            difference = tl.load(prediction_ptr + offsets, mask=mask).to(tl.float32) - goal
            if BACKWARD:
                tl.store(out_ptr + offsets, (scale * difference).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                total += tl.where(mask, difference * difference, 0.0)
        if not BACKWARD:
            tl.store(out_ptr + sample * partials_per_sample + block, tl.sum(total, axis=0))

    def _launch(prediction, t, noise_keys, noise_coef, x0_coef, x0, grad_loss, out, *, backward: bool):
        batch = prediction.shape[0]
        numel = prediction[0].numel() if batch else 0
        if prediction.numel():
            _noise_loss_kernel[grid(batch, numel)](
                prediction, prediction if x0 is None else x0, t, noise_keys, table(noise_coef), table(x0_coef),
                prediction if grad_loss is None else grad_loss, out, numel, out.shape[-1] if not backward else 0,
                2.0 / numel, noise_coef.shape[0], HAS_X0=x0 is not None, BACKWARD=backward, EVEN=even(numel))
        return out

    def _partial_sums_written(partials: torch.Tensor, numel: int) -> torch.Tensor:
        """The columns the launch just wrote: one per program, for the block size the autotuner chose."""
        block = _noise_loss_kernel.best_config.kwargs["BLOCK"]
        return partials[:, :triton.cdiv(-(-numel // 4), block)]

    def _checked(prediction, t, noise_keys, x0):
        batch = prediction.shape[0]
        if x0 is None:
            prediction = check_batch("noise_loss", "prediction", prediction, batch)
        else:
            prediction, x0 = check_pair("noise_loss", ("prediction", "x0"), prediction, x0)
        return (prediction, check_per_sample("noise_loss", "t", t, batch),
                check_per_sample("noise_loss", "noise_keys", noise_keys, batch), x0)

    @torch.library.custom_op("ddpm::noise_loss", mutates_args=())
    def noise_loss_triton(prediction: torch.Tensor, t: torch.Tensor, noise_keys: torch.Tensor, noise_coef: torch.Tensor,
                          x0_coef: torch.Tensor, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        prediction, t, noise_keys, x0 = _checked(prediction, t, noise_keys, x0)
        if not prediction.numel():
            return prediction.new_full((prediction.shape[0],), float("nan"), dtype=torch.float32)  # as the reference
        numel = prediction[0].numel()
        smallest_block = min(config.kwargs["BLOCK"] for config in _noise_loss_kernel.configs)
        # Sized for the smallest block; no fill needed: only the columns the launch writes are summed.
        partials = prediction.new_empty((prediction.shape[0], triton.cdiv(-(-numel // 4), smallest_block)), dtype=torch.float32)
        _launch(prediction, t, noise_keys, noise_coef, x0_coef, x0, None, partials, backward=False)
        return _partial_sums_written(partials, numel).sum(dim=1) / numel

    @noise_loss_triton.register_fake
    def _(prediction, t, noise_keys, noise_coef, x0_coef, x0=None):
        return prediction.new_empty((prediction.shape[0],), dtype=torch.float32)

    @torch.library.custom_op("ddpm::noise_loss_backward", mutates_args=())
    def noise_loss_backward_triton(grad_loss: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor,
                                   noise_keys: torch.Tensor, noise_coef: torch.Tensor, x0_coef: torch.Tensor,
                                   x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        prediction, t, noise_keys, x0 = _checked(prediction, t, noise_keys, x0)
        return _launch(prediction, t, noise_keys, noise_coef, x0_coef, x0, grad_loss.to(torch.float32).contiguous(),
                       torch.empty_like(prediction), backward=True)

    @noise_loss_backward_triton.register_fake
    def _(grad_loss, prediction, t, noise_keys, noise_coef, x0_coef, x0=None):
        return torch.empty_like(prediction, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        prediction, t, noise_keys, noise_coef, x0_coef, x0 = inputs
        ctx.save_for_backward(prediction, t, noise_keys, noise_coef, x0_coef, x0)

    def _backward(ctx, grad_loss):
        grad = torch.ops.ddpm.noise_loss_backward(grad_loss, *ctx.saved_tensors)
        return grad, None, None, None, None, None

    noise_loss_triton.register_autograd(_backward, setup_context=_setup_context)
    register_kernel("noise_loss", "triton", unavailable=triton_unavailable)(noise_loss_triton)
