"""One optimizer step of the UNet (forward, loss, backward, clip, Adam, EMA), eager vs torch.compile,
with the PyTorch or the Triton kernels for q_sample_uint8 and the fused loss.

On the CPU the compiled variant only runs with BENCH_COMPILE=1: Inductor's CPU code for this model
compiles for minutes and runs slower than eager on 2 cores, so it is a GPU measurement; the Triton
kernels are timed on CUDA only.
"""

import os

import pytest
import torch

from benchmarks.conftest import synchronized
from engine import diffusion
from engine.ema import build_ema, update_ema
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.registry import resolve_kernels


@pytest.mark.parametrize("kernel_impl", ["pytorch", "triton"])
@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_train_step(benchmark, device, bench_config, schedule, batch_size, variant, kernel_impl):
    if variant == "compiled" and device.type == "cpu" and not os.environ.get("BENCH_COMPILE"):
        pytest.skip("set BENCH_COMPILE=1 to compile on the CPU (minutes)")
    if kernel_impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels are timed on CUDA (tests check them in the interpreter)")
    kernels = resolve_kernels({"q_sample_uint8": kernel_impl, "noise_loss": kernel_impl}, device, check=False)
    torch.manual_seed(0)
    model = build_unet(bench_config, device)
    ema = build_ema(model, bench_config.train.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    forward = torch.compile(model) if variant == "compiled" else model
    size, channels = bench_config.data.image_size, bench_config.data.channels
    images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    keys = noise_keys(0, torch.arange(batch_size, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
        t = diffusion.sample_timesteps(batch_size, schedule.num_timesteps, "uniform", generator=generator, device=device)
        with autocast:
            loss = diffusion.training_loss(forward, kernels, schedule, images, flip, t, keys,
                                           target=bench_config.diffusion.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        update_ema(ema)
        return loss

    for _ in range(2):  # warm up (and compile) outside the timing
        step()
    benchmark.group = "train_step"
    benchmark.extra_info["kernels"] = kernels.describe()
    benchmark.extra_info["images"] = batch_size
    loss = benchmark(synchronized(step, device))
    assert torch.isfinite(loss)


def test_ema_update(benchmark, device, bench_config):
    """The per-step cost of the EMA (a foreach lerp over every parameter)."""
    model = build_unet(bench_config, device)
    ema = build_ema(model, bench_config.train.ema_decay)
    benchmark.group = "ema_update"
    benchmark(synchronized(lambda: update_ema(ema), device))
