"""One optimizer step of the UNet (forward, loss, backward, clip, Adam, EMA), eager vs torch.compile,
with the PyTorch or the Triton kernels for q_sample_uint8 and the fused loss; and, as the baseline,
the same architecture as Hugging Face diffusers' UNet2DModel trained the way its
`train_unconditional` example does (skipped when diffusers is not installed; it is no dependency).

extra_info: `parameters`, `gflops_per_image` (forward + backward, engine.throughput), and when timed
(not under --benchmark-disable) `images_per_sec` from the median step; on CUDA also `mfu` (against
the device's dense bf16 peak, when known) and `peak_memory_gb` over the timed steps.

On the CPU the compiled variant only runs with BENCH_COMPILE=1: Inductor's CPU code for this model
compiles for minutes and runs slower than eager on 2 cores, so it is a GPU measurement; the Triton
kernels are timed on CUDA only.
"""

import dataclasses
import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.conftest import diffusers_unet, synchronized
from engine.diffusers_format import diffusers_scheduler_config
from engine import diffusion
from engine.ema import build_ema, update_ema
from engine.throughput import count_flops_per_image, mfu, model_flops_per_image, peak_bf16_flops, peak_memory_gb
from engine.unet import build_unet, count_parameters
from kernels.noise import noise_keys
from kernels.registry import resolve_kernels


@pytest.fixture(scope="module")
def flops_per_image(bench_config) -> float:
    return model_flops_per_image(bench_config)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record_throughput(benchmark, device: torch.device, batch_size: int, flops_per_image: float,
                      precision: torch.dtype) -> None:
    benchmark.extra_info["gflops_per_image"] = flops_per_image / 1e9
    if benchmark.stats is None:  # --benchmark-disable: one untimed call, no statistics
        return
    images_per_sec = batch_size / benchmark.stats.stats.median
    benchmark.extra_info["images_per_sec"] = images_per_sec
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_gb"] = peak_memory_gb(device)
        peak = peak_bf16_flops(device) if precision == torch.bfloat16 else None  # the table holds bf16 peaks
        if peak is not None:
            benchmark.extra_info["mfu"] = mfu(flops_per_image, images_per_sec, 1, peak)


@pytest.mark.parametrize("kernel_impl", ["pytorch", "triton"])
@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_train_step(benchmark, device, bench_config, schedule, batch_size, flops_per_image, variant, kernel_impl):
    if variant == "compiled" and device.type == "cpu" and not os.environ.get("BENCH_COMPILE"):
        pytest.skip("set BENCH_COMPILE=1 to compile on the CPU (minutes)")
    if kernel_impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels are timed on CUDA (tests check them in the interpreter)")
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    _time_train_step(benchmark, device, bench_config, schedule, batch_size, flops_per_image, "train_step",
                     compiled=variant == "compiled", kernel_impl=kernel_impl, precision=precision)


@pytest.mark.parametrize("attention", ["sdpa", "xformers", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_precision_and_attention(benchmark, device, bench_config, schedule, batch_size, flops_per_image,
                                            precision, attention):
    """Eager steps with the default kernels: fp32 vs bf16 autocast, and each attention backend."""
    if attention == "xformers" and (device.type != "cuda" or importlib.util.find_spec("xformers") is None):
        pytest.skip("xformers runs on CUDA only, with the xformers extra installed")
    config = dataclasses.replace(bench_config, model=dataclasses.replace(bench_config.model, attention_backend=attention))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    _time_train_step(benchmark, device, config, schedule, batch_size, flops_per_image, "train_step_options",
                     compiled=False, kernel_impl="auto", precision=dtype)


def _time_train_step(benchmark, device, config, schedule, batch_size, flops_per_image, group, *, compiled: bool,
                     kernel_impl: str, precision: torch.dtype) -> None:
    kernels = resolve_kernels({"q_sample_uint8": kernel_impl, "noise_loss": kernel_impl}, device, check=False)
    torch.manual_seed(0)
    model = build_unet(config, device)
    ema = build_ema(model, config.train.ema_decay)
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None, foreach=None if fused else True)
    forward = torch.compile(model) if compiled else model
    size, channels = config.data.image_size, config.data.channels
    images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    keys = noise_keys(0, torch.arange(batch_size, device=device))
    autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)

    def step():
        flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
        t = diffusion.sample_timesteps(batch_size, schedule.num_timesteps, "uniform", generator=generator, device=device)
        with autocast:
            loss = diffusion.training_loss(forward, kernels, schedule, images, flip, t, keys,
                                           target=config.diffusion.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        update_ema(ema)
        return loss

    for _ in range(2):  # warm up (and compile) outside the timing
        step()
    reset_peak_memory(device)
    benchmark.group = group
    benchmark.extra_info.update(kernels=kernels.describe(), images=batch_size, parameters=count_parameters(model),
                                precision=str(precision).removeprefix("torch."),
                                attention=config.model.attention_backend, compiled=compiled)
    if group == "train_step":
        benchmark.extra_info["compare"] = "diffusers train step"  # the ratio in the terminal summary
    loss = benchmark(synchronized(step, device))
    assert torch.isfinite(loss)
    record_throughput(benchmark, device, batch_size, flops_per_image, precision)


# ----------------------------------------------------------------------------- the diffusers baseline


class SampleOnly(nn.Module):
    """UNet2DModel returns an output dataclass; the FLOP counter wants model(x, t) -> tensor."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps).sample


def test_train_step_diffusers(benchmark, device, bench_config, batch_size, flops_per_image):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    size, channels = bench_config.data.image_size, bench_config.data.channels
    with torch.device("meta"):
        ours_parameters = count_parameters(build_unet(bench_config, "meta"))
        their_flops = count_flops_per_image(SampleOnly(diffusers_unet(bench_config)), (channels, size, size))
    torch.manual_seed(0)
    model = diffusers_unet(bench_config).to(device)
    # The same architecture, or the comparison means nothing: same parameters, same matmuls.
    assert count_parameters(model) == ours_parameters
    assert their_flops == pytest.approx(flops_per_image, rel=1e-6)

    noise_scheduler = DDPMScheduler.from_config(diffusers_scheduler_config(bench_config))
    # train_unconditional's defaults: AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6), EMA with warmup
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=bench_config.train.ema_decay, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4)
    # Under accelerate's bf16 mixed precision the example casts batches and noise to bf16 and autocasts the
    # forward; flips and scaling to [-1, 1] happen in its DataLoader, so the step starts from such a batch.
    weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    uint8_images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, device=device)
    clean_images = (uint8_images / 127.5 - 1).to(weight_dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()

    def step():
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with autocast:
            model_output = model(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        return loss

    for _ in range(2):
        step()
    reset_peak_memory(device)
    benchmark.group = "train_step"
    benchmark.extra_info["kernels"] = "diffusers UNet2DModel, DDPMScheduler.add_noise, F.mse_loss, EMAModel"
    benchmark.extra_info["baseline"] = "diffusers train step"
    benchmark.extra_info["images"] = batch_size
    benchmark.extra_info["parameters"] = count_parameters(model)
    benchmark.extra_info["parameters_ours"] = ours_parameters
    loss = benchmark(synchronized(step, device))
    assert torch.isfinite(loss)
    record_throughput(benchmark, device, batch_size, their_flops, weight_dtype)


def test_ema_update(benchmark, device, bench_config):
    """The per-step cost of the EMA (a foreach lerp over every parameter)."""
    model = build_unet(bench_config, device)
    ema = build_ema(model, bench_config.train.ema_decay)
    benchmark.group = "ema_update"
    benchmark(synchronized(lambda: update_ema(ema), device))
