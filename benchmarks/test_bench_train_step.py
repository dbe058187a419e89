"""One optimizer step of the UNet, timed as the engine's own `engine.trainer.train_step` (forward, the fused
loss, backward, clip, Adam, EMA) on the trainer `build_trainer` makes from the preset: eager vs torch.compile
(whole model, per block, or the model and the whole update: `compile_scope: step`), the PyTorch or the Triton kernels for q_sample_uint8 and the fused loss,
fp32 vs bf16, each attention backend, NCHW vs channels_last; and, as the baseline,
the same architecture as Hugging Face diffusers' UNet2DModel trained the way its
`train_unconditional` example does (skipped when diffusers is not installed; it is no dependency).

extra_info: `parameters`, `gflops_per_image` (forward + backward, engine.throughput), `warmup_seconds` (the two
untimed first steps: for the compiled variants, what compiling cost), and when timed
(not under --benchmark-disable) `images_per_sec` from the median step; on CUDA also `mfu` (against
the device's dense bf16 peak, when known) and `peak_memory_gb` over the timed steps.

On the CPU the compiled variants only run with BENCH_COMPILE=1: Inductor's C++ build of this model takes
minutes on 2 cores before the first step (see `warmup_seconds`), for a steady state near eager's; the Triton
kernels are timed on CUDA only.
"""

import contextlib
import dataclasses
import importlib.util
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.conftest import diffusers_unet, skip_compiling_on_the_cpu, synchronized
from engine.diffusers_format import diffusers_scheduler_config
from engine.distributed import DistributedContext
from engine.ema import build_ema, update_ema
from engine.throughput import count_flops_per_image, mfu, model_flops_per_image, peak_bf16_flops, peak_memory_gb
from engine.trainer import build_trainer, train_step
from engine.unet import build_unet, count_parameters


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
@pytest.mark.parametrize("variant", ["eager", "compiled-model", "compiled-blocks", "compiled-step"])
def test_train_step(benchmark, device, bench_config, batch_size, flops_per_image, variant, kernel_impl):
    if variant != "eager":
        skip_compiling_on_the_cpu(device, "minutes")
    if kernel_impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels are timed on CUDA (tests check them in the interpreter)")
    compiled, _, scope = variant.partition("-")
    config = configured(bench_config, batch_size, precision="auto", compile=compiled == "compiled",
                        compile_scope=scope or "model", kernels=kernel_impl)
    time_train_step(benchmark, config, flops_per_image, "train_step")


@pytest.mark.parametrize("attention", ["sdpa", "xformers", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_precision_and_attention(benchmark, device, bench_config, batch_size, flops_per_image,
                                            precision, attention, channels_last):
    """Eager steps with the default kernels: fp32 vs bf16 autocast, each attention backend, NCHW vs NHWC."""
    if attention == "xformers" and (device.type != "cuda" or importlib.util.find_spec("xformers") is None):
        pytest.skip("xformers runs on CUDA only, with the xformers extra installed")
    if channels_last and attention != "sdpa":
        pytest.skip("the memory format is measured with the default attention only")
    config = configured(bench_config, batch_size, precision=precision, attention=attention, channels_last=channels_last)
    time_train_step(benchmark, config, flops_per_image, "train_step_options")


@pytest.mark.parametrize("mode", ["none", "resblocks", "all"])
def test_train_step_activation_checkpointing(benchmark, device, bench_config, batch_size, flops_per_image, mode):
    """Eager steps with each `model.activation_checkpointing`: the time (the recompute costs about one more
    forward of the blocks), the bytes the forward keeps for the backward (`saved_activation_mb`, from
    saved_tensors_hooks, on any device) and on CUDA the peak memory of the step."""
    config = configured(bench_config, batch_size, precision="auto")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, activation_checkpointing=mode))
    benchmark.extra_info.update(activation_checkpointing=mode, saved_activation_mb=saved_activation_bytes(config, device) / 1e6)
    time_train_step(benchmark, config, flops_per_image, "train_step_activation_checkpointing")


def saved_activation_bytes(config, device: torch.device) -> int:
    """Bytes autograd holds for the backward after one forward of the config's UNet on a micro-batch, as training
    runs it (bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    model = build_unet(config, device).train()
    size, channels = config.data.image_size, config.data.channels
    x = torch.randn(config.train.batch_size, channels, size, size, device=device)
    t = torch.randint(0, config.diffusion.num_timesteps, (len(x),), device=device)
    total = 0

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        model(x, t).float().square().mean()
    return total


def configured(config, batch_size: int, *, kernels: str = "auto", attention: str | None = None, **train):
    """The benchmark preset with one step's knobs set, as a user sets them in a config."""
    kernel_choices = dataclasses.replace(config.kernels, q_sample_uint8=kernels, noise_loss=kernels, check=False)
    model = dataclasses.replace(config.model, attention_backend=attention or config.model.attention_backend)
    return dataclasses.replace(config, model=model, kernels=kernel_choices,
                               train=dataclasses.replace(config.train, batch_size=batch_size, **train))


def time_train_step(benchmark, config, flops_per_image: float, group: str) -> None:
    """Times `engine.trainer.train_step` on the trainer `engine.trainer.build_trainer` makes: the code training
    runs (gradient accumulation, non-finite skipping, per-step inputs, the EMA), fed a fixed uint8 batch."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    trainer = build_trainer(config, DistributedContext(rank=0, local_rank=0, world_size=1, device=device))
    size, channels = config.data.image_size, config.data.channels
    batch = {"image": torch.randint(0, 256, (trainer.micro_batch, channels, size, size), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)).to(device), "skipped": 0}
    steps = iter(range(10**9))
    trainer.train_model.train()

    def step():
        return train_step(trainer, next(steps), lambda: batch).loss

    started = time.perf_counter()
    for _ in range(2):  # warm up (and compile) outside the timing
        step()
    synchronized(lambda: None, device)()
    warmup_seconds = time.perf_counter() - started
    reset_peak_memory(device)
    benchmark.group = group
    benchmark.extra_info.update(kernels=trainer.kernels.describe(), images=config.train.batch_size,
                                parameters=count_parameters(trainer.model), precision=str(trainer.dtype).removeprefix("torch."),
                                attention=config.model.attention_backend, compiled=config.train.compile,
                                compile_scope=config.train.compile_scope, channels_last=config.train.channels_last,
                                warmup_seconds=round(warmup_seconds, 1))  # two steps: with compile, its cost
    if group == "train_step":
        benchmark.extra_info["compare"] = "diffusers train step"  # the ratio in the terminal summary
    loss = benchmark(synchronized(step, device))
    assert torch.isfinite(loss)
    record_throughput(benchmark, device, config.train.batch_size, flops_per_image, trainer.dtype)


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
    benchmark(synchronized(lambda: update_ema(ema, 1), device))
