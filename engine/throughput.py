"""Throughput accounting: model FLOPs per image, GPU peak FLOP/s, MFU, and the per-interval metrics.

MFU (model FLOPs utilisation, PaLM appendix B) = the FLOPs the model needs per second at the measured
throughput / the hardware's peak. The model's FLOPs are counted once, before training, with PyTorch's
FlopCounterMode on the meta device: no weights, no arithmetic, about a second for the 35.7M
parameter CIFAR-10 UNet on a CPU. Only matrix products are counted (convolutions, linear layers,
attention), forward and backward to the weights; elementwise work (norms, activations, the loss,
the optimizer) is not, as in every MFU figure.

The interval metrics read only host-side clocks and the CUDA allocator's counters, so they add no
device sync to the one the training loop already makes per log interval.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.unet import build_unet

if TYPE_CHECKING:
    from engine.config import Config


# ----------------------------------------------------------------------------- model FLOPs


def count_flops_per_image(model: nn.Module, image_shape: Sequence[int], *, backward: bool = True,
                          batch_size: int = 1) -> float:
    """FLOPs per image of `model(x, timesteps)` on a batch of `image_shape` images, plus (by default)
    its backward to every trainable parameter, as a training step runs it.

    Build `model` on the meta device (`with torch.device("meta"): ...`) and nothing is computed. The
    input gets no gradient, as x_t in training, so the first layer's input gradient is not counted.
    """
    device = next(model.parameters()).device
    x = torch.zeros((batch_size, *image_shape), device=device)
    timesteps = torch.zeros(batch_size, dtype=torch.long, device=device)
    weights = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for the CPU's fused attention kernel, so real CPU tensors would count
    # attention as zero; the math path is plain matmuls, counted everywhere (meta tensors take it anyway).
    with counter, sdpa_kernel(SDPBackend.MATH):
        output = model(x, timesteps)
        if backward:
            torch.autograd.grad(output.sum(), weights)  # not .backward(): leaves no .grad on the model
    return counter.get_total_flops() / batch_size


def model_flops_per_image(config: Config, *, backward: bool = True, batch_size: int = 1) -> float:
    """FLOPs per image of one training step (forward + backward; forward only with backward=False) of
    the UNet `config` describes, counted on the meta device. About 37.3e9 for configs/cifar.yaml."""
    # Every attention backend does the same matmuls, and xformers has no meta kernels.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_backend="sdpa"))
    with torch.device("meta"):
        model = build_unet(config, "meta")
    image_shape = (config.data.channels, config.data.image_size, config.data.image_size)
    return count_flops_per_image(model, image_shape, backward=backward, batch_size=batch_size)


# ----------------------------------------------------------------------------- peak FLOP/s

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (which print the
# sparse figure, twice these), matched against torch.cuda.get_device_name() in order: the first pattern
# found wins, so a variant comes before its family. NVL boards run lower clocks than SXM and their
# figure is not in this table: None (unknown) rather than an SXM peak that would understate MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH[12]00\b.*\bNVL\b", None),
    (r"\bH100\b", 989.0),  # SXM5, reported as e.g. "NVIDIA H100 80GB HBM3"
    (r"\bH200\b", 989.0),  # SXM
    (r"\bA100\b", 312.0),  # SXM4 and PCIe alike
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.0),  # with fp32 accumulation, as PyTorch's bf16 matmuls use
)


def peak_bf16_flops_for_name(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU called `device_name`, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return None if tflops is None else tflops * 1e12
    return None


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of one `device`; None for a CPU or a GPU not in PEAK_BF16_TFLOPS."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_bf16_flops_for_name(torch.cuda.get_device_name(device))


# ----------------------------------------------------------------------------- utilisation


# A rank's micro-batch below this many pixels (64 images of 32x32) leaves a GPU's kernels too small to fill it:
# the DDPM paper's batch of 128 over 8 GPUs is 16 CIFAR-10 images each (benchmarks/RECIPE.md, the batch policy)
BUSY_PIXELS_PER_MICRO_BATCH = 64 * 32 * 32


def small_micro_batch_warning(config: Config, device_type: str, world_size: int) -> str | None:
    """On CUDA, what to say when each rank's micro-batch is too small to keep its GPU busy; None otherwise."""
    train, size = config.train, config.data.image_size
    micro_batch = train.batch_size // (world_size * train.grad_accum_steps)
    if device_type != "cuda" or micro_batch * size * size >= BUSY_PIXELS_PER_MICRO_BATCH:
        return None
    wanted = -(-BUSY_PIXELS_PER_MICRO_BATCH // (size * size))
    suggested = wanted * world_size * train.grad_accum_steps
    preset = " or the configs/cifar-fast.yaml preset (batch 512, the same learning rate at any batch)" if size == 32 else ""
    return (f"train.batch_size={train.batch_size} over {world_size} ranks x {train.grad_accum_steps} micro-batches is "
            f"{micro_batch} images of {size}x{size} per GPU per micro-batch, too little work to keep a GPU busy (at "
            f"least {wanted}): use train.batch_size={suggested} with optim.lr_scaling=sqrt{preset}")



def mfu(flops_per_image: float, images_per_sec_global: float, world_size: int,
        peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the peak of all `world_size` devices."""
    return flops_per_image * images_per_sec_global / (world_size * peak_flops_per_device)


def peak_memory_gb(device: torch.device | str) -> float | None:
    """The most memory PyTorch's CUDA allocator has held on `device` (GB, 1e9 bytes); None off CUDA.
    A counter on the host: reading it does not wait for the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def interval_metrics(*, steps: int, images: int, seconds: float, data_wait_seconds: float, world_size: int,
                     flops_per_image: float, peak_flops_per_device: float | None,
                     device: torch.device | str) -> dict[str, Any]:
    """The throughput metrics of one logging interval, for metrics.jsonl and the progress bar.

    steps: optimizer steps in the interval; images: images trained on by all ranks together;
    seconds: wall-clock length of the interval; data_wait_seconds: the part of it spent waiting for
    batches (this rank's). Keys: images_per_sec (global), step_time_sec, data_wait_fraction,
    peak_memory_gb (None off CUDA), mfu (None when the device's peak is unknown).
    """
    if steps <= 0 or seconds <= 0:
        raise ValueError(f"an interval needs steps > 0 and seconds > 0, got steps={steps}, seconds={seconds}")
    images_per_sec = images / seconds
    return {
        "images_per_sec": images_per_sec,
        "step_time_sec": seconds / steps,
        "data_wait_fraction": min(1.0, data_wait_seconds / seconds),
        "peak_memory_gb": peak_memory_gb(device),
        "mfu": (mfu(flops_per_image, images_per_sec, world_size, peak_flops_per_device)
                if peak_flops_per_device else None),
    }


def progress_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The short form of interval_metrics for a progress bar's postfix (unknown values left out)."""
    fields = {"img_s": f"{metrics['images_per_sec']:.0f}", "wait": f"{metrics['data_wait_fraction']:.0%}"}
    if metrics.get("mfu") is not None:
        fields["mfu"] = f"{metrics['mfu']:.1%}"
    if metrics.get("peak_memory_gb") is not None:
        fields["mem"] = f"{metrics['peak_memory_gb']:.1f}G"
    return fields
