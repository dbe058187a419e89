"""The seven diffusion ops, each fused kernel against the ways it replaces and against a plain copy.

One benchmark group per op (`q_sample`, `q_sample_uint8`, `noise_loss`, `posterior_step`,
`ddim_step`, `dpm_solver_step`, `unipc_step`), with four variants measured in the same run, in this order:

- `copy`: a device-to-device copy of as many bytes as the op must move at least (the bandwidth
  yardstick: no elementwise kernel can beat it);
- `eager`: the eager PyTorch way, as Hugging Face diffusers' DDPMScheduler.add_noise / .step and
  DDIMScheduler.step write it (and DPMSolverMultistepScheduler / UniPCMultistepScheduler.step for the
  solvers, their scalar coefficients computed on the host, outside the timing: diffusers computes them as
  0-dim tensors, which only adds launches): the noise drawn by a separate torch.randn_like, coefficients
  gathered from alphas_cumprod[t] and raised to ** 0.5, reshaped to broadcast, then one kernel per
  arithmetic operation (the noise tensor is written, and for the loss stored and read back);
- `compiled`: the op's PyTorch implementation (the one registered as `pytorch`) under
  torch.compile(dynamic=False), i.e. Inductor fusing the reference's elementwise chain, noise
  generation included. In the smoke run on the CPU (`--benchmark-disable`) only with BENCH_COMPILE=1: it
  is a baseline, not an engine path (the engine calls the ops as opaque custom ops, which
  tests/test_kernels.py compiles), and its seven compiles were 30 CPU-seconds of the smoke run;
- `triton`: the registered Triton kernel. Timed on CUDA only; on the CPU with TRITON_INTERPRET=1 it
  runs once in the interpreter, is checked against the reference, and is skipped.

Every variant first checks its output against the op's reference (`kernels.<op>` SPECS), so a
wrong fast path fails the smoke run (`make test` runs this file with --benchmark-disable).

extra_info records `bytes_moved`, the least the op must read and write (the per-sample timesteps,
noise keys and coefficient-table entries, 16 bytes and a few floats per sample, are not counted),
`gb_per_s` = bytes_moved / median time (an effective bandwidth: the eager way moves far more bytes
than it is credited with), and `percent_of_copy` = that bandwidth as a percentage of the `copy`
variant's measured in the same group of the same session (100% means the op runs as fast as merely
copying its bytes; absent when the copy did not run, e.g. under -k). The Triton rows on CUDA also record
`roofline_gb_per_s` and `percent_of_roofline`: the kernel's own roofline (kernels.ahead_of_time), the
slowest of moving its bytes at the copy's measured bandwidth and issuing its instructions (SASS) and its
MUFU operations on this GPU. Drawing the noise in the kernel costs about 60 instructions per element
(Philox and Box-Muller), so in 16-bit dtypes a kernel is bound by issue, not by memory, and the copy is
not a bound it can reach.

On CUDA every variant is timed as the replay of a CUDA graph holding `CALLS_PER_ROUND` calls (the
table's times are per replay; `gb_per_s` and `percent_of_copy` are per call): at this size a kernel runs for microseconds, about as long as
its launch from Python, and in a training or sampling step the GPU runs far ahead of the host, so
device time is what the op costs there. (extra_info `timing` says which way a row was timed; a
variant that cannot be captured falls back to timing plain calls.)

Sizes: on CUDA the CIFAR-10 training batch, 128 x 3 x 32 x 32; on the CPU 16 x 3 x 32 x 32, so
that the smoke run stays fast. Every floating tensor is float32 (extra_info `dtype`; q_sample_uint8
reads uint8 images). The GPU targets: every Triton kernel at >= 85% of its own roofline and >= 3x
faster than `eager` at CIFAR batch 128. CPU timings are for ratios within a group only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import skip_compiling_on_the_cpu, synchronized
from engine.solvers import alpha_sigma, log_snr, solver_plan, unipc_rhos
from kernels.noise import noise_keys, randn_like
from kernels.posterior_step import schedule_tables
from kernels.registry import load_implementation, op_spec
from kernels.triton_support import interpreting, triton_unavailable

VARIANTS = ["copy", "eager", "compiled", "triton"]  # copy first: the others are reported relative to it
CALLS_PER_ROUND = 20  # calls per CUDA-graph replay
IMAGE_SHAPE = (3, 32, 32)
DTYPE = torch.float32
DDIM_STEPS = 50  # t_prev = t - T / 50, a common DDIM sampling schedule
SOLVER_STEPS = 20  # the solvers' recommended range is 10-25
# float32 against the float32 reference: in-kernel log/cos, Inductor's reordering, and the eager
# formulas' different (diffusers') algebra for x_0 all differ from it in the last few bits.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="session")
def copy_bandwidth() -> dict[str, float]:
    """op -> the GB/s its `copy` variant measured in this session."""
    return {}


@dataclass
class OpCase:
    op: str
    shape: tuple[int, ...]
    args: tuple  # the op's positional arguments, for the reference, the compiled and the Triton implementations
    call: Callable[[Callable], Any]  # runs an implementation of the op on `args`: its output(s)
    eager: Callable[[], Any]  # the diffusers-style eager path, drawing its own noise (what is timed)
    eager_check: Callable[[], Any]  # the same path fed the specified noise, to compare with the reference
    bytes_moved: int
    dtype: str = "float32"  # extra_info's note on what the op reads and writes


def _batch(device) -> int:
    return 128 if device.type == "cuda" else 16


def _inputs(device, schedule, batch: int):
    g = torch.Generator().manual_seed(0)
    shape = (batch, *IMAGE_SHAPE)
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
    t[0] = 0  # the end of the chain (no noise in the ancestral step) is always exercised
    return (shape, torch.randn(shape, generator=g).to(device, DTYPE), torch.randn(shape, generator=g).to(device, DTYPE),
            t.to(device), noise_keys(0, torch.arange(batch)).to(device), g)


# ----------------------------------------------------------------------------- the eager way
# These few functions mirror the approach of Hugging Face diffusers' schedulers (DDPMScheduler.add_noise,
# DDPMScheduler.step with fixed_large variance and clip_sample, DDIMScheduler.step with
# use_clipped_model_output): written here, vectorised over per-sample timesteps as training needs.


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """diffusers' idiom: flatten, then unsqueeze until the per-sample values broadcast over `like`."""
    values = values.flatten()
    while len(values.shape) < len(like.shape):
        values = values.unsqueeze(-1)
    return values


