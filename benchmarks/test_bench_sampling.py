"""Sampling throughput in images/s: whole runs (1000-step DDPM, 100-step DDIM, and the fast solvers
dpm++2m, dpm++3m, dpm++2m-sde and unipc at 10 and 20 steps) of engine.sample's fast path against Hugging
Face diffusers with the same architecture, schedule and sampler in the same run (DDPMPipeline,
DDIMPipeline, and DPMSolverMultistepScheduler / UniPCMultistepScheduler in diffusers' documented
denoising loop; the ratio is printed at the end), and one denoising step (UNet forward + update) with
the PyTorch or (on CUDA) the Triton update kernels. `guidance_step` times one classifier-free-guided DDIM
step of a class-conditional model: the engine's one forward of the doubled batch against two forwards of
the batch (the ratio is printed), and the unguided step beside them. Each group is one sampler at one number of steps:
`sampling_run_<sampler>_<steps>`; images/s across groups is what a step count costs.

Ours: the registry's update kernels, bf16 autocast on CUDA, the step eager or compiled (on CUDA into a
CUDA graph, engine.sample's default there; on the CPU only with BENCH_COMPILE=1, as compiling takes
about a minute). diffusers: its pipelines as documented, with
the UNet in bf16 on CUDA (fp32 on the CPU), progress bars off. On the CPU the runs are shortened (20
timesteps, 5 DDIM steps, a quarter of the solver steps) so `make test` can smoke-test them; compare
ratios, never CPU times.
"""

import dataclasses

import pytest
import torch

from benchmarks.conftest import diffusers_unet, skip_compiling_on_the_cpu, synchronized
from engine import diffusion, solvers
from engine.diffusers_format import diffusers_scheduler_config, unet_to_diffusers
from engine.sampling import Sampler
from engine.schedule import schedule_from_config
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.posterior_step import schedule_tables
from kernels.registry import resolve_kernels, resolve_kernels_from_config


RUNS = [("ddpm", None), ("ddim", 100), *((solver, steps) for solver in solvers.SOLVERS for steps in (10, 20))]


