"""Sampling throughput: one denoising step (UNet forward + update) for DDPM and DDIM, in images/s,
with the PyTorch or (on CUDA) the Triton update kernels."""

import pytest
import torch

from benchmarks.conftest import synchronized
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.posterior_step import schedule_tables
from kernels.registry import resolve_kernels


@pytest.mark.parametrize("kernel_impl", ["pytorch", "triton"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_step(benchmark, device, bench_config, schedule, batch_size, sampler, kernel_impl):
    if kernel_impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels are timed on CUDA (tests check them in the interpreter)")
    kernels = resolve_kernels({"posterior_step": kernel_impl, "ddim_step": kernel_impl}, device, check=False)
    tables = schedule_tables(schedule, "fixed_large")
    torch.manual_seed(0)
    model = build_unet(bench_config, device).eval()
    size, channels = bench_config.data.image_size, bench_config.data.channels
    x = torch.randn(batch_size, channels, size, size, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    keys = noise_keys(0, torch.arange(batch_size, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def step():
        with autocast:
            eps = model(x, t).float()
        if sampler == "ddpm":
            return kernels.posterior_step(x, eps, t, keys, *tables, True)
        return kernels.ddim_step(x, eps, t, t - 10, keys, schedule.alphas_cumprod, 0.0, True)

    step()
    benchmark.group = "sampling_step"
    benchmark.extra_info["kernels"] = kernels.describe()
    benchmark.extra_info["images"] = batch_size
    out = benchmark(synchronized(step, device))
    assert out.shape == x.shape and torch.isfinite(out).all()