def eager_add_noise(original_samples, noise, timesteps, alphas_cumprod):
    sqrt_alpha_prod = _broadcast(alphas_cumprod[timesteps] ** 0.5, original_samples)
    sqrt_one_minus_alpha_prod = _broadcast((1 - alphas_cumprod[timesteps]) ** 0.5, original_samples)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def eager_images_to_unit_range(images, flip):
    samples = images.to(DTYPE) / 127.5 - 1.0
    return torch.where(_broadcast(flip, samples), samples.flip(-1), samples)


def eager_ddpm_step(model_output, timesteps, sample, alphas_cumprod, variance_noise):
    alpha_prod_t = alphas_cumprod[timesteps]
    alpha_prod_t_prev = torch.where(timesteps > 0, alphas_cumprod[(timesteps - 1).clamp_min(0)], 1.0)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = ((sample - _broadcast(beta_prod_t ** 0.5, sample) * model_output)
                            / _broadcast(alpha_prod_t ** 0.5, sample))
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    pred_original_sample_coeff = _broadcast(alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t, sample)
    current_sample_coeff = _broadcast(current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t, sample)
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    variance = _broadcast(current_beta_t ** 0.5 * (timesteps > 0), sample) * variance_noise  # fixed_large: beta_t
    return pred_prev_sample + variance


