"""Sampling throughput in images/s: whole runs (1000-step DDPM, 100-step DDIM) of engine.sample's fast
path against Hugging Face diffusers' DDPMPipeline / DDIMPipeline with the same architecture and
schedule in the same run (the ratio is printed at the end), and one denoising step (UNet forward +
update) with the PyTorch or (on CUDA) the Triton update kernels.

Ours: the registry's update kernels, bf16 autocast on CUDA, the step eager or compiled (on CUDA into a
CUDA graph, engine.sample's default there; on the CPU only with BENCH_COMPILE=1, as compiling takes
about a minute). diffusers: its pipelines as documented, with
the UNet in bf16 on CUDA (fp32 on the CPU), progress bars off. On the CPU the runs are shortened (20
timesteps, 5 DDIM steps) so `make test` can smoke-test them; compare ratios, never CPU times.
"""

import dataclasses
import os

import pytest
import torch

from benchmarks.conftest import diffusers_unet, synchronized
from engine.diffusers_format import diffusers_scheduler_config, unet_to_diffusers
from engine.sample import generate, sampling_step
from engine.schedule import schedule_from_config
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.posterior_step import schedule_tables
from kernels.registry import resolve_kernels, resolve_kernels_from_config


def run_config(bench_config, device, sampler):
    """The preset with a whole run's sampler settings: T = 1000 and 100 DDIM steps on CUDA, fewer on the CPU."""
    timesteps, ddim_steps = (1000, 100) if device.type == "cuda" else (20, 5)
    return dataclasses.replace(
        bench_config, diffusion=dataclasses.replace(bench_config.diffusion, num_timesteps=timesteps),
        sample=dataclasses.replace(bench_config.sample, sampler=sampler, steps=ddim_steps if sampler == "ddim" else None,
                                   eta=0.0, clip_denoised=True))


def record_images_per_sec(benchmark, images: int) -> None:
    benchmark.extra_info["images"] = images
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_sec"] = images / benchmark.stats.stats.median


@pytest.mark.parametrize("variant", ["eager", "compiled"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_run(benchmark, device, bench_config, batch_size, sampler, variant):
    if variant == "compiled" and device.type == "cpu" and not os.environ.get("BENCH_COMPILE"):
        pytest.skip("set BENCH_COMPILE=1 to compile on the CPU (about a minute per sampler)")
    config = run_config(bench_config, device, sampler)
    config.sample.compile = variant == "compiled"  # on CUDA, the compiled step is a CUDA-graph replay
    torch.manual_seed(0)
    model = build_unet(config, device).eval()
    schedule = schedule_from_config(config.diffusion).to(device)
    kernels = resolve_kernels_from_config(config, device, check=False)
    step = sampling_step(model, config, schedule, kernels, device)  # compiled once, as engine.sample does

    def run():
        return generate(model, config, schedule, kernels, num_images=batch_size, batch_size=batch_size, seed=0,
                        device=device, step=step)

    run()  # compile and capture outside the timing
    benchmark.group = f"sampling_run_{sampler}"
    benchmark.extra_info.update(kernels=kernels.describe(), steps=config.sample.steps or config.diffusion.num_timesteps,
                                compare=f"diffusers {sampler}")
    images = benchmark.pedantic(synchronized(run, device), rounds=3, iterations=1)
    assert images.shape[0] == batch_size and torch.isfinite(images).all()
    record_images_per_sec(benchmark, batch_size)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_run_diffusers(benchmark, device, bench_config, batch_size, sampler):
    diffusers = pytest.importorskip("diffusers")
    config = run_config(bench_config, device, sampler)
    unet = diffusers_unet(config)
    torch.manual_seed(0)
    _, weights = unet_to_diffusers(build_unet(config, "cpu").state_dict(), config)  # the same weights as ours
    unet.load_state_dict(weights)
    unet = unet.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    scheduler = diffusers.DDPMScheduler.from_config(diffusers_scheduler_config(config))
    if sampler == "ddpm":
        pipeline, options = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler), {}
        steps = config.diffusion.num_timesteps
    else:
        scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
        pipeline, options = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler), {"eta": 0.0}
        steps = config.sample.steps
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def run():
        return pipeline(batch_size=batch_size, generator=generator, num_inference_steps=steps, output_type="np",
                        **options).images

    run()
    benchmark.group = f"sampling_run_{sampler}"
    benchmark.extra_info.update(kernels=f"diffusers {type(pipeline).__name__}", steps=steps,
                                baseline=f"diffusers {sampler}")
    images = benchmark.pedantic(synchronized(run, device), rounds=3, iterations=1)
    assert images.shape[0] == batch_size
    record_images_per_sec(benchmark, batch_size)


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
        return kernels.ddim_step(x, eps, t, t - 10, keys, schedule.alphas_cumprod, 0.0, True, False)

    step()
    benchmark.group = "sampling_step"
    benchmark.extra_info["kernels"] = kernels.describe()
    benchmark.extra_info["images"] = batch_size
    out = benchmark(synchronized(step, device))
    assert out.shape == x.shape and torch.isfinite(out).all()
