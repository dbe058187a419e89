"""The per-element hot paths the fused kernels will replace: q_sample and the posterior update.

Group `q_sample` and `posterior_step` each compare the eager PyTorch reference with the same
function under torch.compile (Inductor fuses the elementwise chain); the Triton kernels join these
groups when they land.
"""

import pytest
import torch

from benchmarks.conftest import synchronized
from engine import diffusion


def _tensors(device, batch, shape=(3, 32, 32), num_timesteps=1000):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((batch, *shape), generator=g, device=device)
    noise = torch.randn((batch, *shape), generator=g, device=device)
    t = torch.randint(0, num_timesteps, (batch,), generator=g, device=device)
    return x, noise, t


@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_q_sample(benchmark, device, schedule, variant):
    batch = 512 if device.type == "cuda" else 64
    x0, noise, t = _tensors(device, batch)
    fn = diffusion.q_sample if variant == "eager" else torch.compile(diffusion.q_sample, dynamic=False)
    expected = diffusion.q_sample(schedule, x0, t, noise)
    torch.testing.assert_close(fn(schedule, x0, t, noise), expected)
    benchmark.group = "q_sample"
    benchmark.extra_info["images"] = batch
    benchmark(synchronized(fn, device), schedule, x0, t, noise)


@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_posterior_step(benchmark, device, schedule, variant):
    batch = 512 if device.type == "cuda" else 64
    x_t, eps, t = _tensors(device, batch)
    z = torch.randn_like(x_t)

    def step(x_t, t, eps, z):
        return diffusion.posterior_step(schedule, x_t, t, eps, z, variance="fixed_large", clip_denoised=True)

    fn = step if variant == "eager" else torch.compile(step, dynamic=False)
    torch.testing.assert_close(fn(x_t, t, eps, z), step(x_t, t, eps, z))
    benchmark.group = "posterior_step"
    benchmark.extra_info["images"] = batch
    benchmark(synchronized(fn, device), x_t, t, eps, z)