def eager_ddim_step(model_output, timesteps, prev_timesteps, sample, alphas_cumprod, eta=0.0):
    alpha_prod_t = alphas_cumprod[timesteps]
    alpha_prod_t_prev = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp_min(0)], 1.0)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    pred_original_sample = ((sample - _broadcast(beta_prod_t ** 0.5, sample) * model_output)
                            / _broadcast(alpha_prod_t ** 0.5, sample))
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_epsilon = model_output  # diffusers' default, use_clipped_model_output=False
    pred_sample_direction = _broadcast((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5, sample) * pred_epsilon
    return _broadcast(alpha_prod_t_prev ** 0.5, sample) * pred_original_sample + pred_sample_direction  # eta = 0: no noise


def eager_dpm_solver_2m(model_output, sample, m1, sigma_t, sigma_s0, sigma_s1):
    """DPMSolverMultistepScheduler.step at a second-order step: convert_model_output, then the midpoint update."""
    (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1) = map(alpha_sigma, (sigma_t, sigma_s0, sigma_s1))
    x0_pred = (sample - sigma_s0 * model_output) / alpha_s0
    lambda_t, lambda_s0, lambda_s1 = (math.log(a) - math.log(s) for a, s in
                                      ((alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1)))
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    D0, D1 = x0_pred, (1.0 / (h_0 / h)) * (x0_pred - m1)
    x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (math.exp(-h) - 1.0)) * D0 - 0.5 * (alpha_t * (math.exp(-h) - 1.0)) * D1
    return x_t, x0_pred


def eager_unipc_2(model_output, sample, last_sample, m1, m2, sigmas, i):
    """UniPCMultistepScheduler.step at step i of order 2: convert_model_output, UniC from last_sample, UniP."""
    (alpha_i, sigma_i) = alpha_sigma(sigmas[i])
    x0 = (sample - sigma_i * model_output) / alpha_i
    lam = [log_snr(sigmas[k]) for k in (i - 2, i - 1, i, i + 1)]
    h = lam[2] - lam[1]  # corrector: from sigmas[i-1] to sigmas[i], order 2 (m1 and m2 as history)
    rk = (lam[0] - lam[1]) / h
    rhos_c = unipc_rhos(h, [rk], 2, corrector=True)
    D1 = (m2 - m1) / rk
    x_t_ = sigma_i / alpha_sigma(sigmas[i - 1])[1] * last_sample - alpha_i * math.expm1(-h) * m1
    corrected = x_t_ - alpha_i * math.expm1(-h) * (rhos_c[0] * D1 + rhos_c[-1] * (x0 - m1))
    alpha_next, sigma_next = alpha_sigma(sigmas[i + 1])
    h = lam[3] - lam[2]  # predictor: to sigmas[i+1], order 2, rho = 1/2
    D1 = (m1 - x0) / ((lam[1] - lam[2]) / h)
    x_next = sigma_next / sigma_i * corrected - alpha_next * math.expm1(-h) * x0 - alpha_next * math.expm1(-h) * 0.5 * D1
    return corrected, x_next, x0


