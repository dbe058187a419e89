"""Sampling throughput: one denoising step (UNet forward + update) for DDPM and DDIM, in images/s."""

import pytest
import torch

from benchmarks.conftest import synchronized
from engine import diffusion
from engine.unet import build_unet


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_step(benchmark, device, bench_config, schedule, batch_size, sampler):
    torch.manual_seed(0)
    model = build_unet(bench_config, device).eval()
    size, channels = bench_config.data.image_size, bench_config.data.channels
    x = torch.randn(batch_size, channels, size, size, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def step():
        with autocast:
            eps = model(x, t).float()
        noise = torch.randn_like(x)
        if sampler == "ddpm":
            return diffusion.posterior_step(schedule, x, t, eps, noise, variance="fixed_large", clip_denoised=True)
        return diffusion.ddim_step(schedule, x, t, t - 10, eps, None, eta=0.0)

    step()
    benchmark.group = "sampling_step"
    benchmark.extra_info["images"] = batch_size
    out = benchmark(synchronized(step, device))
    assert out.shape == x.shape and torch.isfinite(out).all()