def run_config(bench_config, device, sampler, steps=None):
    """The preset with a whole run's sampler settings: T = 1000 and the given steps on CUDA, fewer on the CPU
    (T = 20, 5 DDIM steps, a quarter of a solver's)."""
    cuda = device.type == "cuda"
    if steps is not None and not cuda:
        steps = 5 if sampler == "ddim" else max(2, steps // 4)
    return dataclasses.replace(
        bench_config, diffusion=dataclasses.replace(bench_config.diffusion, num_timesteps=1000 if cuda else 20),
        sample=dataclasses.replace(bench_config.sample, sampler=sampler, steps=steps, eta=0.0, clip_denoised=True))


def run_group(sampler, steps) -> str:
    return f"sampling_run_{sampler}" + (f"_{steps}" if steps else "")


def record_images_per_sec(benchmark, images: int) -> None:
    benchmark.extra_info["images"] = images
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_sec"] = images / benchmark.stats.stats.median


@pytest.mark.parametrize("variant", ["eager", "compiled"])
@pytest.mark.parametrize("sampler,steps", RUNS)
def test_sampling_run(benchmark, device, bench_config, batch_size, sampler, steps, variant):
    if variant == "compiled":
        skip_compiling_on_the_cpu(device, "about a minute per sampler")
    config = run_config(bench_config, device, sampler, steps)
    config.sample.compile = variant == "compiled"  # on CUDA, the compiled step is a CUDA-graph replay
    torch.manual_seed(0)
    model = build_unet(config, device).eval()
    schedule = schedule_from_config(config.diffusion).to(device)
    kernels = resolve_kernels_from_config(config, device, check=False)
    engine_sampler = Sampler(model, config, schedule, kernels, device)  # compiled once, as engine.sample does

    def run():
        return engine_sampler.generate(batch_size, 0, batch_size)

    run()  # compile and capture outside the timing
    benchmark.group = run_group(sampler, steps)
    benchmark.extra_info.update(kernels=kernels.describe(), steps=config.sample.steps or config.diffusion.num_timesteps,
                                compare=f"diffusers {sampler}")
    images = benchmark.pedantic(synchronized(run, device), rounds=3, iterations=1)
    assert images.shape[0] == batch_size and torch.isfinite(images).all()
    record_images_per_sec(benchmark, batch_size)


def diffusers_solver(diffusers, config, scheduler):
    """diffusers' scheduler for one of our solvers, on the same schedule and target."""
    options = config.sample
    common = dict(timestep_spacing=options.timestep_spacing, use_karras_sigmas=options.karras_sigmas,
                  lower_order_final=options.lower_order_final)
    if options.sampler == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(scheduler.config, solver_order=options.unipc_order, **common)
    return diffusers.DPMSolverMultistepScheduler.from_config(
        scheduler.config, solver_order=solvers.solver_order(options.sampler), **common,
        algorithm_type="sde-dpmsolver++" if options.sampler == "dpm++2m-sde" else "dpmsolver++")


def solver_loop(unet, scheduler, batch_size, steps, shape, device, generator):
    """diffusers' documented denoising loop (its pipelines' core) for a multistep scheduler."""
    scheduler.set_timesteps(steps, device=device)
    image = torch.randn((batch_size, *shape), generator=generator).to(device, unet.dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            image = scheduler.step(unet(image, t).sample, t, image).prev_sample
    return image


@pytest.mark.parametrize("sampler,steps", RUNS)
def test_sampling_run_diffusers(benchmark, device, bench_config, batch_size, sampler, steps):
    diffusers = pytest.importorskip("diffusers")
    config = run_config(bench_config, device, sampler, steps)
    unet = diffusers_unet(config)
    torch.manual_seed(0)
    _, weights = unet_to_diffusers(build_unet(config, "cpu").state_dict(), config)  # the same weights as ours
    unet.load_state_dict(weights)
    unet = unet.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    scheduler = diffusers.DDPMScheduler.from_config(diffusers_scheduler_config(config))
    generator = torch.Generator(device="cpu").manual_seed(0)
    if sampler in solvers.SOLVERS:
        scheduler = diffusers_solver(diffusers, config, scheduler)
        shape = (config.data.channels, config.data.image_size, config.data.image_size)
        name = type(scheduler).__name__

        def run():
            return solver_loop(unet, scheduler, batch_size, config.sample.steps, shape, device, generator)
    else:
        if sampler == "ddpm":
            pipeline, options = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler), {}
        else:
            scheduler = diffusers.DDIMScheduler.from_config(scheduler.config)
            pipeline, options = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler), {"eta": 0.0}
        pipeline.set_progress_bar_config(disable=True)
        name = type(pipeline).__name__

        def run():
            return pipeline(batch_size=batch_size, generator=generator, output_type="np", **options,
                            num_inference_steps=config.sample.steps or config.diffusion.num_timesteps).images

    run()
    benchmark.group = run_group(sampler, steps)
    benchmark.extra_info.update(kernels=f"diffusers {name}", steps=config.sample.steps or config.diffusion.num_timesteps,
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


def two_forwards(model, scale: float, no_class: int, autocast):
    """Guidance the plain way, as a baseline: the conditional and the unconditional forward one after the other."""
    def denoise(x, t, labels):
        with autocast:
            conditional, unconditional = model(x, t, labels), model(x, t, torch.full_like(labels, no_class))
        return unconditional.float() + scale * (conditional.float() - unconditional.float())
    return denoise


@pytest.mark.parametrize("variant", ["one forward of 2B", "two forwards of B", "unguided"])
def test_guidance_step(benchmark, device, bench_config, schedule, batch_size, variant):
    num_classes = 10
    config = dataclasses.replace(bench_config, model=dataclasses.replace(bench_config.model, num_classes=num_classes),
                                 sample=dataclasses.replace(bench_config.sample, sampler="ddim", steps=100, compile=False,
                                                            guidance=1.0 if variant == "unguided" else 2.0))
    torch.manual_seed(0)
    model = build_unet(config, device).eval()
    kernels = resolve_kernels_from_config(config, device, check=False)
    if variant == "two forwards of B":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        denoise = two_forwards(model, 2.0, num_classes, autocast)
        step = diffusion.denoising_step(denoise, schedule, kernels, sampler="ddim", clip_denoised=True)
    else:
        step = Sampler(model, config, schedule, kernels, device).step  # the engine's: guided in one forward
    size, channels = config.data.image_size, config.data.channels
    x = torch.randn(batch_size, channels, size, size, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    keys, labels = noise_keys(0, torch.arange(batch_size, device=device)), torch.arange(batch_size, device=device) % 10
    run = torch.no_grad()(lambda: step(x, t, t - 10, keys, labels))
    run()
    benchmark.group = "guidance_step"
    benchmark.extra_info.update(images=batch_size, **({"baseline": "two forwards"} if variant == "two forwards of B"
                                                      else {"compare": "two forwards"} if variant != "unguided" else {}))
    out = benchmark(synchronized(run, device))
    assert out.shape == x.shape and torch.isfinite(out).all()