def _loss_and_grad(loss: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and d loss / d prediction (autograd.grad, so no .grad accumulates across rounds)."""
    (grad,) = torch.autograd.grad(loss, prediction)
    return loss.detach(), grad


# ----------------------------------------------------------------------------- the cases


def q_sample_case(device, schedule) -> OpCase:
    shape, x0, _, t, keys, _ = _inputs(device, schedule, _batch(device))
    alphas_cumprod = schedule.alphas_cumprod
    args = (x0, t, keys, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)
    return OpCase("q_sample", shape, args, lambda fn: fn(*args),
                  lambda: eager_add_noise(x0, torch.randn_like(x0), t, alphas_cumprod),
                  lambda: eager_add_noise(x0, randn_like(x0, keys, t), t, alphas_cumprod),
                  bytes_moved=2 * x0.numel() * x0.element_size())  # read x0, write x_t


def q_sample_uint8_case(device, schedule) -> OpCase:
    shape, _, _, t, keys, g = _inputs(device, schedule, _batch(device))
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    flip = (torch.arange(shape[0]) % 2 == 1).to(device)
    alphas_cumprod = schedule.alphas_cumprod
    args = (images, flip, t, keys, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, DTYPE)

    def eager(noise=None):
        x0 = eager_images_to_unit_range(images, flip)
        return eager_add_noise(x0, torch.randn_like(x0) if noise is None else noise, t, alphas_cumprod)

    numel = images.numel()
    return OpCase("q_sample_uint8", shape, args, lambda fn: fn(*args), eager,
                  lambda: eager(randn_like(torch.empty(shape, device=device, dtype=DTYPE), keys, t)),
                  bytes_moved=numel * images.element_size() + numel * DTYPE.itemsize,  # read uint8 images, write x_t
                  dtype="uint8 -> float32")


def noise_loss_case(device, schedule) -> OpCase:
    """The DDPM eps loss (noise_coef = 1, x0_coef = 0), forward and backward to the prediction."""
    shape, prediction, _, t, keys, _ = _inputs(device, schedule, _batch(device))
    prediction.requires_grad_(True)
    ones, zeros = torch.ones_like(schedule.betas), torch.zeros_like(schedule.betas)
    args = (prediction, t, keys, ones, zeros, None)
    # The eager training step draws noise = randn_like(x0) for q_sample and keeps it for the loss;
    # that draw (and q_sample) is timed in the q_sample group, so here the stored noise is an input.
    stored_noise = torch.randn_like(prediction.detach())
    specified_noise = randn_like(prediction.detach(), keys, t)

    def eager(noise=stored_noise):
        return _loss_and_grad(F.mse_loss(prediction.float(), noise.float()), prediction)

    # per-sample losses, averaged as training_step does
    return OpCase("noise_loss", shape, args, lambda fn: _loss_and_grad(fn(*args).mean(), prediction), eager,
                  lambda: eager(specified_noise),
                  # forward reads the prediction; backward reads it again and writes its gradient
                  bytes_moved=3 * prediction.numel() * prediction.element_size())


def posterior_step_case(device, schedule) -> OpCase:
    """DDPM ancestral step, fixed_large variance, x_0 clipped (clip_denoised=True)."""
    shape, x_t, eps, t, keys, _ = _inputs(device, schedule, _batch(device))
    alphas_cumprod = schedule.alphas_cumprod
    args = (x_t, eps, t, keys, *schedule_tables(schedule, "fixed_large"), True)
    return OpCase("posterior_step", shape, args, lambda fn: fn(*args),
                  lambda: eager_ddpm_step(eps, t, x_t, alphas_cumprod, torch.randn_like(x_t)),
                  lambda: eager_ddpm_step(eps, t, x_t, alphas_cumprod, randn_like(x_t, keys, t)),
                  bytes_moved=3 * x_t.numel() * x_t.element_size())  # read x_t and eps, write x_prev


def ddim_step_case(device, schedule) -> OpCase:
    """Deterministic DDIM (eta = 0), x_0 clipped, the network's eps in the direction term (the default)."""
    shape, x_t, eps, t, keys, _ = _inputs(device, schedule, _batch(device))
    t_prev = (t - schedule.num_timesteps // DDIM_STEPS).clamp_min(-1)
    alphas_cumprod = schedule.alphas_cumprod
    args = (x_t, eps, t, t_prev, keys, alphas_cumprod, 0.0, True, False)
    return OpCase("ddim_step", shape, args, lambda fn: fn(*args),
                  lambda: eager_ddim_step(eps, t, t_prev, x_t, alphas_cumprod),
                  lambda: eager_ddim_step(eps, t, t_prev, x_t, alphas_cumprod),
                  bytes_moved=3 * x_t.numel() * x_t.element_size())  # read x_t and eps, write x_prev


def _solver_plan(solver: str, schedule):
    """A 20-step plan and a middle step of it (second order, UniPC's corrector on), as sampling runs them."""
    return solver_plan(schedule, solver, SOLVER_STEPS, unipc_order=2), SOLVER_STEPS // 2


def dpm_solver_step_case(device, schedule) -> OpCase:
    """DPM-Solver++(2M), eps target, unclipped (diffusers' default), at a second-order step of 20."""
    shape, x_t, eps, t, keys, g = _inputs(device, schedule, _batch(device))
    m1 = torch.randn(shape, generator=g).to(device, DTYPE)
    plan, i = _solver_plan("dpm++2m", schedule)
    t = torch.full_like(t, int(plan.timesteps[i]))
    args = (x_t, eps, m1, m1, t, keys, plan.weights[i].to(device, DTYPE), 1, False, False)
    sigmas = [float(sigma) for sigma in plan.sigmas[[i + 1, i, i - 1]]]
    return OpCase("dpm_solver_step", shape, args, lambda fn: fn(*args), lambda: eager_dpm_solver_2m(eps, x_t, m1, *sigmas),
                  lambda: eager_dpm_solver_2m(eps, x_t, m1, *sigmas),
                  bytes_moved=5 * x_t.numel() * x_t.element_size())  # read x_t, eps, m1; write x_next, x0


def unipc_step_case(device, schedule) -> OpCase:
    """UniPC-2 (bh2), eps target, unclipped, at a middle step of 20: corrector and predictor."""
    shape, x_t, eps, t, keys, g = _inputs(device, schedule, _batch(device))
    x_last, m1, m2 = (torch.randn(shape, generator=g).to(device, DTYPE) for _ in range(3))
    plan, i = _solver_plan("unipc", schedule)
    args = (x_t, eps, x_last, m1, m2, m2, plan.weights[i].to(device, DTYPE), 2, False)
    sigmas = [float(sigma) for sigma in plan.sigmas]
    return OpCase("unipc_step", shape, args, lambda fn: fn(*args),
                  lambda: eager_unipc_2(eps, x_t, x_last, m1, m2, sigmas, i),
                  lambda: eager_unipc_2(eps, x_t, x_last, m1, m2, sigmas, i),
                  bytes_moved=8 * x_t.numel() * x_t.element_size())  # read x_t, eps, x_last, m1, m2; write three


# ----------------------------------------------------------------------------- the benchmark


def _assert_matches(got, expected, what: str) -> None:
    got, expected = (got, expected) if isinstance(expected, tuple) else ((got,), (expected,))
    for index, (value, reference) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(value, reference, **TOLERANCE, msg=lambda m: f"{what}, output {index}: {m}")


def _graph_replay(fn: Callable[[], Any], calls: int) -> Callable[[], None] | None:
    """A function replaying a CUDA graph of `calls` calls of `fn` (already warmed up), or None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs one more warm-up on a side stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:  # e.g. an op that syncs with the host: time it call by call instead
        torch.cuda.synchronize()
        return None
    return graph.replay


# The Triton kernels each op's `triton` variant launches (float32, the cases' branches), for its roofline.
ROOFLINE_KERNELS = {
    "q_sample": [("q_sample", {"FROM_UINT8": False})],
    "q_sample_uint8": [("q_sample", {"FROM_UINT8": True})],
    "noise_loss": [("noise_loss", {"HAS_X0": False, "BACKWARD": False}), ("noise_loss", {"HAS_X0": False, "BACKWARD": True})],
    "posterior_step": [("posterior_step", {"CLIP": True})],
    "ddim_step": [("ddim_step", {"CLIP": True, "CLIPPED_EPS": False, "NOISE": False})],
    "dpm_solver_step": [("dpm_solver_step", {"HISTORY": 1, "NOISE": False, "CLIP": False})],
    "unipc_step": [("unipc_step", {"HISTORY": 2, "CLIP": False})],
}


def roofline_gb_per_s(case: OpCase, copy_gb_per_s: float) -> float | None:
    """The op's Triton kernels' own roofline on this GPU as an effective bandwidth (bytes_moved / roofline time);
    None where kernels.ahead_of_time cannot compile here or does not know the architecture's clock."""
    from kernels import ahead_of_time as aot

    properties = torch.cuda.get_device_properties(0)
    arch = properties.major * 10 + properties.minor
    clock = next((gpu.clock for gpu in aot.GPUS if gpu.arch == arch), None)
    if aot.unavailable() or clock is None:
        return None
    gpu = aot.GPU(properties.name, arch, copy_gb_per_s * 1e9, properties.multi_processor_count, clock)
    shape = aot.Shape("benchmark", math.prod(case.shape[1:]), case.shape[-1])
    seconds = sum(aot.seconds_per_element(name, branch, "fp32", shape, gpu) for name, branch in ROOFLINE_KERNELS[case.op])
    return case.bytes_moved / (seconds * math.prod(case.shape)) / 1e9


def _record_bandwidth(benchmark, case: OpCase, variant: str, copy_bandwidth: dict[str, float], calls: int) -> None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    median = stats.stats.median / calls if stats is not None else 0.0
    if not median > 0:
        return
    gb_per_s = case.bytes_moved / median / 1e9
    benchmark.extra_info["gb_per_s"] = round(gb_per_s, 3)
    if variant == "copy":
        copy_bandwidth[case.op] = gb_per_s
    elif case.op in copy_bandwidth:
        benchmark.extra_info["percent_of_copy"] = round(100.0 * gb_per_s / copy_bandwidth[case.op], 1)
        roofline = roofline_gb_per_s(case, copy_bandwidth[case.op]) if variant == "triton" else None
        if roofline:
            benchmark.extra_info.update(roofline_gb_per_s=round(roofline, 1),
                                        percent_of_roofline=round(100.0 * gb_per_s / roofline, 1))


def _run(benchmark, device, case: OpCase, variant: str, copy_bandwidth: dict[str, float]) -> None:
    benchmark.group = case.op
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, dtype=case.dtype, shape=list(case.shape))
    if variant == "copy":
        source = torch.randint(0, 256, (case.bytes_moved // 2,), dtype=torch.uint8, device=device)
        destination = torch.empty_like(source)

        def fn():
            return destination.copy_(source)

        assert torch.equal(fn(), source)
    else:
        expected = case.call(op_spec(case.op).reference)
        if variant == "eager":
            _assert_matches(case.eager_check(), expected, f"{case.op} eager")
            fn = case.eager
        elif variant == "compiled":
            if benchmark.disabled:  # a timing baseline: compiled on the CPU when timed
                skip_compiling_on_the_cpu(device, "or time it: --benchmark-only")
            _, implementation = load_implementation(case.op, "pytorch", device)
            compiled = torch.compile(implementation, dynamic=False)

            def fn():
                return case.call(compiled)

            _assert_matches(fn(), expected, f"{case.op} compiled")  # compiles, outside the timing
        else:
            reason = triton_unavailable(device)
            if reason:
                pytest.skip(reason)
            _, implementation = load_implementation(case.op, "triton", device)

            def fn():
                return case.call(implementation)

            _assert_matches(fn(), expected, f"{case.op} triton")  # autotunes on CUDA, outside the timing
            if device.type != "cuda":
                assert interpreting()
                pytest.skip("Triton timing needs CUDA; checked for correctness in the interpreter")
    calls = 1
    if device.type == "cuda":
        replay = _graph_replay(fn, CALLS_PER_ROUND)
        if replay is not None:
            fn, calls = replay, CALLS_PER_ROUND
    benchmark.extra_info["timing"] = f"CUDA graph of {calls} calls" if calls > 1 else "one call per round"
    benchmark(synchronized(fn, device))
    _record_bandwidth(benchmark, case, variant, copy_bandwidth, calls)


CASES = {"q_sample": q_sample_case, "q_sample_uint8": q_sample_uint8_case, "noise_loss": noise_loss_case,
         "posterior_step": posterior_step_case, "ddim_step": ddim_step_case, "dpm_solver_step": dpm_solver_step_case,
         "unipc_step": unipc_step_case}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", list(CASES))
def test_kernel_op(benchmark, device, schedule, op, variant, copy_bandwidth):
    """One op in one variant. For noise_loss, forward and backward together: `compiled` compiles the
    forward (the `pytorch` implementation, an autograd.Function that recomputes the noise in its
    backward) and AOTAutograd its backward, run by torch.autograd.grad outside the compiled region."""
    _run(benchmark, device, CASES[op](device, schedule), variant, copy_bandwidth)
